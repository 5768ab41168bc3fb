"""The fused CPU kernel (dka.kernels.cpu) against the direct formula and the PyTorch path.

References: the direct formula `(x[:, None, :] * W).topk(k, -1).values.sum(-1) + b` with autograd
for values and gradients, and for the selected index sets the package's tie rule spelled out with a
stable sort (larger product first, then lower input index; -0.0 == +0.0), which the PyTorch path
(`dka._core.select`) follows as well. Index sets must be identical, ties included.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import dka._core as core
from dka.kernels import cpu
from dka.layers import DynamicKConv2d, DynamicKLinear, dynamic_k_linear, routed_indices


def _kernel_builds() -> bool:
    try:
        cpu.build_cpu_kernel()
        return True
    except cpu.CpuKernelUnavailable:
        return False


pytestmark = pytest.mark.skipif(not _kernel_builds(), reason="the CPU kernel cannot be built here (no C++ compiler)")


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
    monkeypatch.delenv(cpu.DISABLE_ENV, raising=False)


def direct(x, w, b, k):
    y = (x[:, None, :] * w).topk(k, -1).values.sum(-1)
    return y if b is None else y + b


def lowest_index_first(x, w, k):
    """The tie rule, spelled out: indices (rows, out, k), ascending."""
    p = x[:, None, :] * w
    p = torch.where(p == 0, torch.zeros_like(p), p)  # -0.0 ties with +0.0
    order = torch.sort(p.float() if p.dtype == torch.bfloat16 else p, dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(-1).values


def pytorch_path_indices(x, w, k):
    return core.select(x, w, k, want_indices=True)[1].long().sort(-1).values


def kernel_indices(x, w, k):
    return cpu.cpu_select(x, w, k, want_indices=True)[1].long().sort(-1).values


SHAPES = [  # (batch, out, in, k): test_layers' shapes, plus lane/ragged and paper-like ones
    (1, 1, 1, 1), (1, 3, 7, 1), (5, 4, 7, 7), (7, 5, 13, 3), (16, 10, 64, 5),
    (3, 11, 17, 16), (33, 2, 9, 4), (2, 365, 40, 25), (9, 17, 33, 8), (4, 40, 128, 32), (3, 20, 512, 5),
]


@pytest.mark.parametrize("batch,out,inp,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("zeros", [False, True], ids=["dense", "relu"])
def test_values_indices_and_gradients_equal_direct_formula(batch, out, inp, k, dtype, zeros):
    g = torch.Generator().manual_seed(batch * 1000 + out * 10 + inp)
    x = torch.randn(batch, inp, dtype=dtype, generator=g)
    if zeros:  # post-ReLU inputs: many equal (zero) products, often straddling the K-th place
        x = x.relu()
    x.requires_grad_()
    w = torch.randn(out, inp, dtype=dtype, generator=g, requires_grad=True)
    b = torch.randn(out, dtype=dtype, generator=g, requires_grad=True)
    grad_out = torch.randn(batch, out, dtype=dtype, generator=g)

    y = cpu.cpu_dynamic_k_linear(x, w, b, k)
    assert type(y.grad_fn).__name__ == "_CpuDynamicKFunctionBackward"
    y_ref = direct(x, w, b, k)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y, y_ref, **tol)

    want = lowest_index_first(x.detach(), w.detach(), k)
    assert torch.equal(kernel_indices(x.detach(), w.detach(), k), want)
    assert torch.equal(pytorch_path_indices(x.detach(), w.detach(), k), want)

    # Gradients: the direct formula's autograd, on the same selection (a 0/1 mask of it).
    mask = torch.zeros(batch, out, inp, dtype=dtype).scatter_(-1, want, 1.0)
    y_mask = (x[:, None, :] * w * mask).sum(-1) + b
    grads = torch.autograd.grad(y, (x, w, b), grad_out)
    grads_ref = torch.autograd.grad(y_mask, (x, w, b), grad_out)
    for got, ref in zip(grads, grads_ref):
        torch.testing.assert_close(got, ref, **tol)
    if not zeros:  # no ties: the direct formula's own gradients agree too
        for got, ref in zip(grads, torch.autograd.grad(y_ref, (x, w, b), grad_out)):
            torch.testing.assert_close(got, ref, **tol)


TIE_CASES = {
    "all_equal": lambda g: (torch.ones(5, 16), torch.ones(3, 16), 4),
    "relu_zeros_k_above_positives": lambda g: (torch.randn(20, 20, generator=g).relu(), torch.randn(6, 20, generator=g), 12),
    "relu_zeros_internal_layer": lambda g: (torch.randn(40, 128, generator=g).relu(), torch.randn(24, 128, generator=g), 32),
    "negative_zero": lambda g: (torch.tensor([[0.0, -0.0, 1.0, 0.0, -0.0, 2.0]]), torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, 1.0]]), 4),
    "zero_weights": lambda g: (torch.randn(6, 30, generator=g), torch.zeros(5, 30), 7),
    "repeated_values": lambda g: (torch.randint(-2, 3, (12, 50), generator=g).float(), torch.randint(-2, 3, (9, 50), generator=g).float(), 10),
}


@pytest.mark.parametrize("case", list(TIE_CASES))
def test_ties_lowest_index_first_on_both_paths(case):
    x, w, k = TIE_CASES[case](torch.Generator().manual_seed(3))
    want = lowest_index_first(x, w, k)
    assert torch.equal(kernel_indices(x, w, k), want)
    assert torch.equal(pytorch_path_indices(x, w, k), want)
    sums, _ = cpu.cpu_select(x, w, k, want_indices=False)
    torch.testing.assert_close(sums, direct(x, w, None, k), rtol=1e-5, atol=1e-5)
    # routed_indices (what the trainer and the tests use) names the same set
    assert torch.equal(routed_indices(x, w, k).sort(-1).values, want)


@pytest.mark.parametrize("batch,out,inp,k", [(16, 10, 64, 5), (40, 24, 128, 32), (8, 20, 512, 5), (9, 5, 20, 12)])
def test_bfloat16_selects_from_rounded_products_like_the_pytorch_path(batch, out, inp, k):
    """bf16 products tie often; both paths round each product to bf16 before selecting."""
    g = torch.Generator().manual_seed(inp)
    x = torch.randn(batch, inp, generator=g).relu().bfloat16()
    w = (torch.randn(out, inp, generator=g) * 0.05).bfloat16()
    want = lowest_index_first(x, w, k)
    assert torch.equal(kernel_indices(x, w, k), want)
    assert torch.equal(pytorch_path_indices(x, w, k), want)
    sums, _ = cpu.cpu_select(x, w, k, want_indices=False)
    ref, _ = core.select(x, w, k, want_indices=False)
    assert sums.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(sums, ref, rtol=1e-6, atol=1e-6)  # fp32 sums of the same bf16 values


def test_autocast_kernel_equals_pytorch_path(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g).relu().requires_grad_()
    layer = DynamicKLinear(128, 48, k=32)
    grad = torch.randn(64, 48, generator=g)
    results = {}
    for name, disabled in (("kernel", ""), ("pytorch", "1")):
        monkeypatch.setenv(cpu.DISABLE_ENV, disabled)
        layer.zero_grad()
        x.grad = None
        layer.routing_mask = torch.zeros(48, 128, dtype=torch.bool)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().backward(grad)
        results[name] = (y.detach(), layer.routing_mask.clone(), x.grad.clone(), layer.weight.grad.clone())
        node = "_CpuDynamicKFunctionBackward" if name == "kernel" else "DynamicKFunctionBackward"
        assert type(y.grad_fn).__name__ == node
    (yk, mk, gxk, gwk), (yp, mp, gxp, gwp) = results["kernel"], results["pytorch"]
    assert yk.dtype == yp.dtype == torch.bfloat16
    assert torch.equal(mk, mp), "the two paths routed through different (output, input) pairs"
    torch.testing.assert_close(yk.float(), yp.float(), rtol=1e-2, atol=1e-2)  # fp32 sums, one bf16 rounding
    # fp32 sums in another order, then one rounding to bf16 (the autocast weight's dtype)
    torch.testing.assert_close(gxk, gxp, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gwk, gwp, rtol=1e-2, atol=1e-2)


def test_routing_mask_and_conv_through_the_kernel():
    conv = DynamicKConv2d(24, 40, k=8, stride=2)
    xc = torch.randn(2, 24, 9, 9).relu()
    conv.routing_mask = torch.zeros(40, 24, dtype=torch.bool)
    y = conv(xc)
    assert type(y.grad_fn).__name__ != "DynamicKFunctionBackward"
    cidx = conv.routed_indices(xc)
    expected = torch.zeros(40, 24, dtype=torch.bool)
    expected[torch.arange(40)[None, :, None, None, None].expand_as(cidx), cidx] = True
    assert torch.equal(conv.routing_mask, expected)
    # a non-contiguous mask takes the PyTorch marking; same result
    x, w = torch.randn(7, 30).relu(), torch.randn(9, 30)
    for mask in (torch.zeros(9, 30, dtype=torch.bool), torch.zeros(30, 9, dtype=torch.bool).t()):
        dynamic_k_linear(x, w, None, 4, mask)
        want = torch.zeros(9, 30, dtype=torch.bool)
        want[torch.arange(9)[None, :, None].expand(7, 9, 4), lowest_index_first(x, w, 4)] = True
        assert torch.equal(mask, want)


def test_results_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 96, generator=g).relu().requires_grad_()
    w = torch.randn(45, 96, generator=g, requires_grad=True)
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = cpu.cpu_dynamic_k_linear(x, w, None, 9)
            runs.append((y.detach(), *torch.autograd.grad(y.sum(), (x, w)), kernel_indices(x.detach(), w.detach(), 9)))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_partial_gradients_and_no_grad():
    x = torch.randn(6, 20).requires_grad_()
    w = torch.randn(4, 20)
    b = torch.randn(4, requires_grad=True)
    y = cpu.cpu_dynamic_k_linear(x, w, b, 3)
    gx, gb = torch.autograd.grad(y.sum(), (x, b))
    rx, rb = torch.autograd.grad(direct(x, w, b, 3).sum(), (x, b))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gb, rb)
    with torch.no_grad():
        torch.testing.assert_close(dynamic_k_linear(x, w, b, 3), direct(x, w, b, 3))


def test_wide_inputs_use_int32_indices():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 33000, generator=g), torch.randn(3, 33000, generator=g)
    sums, idx = cpu.cpu_select(x, w, 6, want_indices=True)
    assert idx.dtype == torch.int32
    assert torch.equal(idx.long().sort(-1).values, lowest_index_first(x, w, 6))
    torch.testing.assert_close(sums, direct(x, w, None, 6))


def test_nan_products_propagate():
    x = torch.randn(3, 10)
    x[1, 4] = float("nan")
    y = dynamic_k_linear(x, torch.randn(5, 10), None, 3)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_dispatch_switch_and_unsupported_dtypes(monkeypatch):
    x, w = torch.randn(4, 12, requires_grad=True), torch.randn(3, 12)
    assert type(dynamic_k_linear(x, w, None, 2).grad_fn).__name__ == "_CpuDynamicKFunctionBackward"
    monkeypatch.setenv(cpu.DISABLE_ENV, "1")
    assert not cpu.cpu_kernel_available(x)
    assert type(dynamic_k_linear(x, w, None, 2).grad_fn).__name__ == "DynamicKFunctionBackward"
    monkeypatch.delenv(cpu.DISABLE_ENV)
    assert not cpu.cpu_kernel_available(x.half())  # float16: the PyTorch path
    y = dynamic_k_linear(x.half(), w.half(), None, 2)
    assert y.dtype == torch.float16 and type(y.grad_fn).__name__ == "DynamicKFunctionBackward"


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DKA_CACHE_DIR", str(tmp_path / "cache"))
    cpu.build_cpu_kernel.cache_clear()
    cpu._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="unavailable.*DKA_DISABLE_CPU_KERNEL=1"):
            assert not cpu.cpu_kernel_available(torch.zeros(1))
        x, w = torch.randn(3, 8, requires_grad=True), torch.randn(2, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process
            y = dynamic_k_linear(x, w, None, 3)
        assert type(y.grad_fn).__name__ == "DynamicKFunctionBackward"
        torch.testing.assert_close(y, direct(x, w, None, 3))
        with pytest.raises(cpu.CpuKernelUnavailable, match="compiler"):
            cpu.build_cpu_kernel()
    finally:
        cpu.build_cpu_kernel.cache_clear()
        cpu._library.cache_clear()


def test_import_builds_nothing():
    code = ("import sys, dka, dka.layers, dka.models; "
            "assert 'dka.kernels.cpu' not in sys.modules, 'imported the CPU kernel module'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
