"""The Dynamic-K layers against the direct formula, autograd, and their error messages."""

import pytest
import torch
from torch import nn

import dka._core as core
from dka.layers import DynamicKConv2d, DynamicKLinear, dynamic_k_linear, routed_indices


def _cpu_kernel_builds() -> bool:
    from dka.kernels import cpu

    try:
        cpu.build_cpu_kernel()
        return True
    except cpu.CpuKernelUnavailable:
        return False


@pytest.fixture(autouse=True, params=["pytorch", "cpu-kernel"])
def implementation(request, monkeypatch):
    """Every test runs on the PyTorch path and on the fused CPU kernel (where it builds)."""
    if request.param == "pytorch":
        monkeypatch.setenv("DKA_DISABLE_CPU_KERNEL", "1")
    elif not _cpu_kernel_builds():
        pytest.skip("the CPU kernel cannot be built here (no C++ compiler)")
    else:
        monkeypatch.delenv("DKA_DISABLE_CPU_KERNEL", raising=False)
    return request.param


def direct(x, w, b, k):
    """The definition, written the obvious (memory-hungry) way."""
    y = (x[:, None, :] * w).topk(k, -1).values.sum(-1)
    return y if b is None else y + b


SHAPES = [  # (batch, out, in, k)
    (1, 1, 1, 1), (1, 3, 7, 1), (5, 4, 7, 7), (7, 5, 13, 3), (16, 10, 64, 5),
    (3, 11, 17, 16), (33, 2, 9, 4), (2, 365, 40, 25),
]


@pytest.mark.parametrize("batch,out,inp,k", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_gradients_equal_direct_formula(batch, out, inp, k, with_bias):
    g = torch.Generator().manual_seed(batch * 1000 + out * 10 + inp)
    x = torch.randn(batch, inp, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(out, inp, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(out, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    grad_out = torch.randn(batch, out, dtype=torch.float64, generator=g)
    inputs = (x, w) + ((b,) if with_bias else ())

    y = dynamic_k_linear(x, w, b, k)
    y_ref = direct(x, w, b, k)
    torch.testing.assert_close(y, y_ref)
    grads = torch.autograd.grad(y, inputs, grad_out)
    grads_ref = torch.autograd.grad(y_ref, inputs, grad_out)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


def test_chunking_does_not_change_results(monkeypatch, implementation):
    if implementation != "pytorch":
        pytest.skip("chunking belongs to the PyTorch path")
    x = torch.randn(37, 50, dtype=torch.float64, requires_grad=True)
    w = torch.randn(23, 50, dtype=torch.float64, requires_grad=True)
    k = 6
    y = dynamic_k_linear(x, w, None, k)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    # Force many tiny chunks in both passes, including chunking over outputs.
    monkeypatch.setattr(core, "CHUNK_ELEMENTS", 30)
    monkeypatch.setattr(core, "BACKWARD_CHUNK_ELEMENTS", 7)
    y2 = dynamic_k_linear(x, w, None, k)
    gx2, gw2 = torch.autograd.grad(y2.sum(), (x, w))
    assert torch.equal(y, y2) and torch.equal(gx, gx2) and torch.equal(gw, gw2)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 9, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    for k in (1, 4, 9):
        assert torch.autograd.gradcheck(lambda x, w, b: dynamic_k_linear(x, w, b, k), (x, w, b))


def test_only_selected_pairs_receive_gradient():
    x = torch.randn(6, 20, requires_grad=True)
    layer = DynamicKLinear(20, 4, k=3)
    layer(x).sum().backward()
    idx = routed_indices(x.detach(), layer.weight.detach(), 3)
    used = torch.zeros(4, 20, dtype=torch.bool)
    used[torch.arange(4)[None, :, None].expand_as(idx), idx] = True
    assert (layer.weight.grad[~used] == 0).all()
    assert (layer.weight.grad[used] != 0).all()
    # each sample's input gradient is non-zero only on the inputs some output routed through
    for b in range(6):
        routed = torch.zeros(20, dtype=torch.bool)
        routed[idx[b].flatten()] = True
        assert (x.grad[b][~routed] == 0).all()


def test_routed_indices_match_topk_sets():
    x, w = torch.randn(8, 30), torch.randn(5, 30)
    idx = routed_indices(x, w, 4)
    ref = (x[:, None, :] * w).topk(4, -1).indices
    assert idx.dtype == torch.long and idx.shape == (8, 5, 4)
    assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)


def test_k_equal_in_features_is_the_dense_layer():
    lin = nn.Linear(12, 5)
    dyn = DynamicKLinear(12, 5, k=12)
    dyn.load_state_dict(lin.state_dict())
    x = torch.randn(7, 12)
    torch.testing.assert_close(dyn(x), lin(x), rtol=1e-5, atol=1e-5)


def test_ties_are_deterministic():
    # Many equal products: the sum is fixed, and the chosen indices must not change between calls
    # or with the chunk size.
    x = torch.ones(5, 16, requires_grad=True)
    w = torch.ones(3, 16, requires_grad=True)
    first = routed_indices(x.detach(), w.detach(), 4)
    y = dynamic_k_linear(x, w, None, 4)
    torch.testing.assert_close(y, torch.full((5, 3), 4.0))
    y.sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    for _ in range(3):
        x.grad = w.grad = None
        assert torch.equal(routed_indices(x.detach(), w.detach(), 4), first)
        dynamic_k_linear(x, w, None, 4).sum().backward()
        assert torch.equal(x.grad, gx) and torch.equal(w.grad, gw)
    # Every sample's output routed through exactly 4 inputs: the gradients add up to that.
    assert gw.sum() == 5 * 3 * 4


def test_ties_go_to_the_lowest_input_index():
    """torch.topk breaks ties its own way; every path selects equal products lowest index first."""
    g = torch.Generator().manual_seed(0)
    cases = [
        (torch.ones(5, 16), torch.ones(3, 16), 4),  # all equal: topk alone returns 9..12 here
        (torch.randn(30, 128, generator=g).relu(), torch.randn(8, 128, generator=g), 32),  # ReLU zeros
        (torch.randn(20, 20, generator=g).relu(), torch.randn(4, 20, generator=g), 12),
        (torch.tensor([[0.0, -0.0, 1.0, -0.0, 0.0]]), torch.ones(1, 5), 3),  # -0.0 ties with +0.0
        (torch.randn(16, 64, generator=g).relu().bfloat16(), (torch.randn(6, 64, generator=g) * 0.05).bfloat16(), 8),
    ]
    for x, w, k in cases:
        p = x[:, None, :] * w
        p = torch.where(p == 0, torch.zeros_like(p), p).float()
        want = torch.sort(p, dim=-1, descending=True, stable=True).indices[..., :k].sort(-1).values
        assert torch.equal(routed_indices(x, w, k).sort(-1).values, want)
        assert torch.equal(core.select(x, w, k, want_indices=True)[1].long().sort(-1).values, want)


def test_state_dict_round_trip_with_linear():
    lin = nn.Linear(8, 3)
    dyn = DynamicKLinear(8, 3, k=2)
    dyn.load_state_dict(lin.state_dict())
    assert torch.equal(dyn.weight, lin.weight) and torch.equal(dyn.bias, lin.bias)
    back = nn.Linear(8, 3)
    back.load_state_dict(dyn.state_dict())
    assert torch.equal(back.weight, lin.weight)
    assert set(DynamicKLinear(8, 3, 2, bias=False).state_dict()) == {"weight"}


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv1x1_is_the_linear_layer_at_every_pixel(stride):
    conv = DynamicKConv2d(6, 4, k=3, stride=stride, bias=True)
    x = torch.randn(2, 6, 7, 5, requires_grad=True)
    y = conv(x)
    ref_conv = nn.Conv2d(6, 4, 1, stride=stride)
    assert y.shape == ref_conv(x).shape
    xs = x[:, :, ::stride, ::stride]
    rows = xs.permute(0, 2, 3, 1).reshape(-1, 6)
    ref = direct(rows, conv.weight.view(4, 6), conv.bias, 3).view(2, xs.shape[2], xs.shape[3], 4)
    torch.testing.assert_close(y, ref.permute(0, 3, 1, 2))
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, conv.weight), g)
    rgx, rgw = torch.autograd.grad(ref.permute(0, 3, 1, 2), (x, conv.weight), g)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gw, rgw)


def test_conv_state_dict_loads_from_a_1x1_conv():
    conv = nn.Conv2d(8, 4, 1, bias=False)
    dyn = DynamicKConv2d(8, 4, k=8)
    dyn.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(dyn(x), conv(x), rtol=1e-5, atol=1e-5)


def test_conv_routed_indices_shape():
    conv = DynamicKConv2d(6, 4, k=2, stride=2)
    idx = conv.routed_indices(torch.randn(3, 6, 5, 5))
    assert idx.shape == (3, 4, 3, 3, 2)


def test_bfloat16_autocast_and_dtypes():
    x = torch.randn(16, 32)
    layer = DynamicKLinear(32, 8, k=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = direct(x.bfloat16().float(), layer.weight.bfloat16().float(), layer.bias.bfloat16().float(), 5)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()
    # plain bfloat16 tensors too
    yb = dynamic_k_linear(x.bfloat16(), layer.weight.detach().bfloat16(), None, 5)
    assert yb.dtype == torch.bfloat16


@pytest.mark.parametrize("k", [0, -1, 33, 2.5, True])
def test_k_out_of_range_names_the_valid_range(k):
    with pytest.raises(ValueError, match=r"1 <= k <= in_features=32|integer in \[1, 32\]"):
        DynamicKLinear(32, 4, k=k)
    with pytest.raises(ValueError, match="32"):
        dynamic_k_linear(torch.randn(2, 32), torch.randn(4, 32), None, k)


def test_wrong_input_rank_or_width_is_a_clear_error():
    layer = DynamicKLinear(10, 3, k=2)
    with pytest.raises(ValueError, match="rank 3"):
        layer(torch.randn(2, 5, 10))
    with pytest.raises(ValueError, match="in_features=10"):
        layer(torch.randn(2, 11))
    with pytest.raises(ValueError, match=r"\(N, 6, H, W\)"):
        DynamicKConv2d(6, 4, k=2)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="dtype"):
        dynamic_k_linear(torch.randn(2, 10, dtype=torch.float64), layer.weight, None, 2)


def test_saved_selection_is_small():
    """Backward keeps (batch, out, k) int16 indices, never the (batch, out, in) products."""
    x = torch.randn(64, 512, requires_grad=True)
    w = torch.randn(100, 512, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = dynamic_k_linear(x, w, None, 5)
    sizes = {tuple(t.shape): t.dtype for t in saved}
    assert sizes == {(64, 512): torch.float32, (100, 512): torch.float32, (64, 100, 5): torch.int16}
    y.sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, w, b = torch.randn(32, 64), torch.randn(10, 64), torch.randn(10)
    y = dynamic_k_linear(x.cuda(), w.cuda(), b.cuda(), 5)
    torch.testing.assert_close(y.cpu(), direct(x, w, b, 5), rtol=1e-4, atol=1e-4)


def test_routing_mask_records_exactly_the_selected_pairs_in_training_mode():
    layer = DynamicKLinear(20, 4, k=3)
    conv = DynamicKConv2d(6, 5, k=2, stride=2)
    x, xc = torch.randn(9, 20), torch.randn(2, 6, 5, 5)
    layer.routing_mask = torch.zeros(4, 20, dtype=torch.bool)
    conv.routing_mask = torch.zeros(5, 6, dtype=torch.bool)
    layer(x)
    conv(xc)
    idx = routed_indices(x, layer.weight.detach(), 3)
    expected = torch.zeros(4, 20, dtype=torch.bool)
    expected[torch.arange(4)[None, :, None].expand_as(idx), idx] = True
    assert torch.equal(layer.routing_mask, expected)
    cidx = conv.routed_indices(xc)  # (N, out, H, W, k)
    cexp = torch.zeros(5, 6, dtype=torch.bool)
    cexp[torch.arange(5)[None, :, None, None, None].expand_as(cidx), cidx] = True
    assert torch.equal(conv.routing_mask, cexp)
    # evaluation-mode forwards do not count
    layer.eval()
    layer.routing_mask.zero_()
    layer(x)
    assert not layer.routing_mask.any()
    with pytest.raises(ValueError, match="routing_mask"):
        dynamic_k_linear(x, layer.weight, None, 3, torch.zeros(4, 19, dtype=torch.bool))
