"""Fused GPU kernels for Dynamic-K (Triton), used by `dka.layers` on CUDA.

The CPU has its own fused kernel in `dka.kernels.cpu` (C++, built at first use; DKA_DISABLE_CPU_KERNEL=1
turns it off); `dka.layers` imports it only when a CPU tensor reaches the Dynamic-K operation.

Public API
- `fused_available(x) -> bool`: True only for a CUDA tensor when Triton imports and has a working
  GPU driver, and DKA_DISABLE_TRITON=1 is not set. CPU tensors always give False (the PyTorch
  path in `dka.layers` is the CPU implementation).
- `fused_dynamic_k_linear(x2d, weight, bias, k) -> Tensor`: y[b, c] = sum of the k largest of
  W[c, i] * x[b, i] over i (+ bias[c]), autograd-capable; gradients flow only through the selected
  (b, c, i) triples, as autograd through `topk` would give them.

Behaviour worth knowing
- Ties: among equal products the lowest input index is selected (and -0.0 counts as +0.0): the
  package's rule, which the PyTorch path (`dka._core.select`) and the CPU kernel follow too.
- dtypes: float32, bfloat16 and float16; x and weight must share one (under autocast both are
  cast to the autocast dtype, as `nn.Linear` would be). Products and sums are computed in float32;
  y has x's dtype.
- Large K: the kernel keeps a running top-KP (KP = K rounded up to a power of two) in registers
  and is built for K <= MAX_FUSED_K (128, which covers every K of the paper). Larger K falls back
  to the PyTorch path of `dka.layers`, as does everything when
  `torch.use_deterministic_algorithms(True)` is on: the kernel's backward uses fp32 atomic adds,
  whose summation order (and last bits) vary from run to run.
- Triton's CPU interpreter: with TRITON_INTERPRET=1 set before triton is imported,
  `fused_dynamic_k_linear` also accepts CPU tensors (that is how the tests check the kernel
  without a GPU). `fused_available` still says False for them.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["fused_available", "fused_dynamic_k_linear", "MAX_FUSED_K"]

MAX_FUSED_K = 128
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _disabled_by_env() -> bool:
    return os.environ.get("DKA_DISABLE_TRITON", "").strip().lower() in ("1", "true", "yes")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() == "1"


@functools.lru_cache(maxsize=1)
def _triton_gpu_ready() -> bool:
    """Triton imports and finds a GPU driver (checked once: it does not change within a process)."""
    if _interpreting() or not torch.cuda.is_available():
        return False
    try:
        import triton
        from triton.runtime import driver

        driver.active.get_current_device()
        return bool(triton.__version__)
    except Exception:  # no triton, no driver, unsupported GPU: the PyTorch path takes over
        return False


def fused_available(x: Tensor) -> bool:
    """Whether `fused_dynamic_k_linear` runs the Triton kernel for this tensor."""
    if _disabled_by_env() or not isinstance(x, Tensor) or not x.is_cuda:
        return False
    return _triton_gpu_ready()


def _check(x2d: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> None:
    if x2d.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"fused_dynamic_k_linear expects x2d (rows, in) and weight (out, in); got shapes "
            f"{tuple(x2d.shape)} and {tuple(weight.shape)} (flatten leading dimensions of x first)"
        )
    n_out, n_in = weight.shape
    if x2d.shape[1] != n_in:
        raise ValueError(f"x2d has {x2d.shape[1]} features but weight expects in={n_in}")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"bias must have shape ({n_out},); got {tuple(bias.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_in:
        raise ValueError(f"k={k!r} is out of range: it must be an integer with 1 <= k <= in={n_in}")
    if x2d.dtype != weight.dtype:
        raise ValueError(
            f"x2d dtype {x2d.dtype} differs from weight dtype {weight.dtype}; cast one of them "
            "or run under torch.autocast"
        )
    if x2d.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {x2d.dtype}: use float32, bfloat16 or float16")
    devices = {t.device for t in (x2d, weight, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x2d, weight and bias must be on one device; got {sorted(map(str, devices))}")
    if not x2d.is_cuda and not _interpreting():
        raise RuntimeError(
            f"the fused Dynamic-K kernel needs CUDA tensors (got {x2d.device}); use "
            "dka.layers.dynamic_k_linear, which picks the PyTorch path on CPU, or set "
            "TRITON_INTERPRET=1 before importing triton to run the kernel in Triton's interpreter"
        )


class _FusedDynamicKFunction(torch.autograd.Function):
    """Forward: Triton streaming top-k; backward: Triton scatter through the saved indices."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> Tensor:
        from dka.kernels import triton_dynamic_k as tk

        need_idx = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        y, idx = tk.dynamic_k_forward(x, weight, bias, k, out_dtype=x.dtype, want_indices=need_idx)
        if need_idx:
            ctx.save_for_backward(x, weight, idx)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        from dka.kernels import triton_dynamic_k as tk

        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(0, dtype=torch.float32).to(grad_y.dtype)
        if not (need_dx or need_dw):
            return None, None, grad_b, None
        x, weight, idx = ctx.saved_tensors
        dx, dw = tk.dynamic_k_backward(x, weight, grad_y.contiguous(), idx, need_dx, need_dw)
        grad_x = dx.to(x.dtype) if dx is not None else None
        grad_w = dw.to(weight.dtype) if dw is not None else None
        return grad_x, grad_w, grad_b, None


def fused_dynamic_k_linear(x2d: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> Tensor:
    """Dynamic-K linear map through the fused Triton kernel (see the module docstring)."""
    if x2d.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        x2d, weight = x2d.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    _check(x2d, weight, bias, k)
    if k > MAX_FUSED_K or torch.are_deterministic_algorithms_enabled():
        from dka._core import DynamicKFunction  # the PyTorch path (chunked, deterministic)

        return DynamicKFunction.apply(x2d, weight, bias, k)
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "the fused Dynamic-K kernel needs triton (pip install 'dka[kernels]'); "
            "dka.layers.dynamic_k_linear runs without it"
        ) from err
    with torch.autocast(x2d.device.type, enabled=False):
        return _FusedDynamicKFunction.apply(
            x2d.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None, k
        )
