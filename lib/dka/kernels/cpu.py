"""Fused CPU kernel for Dynamic-K (C++, built at first use), used by `dka.layers` on CPU tensors.

Why: the PyTorch path (`dka._core`) materialises products chunk by chunk and calls `torch.topk` on
them, which costs what a topk over the whole (rows, out, in) product tensor costs. The kernel in
`dynamic_k_cpu.cpp` computes each row's products for a vector of outputs in a per-thread buffer,
finds the K-th largest by a vectorised bisection, and writes only the (rows, out) sums and the
(rows, out, K) selected indices; its backward scatters through those indices (see the source).

Public API
- `cpu_kernel_available(x) -> bool`: whether `dka.layers` uses the kernel for this tensor: a CPU
  tensor of dtype float32, float64 or bfloat16, DKA_DISABLE_CPU_KERNEL unset, and the library
  built (or found in the cache). float16 and CUDA tensors always give False.
- `cpu_select(x, weight, k, want_indices)`: `dka._core.select`'s contract (sums in float32, or
  float64 for float64; indices int16 where `in` allows), through the kernel.
- `cpu_dynamic_k_linear(x, weight, bias, k, routing_mask=None)`: the autograd function;
  `dynamic_k_linear` of `dka.layers` calls it on CPU (use that: it checks arguments and handles
  autocast).
- `build_cpu_kernel() -> Path`: build now (or find the cached build) and return the library path;
  raises `CpuKernelUnavailable`, whose message names the fix, where it cannot.

Behaviour worth knowing
- Build: the first use in a process compiles `dynamic_k_cpu.cpp` with $CXX (else c++, g++ or
  clang++) as `-O3 -march=native -fopenmp` (dropping flags the compiler rejects) into
  $DKA_CACHE_DIR/cpu-kernel (default ~/.cache/dka/cpu-kernel), keyed by the source, the compiler
  and the CPU's feature flags: about 2 s once per machine; later processes load the cached
  library in milliseconds. `import dka` builds nothing.
- No compiler, or a failed build: one RuntimeWarning per process, then the PyTorch path.
  DKA_DISABLE_CPU_KERNEL=1 turns the kernel off (no build, no warning).
- Same results as the PyTorch path: products rounded as PyTorch rounds them (bfloat16 under
  autocast: each product rounded to bfloat16 before the selection, sums in float32), the same
  selection including ties (larger product first, then lower input index; -0.0 == +0.0; NaN
  counts as the largest), the same saved tensors. Sums are added in another order: equal to
  rounding, not bit for bit.
- Threads: `torch.get_num_threads()`, through the OpenMP runtime PyTorch itself loaded.
  Deterministic: every output element is summed in a fixed order whatever the thread count.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["cpu_kernel_available", "cpu_select", "cpu_dynamic_k_linear", "build_cpu_kernel",
           "CpuKernelUnavailable", "DISABLE_ENV"]

DISABLE_ENV = "DKA_DISABLE_CPU_KERNEL"
_SOURCE = Path(__file__).with_name("dynamic_k_cpu.cpp")
_ABI_VERSION = 2
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
# Tried in order; the first set the compiler accepts wins (-march=native: the build is for this
# machine; -fopenmp: threads; without them the kernel still works, slower).
_FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-march=native"), ("-O3", "-fopenmp"), ("-O3",))


class CpuKernelUnavailable(RuntimeError):
    """The CPU kernel cannot be built or loaded here; the message says why and what to do."""


def _disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes")


def _cache_dir() -> Path:
    root = os.environ.get("DKA_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dka"
    return Path(root) / "cpu-kernel"


def _compiler() -> str | None:
    named = os.environ.get("CXX")
    if named:
        return shutil.which(named) or named
    return next((path for name in ("c++", "g++", "clang++") if (path := shutil.which(name))), None)


def _cpu_signature() -> str:
    """The CPU's feature flags: a -march=native build must not be reused on another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("flags", "Features"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compile(cxx: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile into `target` (atomically); None on success, else the compiler's complaint."""
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.so")
    cmd = [cxx, "-std=c++17", "-shared", "-fPIC", *flags, str(_SOURCE), "-o", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        return (proc.stderr or proc.stdout).strip()[-400:] or f"exit status {proc.returncode}"
    os.replace(tmp, target)
    return None


@functools.lru_cache(maxsize=1)
def build_cpu_kernel() -> Path:
    """Build the kernel (or find the cached build) and return the library's path."""
    cxx = _compiler()
    if cxx is None:
        raise CpuKernelUnavailable("no C++ compiler found: install one (e.g. `apt-get install g++`) or set CXX")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError as err:
        raise CpuKernelUnavailable(f"the C++ compiler {cxx!r} does not run ({err}): fix it or set CXX") from err
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), cxx.encode(), version.encode(), _cpu_signature().encode(),
                 repr(_FLAG_SETS).encode(), sys.platform.encode()):
        key.update(part)
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CpuKernelUnavailable(f"cannot create the build cache {cache} ({err}): set DKA_CACHE_DIR") from err
    target = cache / f"dynamic_k_cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    errors = []
    for flags in _FLAG_SETS:
        error = _compile(cxx, flags, target)
        if error is None:
            return target
        errors.append(f"{' '.join(flags)}: {error}")
    raise CpuKernelUnavailable(f"{cxx} could not build {_SOURCE.name}; last error: {errors[-1]}")


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The loaded library, or None after one warning saying why (then the PyTorch path runs)."""
    try:
        lib = ctypes.CDLL(str(build_cpu_kernel()))
        if lib.dka_dynamic_k_abi_version() != _ABI_VERSION:
            raise CpuKernelUnavailable("the cached library is stale: delete $DKA_CACHE_DIR/cpu-kernel")
    except (CpuKernelUnavailable, OSError) as err:
        warnings.warn(
            f"dka: the fused CPU kernel for Dynamic-K is unavailable ({err}); using the slower "
            f"PyTorch path. Set {DISABLE_ENV}=1 to skip the kernel and this warning.",
            RuntimeWarning, stacklevel=3,
        )
        return None
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.dka_dynamic_k_forward.argtypes = [c_int, ptr, ptr, i64, i64, i64, i64, ptr, ptr, c_int, c_int]
    lib.dka_dynamic_k_forward.restype = c_int
    lib.dka_dynamic_k_backward.argtypes = [c_int, ptr, ptr, ptr, ptr, c_int, i64, i64, i64, i64, ptr, ptr, c_int]
    lib.dka_dynamic_k_backward.restype = c_int
    lib.dka_dynamic_k_mark_routed.argtypes = [ptr, c_int, i64, i64, i64, i64, ptr, c_int]
    lib.dka_dynamic_k_mark_routed.restype = c_int
    return lib


def cpu_kernel_available(x: Tensor) -> bool:
    """Whether `dka.layers` runs the CPU kernel for this tensor (see the module docstring)."""
    if _disabled_by_env() or not isinstance(x, Tensor) or x.device.type != "cpu":
        return False
    return x.dtype in _DTYPE_CODES and _library() is not None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _index_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _require_library() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise CpuKernelUnavailable("the CPU kernel is unavailable (see the warning above); "
                                   "use dka.layers.dynamic_k_linear, which falls back to PyTorch")
    return lib


def cpu_select(x: Tensor, weight: Tensor, k: int, want_indices: bool) -> tuple[Tensor, Tensor | None]:
    """Top-k sums and, optionally, the selected indices: `dka._core.select` through the kernel."""
    if x.dtype not in _DTYPE_CODES or weight.dtype != x.dtype:
        raise TypeError(f"the CPU kernel takes float32, float64 or bfloat16 x and weight of one dtype; "
                        f"got {x.dtype} and {weight.dtype}")
    lib = _require_library()
    x, weight = x.detach().contiguous(), weight.detach().contiguous()
    rows, in_features = x.shape
    out_features = weight.shape[0]
    sums = torch.empty(rows, out_features, dtype=_accumulation_dtype(x.dtype))
    index_dtype = _index_dtype(in_features)
    indices = torch.empty(rows, out_features, k, dtype=index_dtype) if want_indices else None
    if rows and out_features:
        status = lib.dka_dynamic_k_forward(
            _DTYPE_CODES[x.dtype], x.data_ptr(), weight.data_ptr(), rows, out_features, in_features, k,
            sums.data_ptr(), _ptr(indices), index_dtype.itemsize, torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"dka CPU kernel: forward failed with status {status}")
    return sums, indices


def _mark_routed(routing_mask: Tensor, indices: Tensor) -> None:
    """`dka._core.mark_routed` in C++: no (rows, out, K) int64 copy of the indices."""
    if not routing_mask.is_contiguous():
        from dka._core import mark_routed

        mark_routed(routing_mask, indices)
        return
    rows, out_features, k = indices.shape
    if rows and out_features:
        status = _require_library().dka_dynamic_k_mark_routed(
            indices.data_ptr(), indices.dtype.itemsize, rows, out_features, routing_mask.shape[1], k,
            routing_mask.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"dka CPU kernel: marking the routing mask failed with status {status}")


class _CpuDynamicKFunction(torch.autograd.Function):
    """Forward and backward through the C++ kernel; saves what `DynamicKFunction` saves."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, k: int,
                routing_mask: Tensor | None) -> Tensor:
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        sums, indices = cpu_select(x, weight, k, want_indices=need_grad or routing_mask is not None)
        if routing_mask is not None:
            _mark_routed(routing_mask, indices)
        if bias is not None:
            sums += bias.to(sums.dtype)
        if need_grad:
            ctx.save_for_backward(x, weight, indices)
        ctx.has_bias = bias is not None
        return sums.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        grad_x = grad_w = grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_x or want_w):
            return grad_x, grad_w, grad_b, None, None
        x, weight, indices = ctx.saved_tensors
        rows, in_features = x.shape
        out_features, k = indices.shape[1], indices.shape[2]
        acc = _accumulation_dtype(x.dtype)
        gx = torch.zeros(rows, in_features, dtype=acc) if want_x else None
        gw = torch.zeros(out_features, in_features, dtype=acc) if want_w else None
        if rows and out_features:
            x_c, w_c = x.contiguous(), weight.contiguous()
            g = grad_out.to(x.dtype).contiguous()
            status = _require_library().dka_dynamic_k_backward(
                _DTYPE_CODES[x.dtype], x_c.data_ptr(), w_c.data_ptr(), g.data_ptr(), indices.data_ptr(),
                indices.dtype.itemsize, rows, out_features, in_features, k, _ptr(gx), _ptr(gw),
                torch.get_num_threads())
            if status != 0:
                raise RuntimeError(f"dka CPU kernel: backward failed with status {status}")
        if want_x:
            grad_x = gx.to(x.dtype)
        if want_w:
            grad_w = gw.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


def cpu_dynamic_k_linear(x: Tensor, weight: Tensor, bias: Tensor | None, k: int,
                         routing_mask: Tensor | None = None) -> Tensor:
    """Dynamic-K linear map through the CPU kernel; arguments as `dka.layers.dynamic_k_linear`
    after its checks and autocast casts (x and weight of one supported dtype)."""
    return _CpuDynamicKFunction.apply(x, weight, bias, k, routing_mask)
