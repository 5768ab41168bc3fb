"""Dynamic-K layers: a linear map where each output sums only its K largest input products.

For an input row x and weight W, output c is

    y[c] = (sum of the K largest values of W[c, i] * x[i] over i) + b[c]

with signed products taken largest first, as in the authors' Algorithm 2. Only the K selected (c, i)
pairs of each sample carry gradient, so every output is routed through K inputs: the dynamic,
routing-like behaviour that makes the paper's final layers sparse and concept-aligned.

Why a custom autograd function: written directly, `(x[:, None, :] * W).topk(k).values.sum(-1)` keeps
the whole (batch, out, in) product tensor alive for backward and its backward builds another one of
the same size. Here the forward walks through the products in bounded chunks and keeps only the
(batch, out, K) selected indices (int16 when `in` allows), and the backward gathers and scatters
through those indices: memory O(batch x out x K) instead of O(batch x out x in).

On CUDA, when Triton is available, `dka.kernels` supplies a fused kernel for the same function
(set DKA_DISABLE_TRITON=1 to force this PyTorch path).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["DynamicKLinear", "DynamicKConv2d", "dynamic_k_linear", "routed_indices"]

# Elements of the product tensor materialised at once in the forward pass (4 MiB in float32):
# small enough to stay in cache on a CPU, large enough to amortise the per-chunk overhead.
_CHUNK_ELEMENTS = 1 << 20
# Elements of the (rows, out, K) selection processed at once in the backward pass.
_BACKWARD_CHUNK_ELEMENTS = 1 << 22


def _check_arguments(x: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features); got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    _check_k(k, in_features)
    if x.dim() != 2:
        raise ValueError(
            f"input must have shape (batch, in_features={in_features}); got rank {x.dim()} shape "
            f"{tuple(x.shape)} (flatten leading dimensions first, e.g. x.flatten(0, -2))"
        )
    if x.shape[1] != in_features:
        raise ValueError(f"input has {x.shape[1]} features but the layer expects in_features={in_features}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},); got {tuple(bias.shape)}")


def _check_k(k: int, in_features: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an integer in [1, {in_features}]; got {k!r}")
    if not 1 <= k <= in_features:
        raise ValueError(f"k={k} is out of range: it must satisfy 1 <= k <= in_features={in_features}")


def _index_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunks(total: int, per_chunk: int):
    per_chunk = max(1, per_chunk)
    for start in range(0, total, per_chunk):
        yield slice(start, min(total, start + per_chunk))


def _select(x: Tensor, weight: Tensor, k: int, want_indices: bool) -> tuple[Tensor, Tensor | None]:
    """Top-k sums (at least float32) and, optionally, the selected indices, chunk by chunk."""
    batch, in_features = x.shape
    out_features = weight.shape[0]
    acc = _accumulation_dtype(x.dtype)
    sums = torch.empty(batch, out_features, dtype=acc, device=x.device)
    indices = (
        torch.empty(batch, out_features, k, dtype=_index_dtype(in_features), device=x.device)
        if want_indices
        else None
    )
    # Chunk over outputs only when one row's products alone exceed the budget (very wide layers).
    out_step = max(1, min(out_features, _CHUNK_ELEMENTS // in_features))
    row_step = max(1, _CHUNK_ELEMENTS // (out_step * in_features))
    for outs in _chunks(out_features, out_step):
        w = weight[outs].unsqueeze(0)
        for rows in _chunks(batch, row_step):
            products = x[rows].unsqueeze(1) * w
            values, idx = products.topk(k, dim=-1, sorted=False)
            sums[rows, outs] = values.sum(-1, dtype=acc)
            if indices is not None:
                indices[rows, outs] = idx.to(indices.dtype)
    return sums, indices


class _DynamicKFunction(torch.autograd.Function):
    """Autograd through the saved selection only (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, k: int,
                routing_mask: Tensor | None = None) -> Tensor:
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        sums, indices = _select(x, weight, k, want_indices=need_grad or routing_mask is not None)
        if routing_mask is not None:
            _mark_routed(routing_mask, indices)
        if bias is not None:
            sums += bias.to(sums.dtype)
        if need_grad:
            ctx.save_for_backward(x, weight, indices)
        ctx.has_bias = bias is not None
        return sums.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x = grad_w = grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return grad_x, grad_w, grad_b, None, None
        x, weight, indices = ctx.saved_tensors
        batch, in_features = x.shape
        out_features, k = indices.shape[1], indices.shape[2]
        acc = _accumulation_dtype(x.dtype)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = torch.zeros(batch, in_features, dtype=acc, device=x.device) if want_x else None
        gw = torch.zeros(out_features * in_features, dtype=acc, device=x.device) if want_w else None
        rows_step = _BACKWARD_CHUNK_ELEMENTS // (out_features * k)
        out_offsets = (torch.arange(out_features, device=x.device) * in_features).view(1, -1, 1)
        grad_out = grad_out.to(acc)
        w_acc = weight.to(acc) if want_x else None
        for rows in _chunks(batch, rows_step):
            idx = indices[rows].long()  # (r, out, k)
            n = idx.shape[0]
            g = grad_out[rows].unsqueeze(-1)  # (r, out, 1)
            flat_idx = idx.view(n, out_features * k)
            if want_x:
                w_sel = w_acc.gather(1, idx.transpose(0, 1).reshape(out_features, n * k))
                w_sel = w_sel.view(out_features, n, k).transpose(0, 1)  # W[c, idx[b, c, j]]
                gx[rows].scatter_add_(1, flat_idx, (g * w_sel).reshape(n, out_features * k))
            if want_w:
                x_sel = x[rows].to(acc).gather(1, flat_idx).view(n, out_features, k)  # x[b, idx[b, c, j]]
                gw.scatter_add_(0, (idx + out_offsets).reshape(-1), (g * x_sel).reshape(-1))
        if want_x:
            grad_x = gx.to(x.dtype)
        if want_w:
            grad_w = gw.view(out_features, in_features).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


def _mark_routed(routing_mask: Tensor, indices: Tensor) -> None:
    """routing_mask[c, i] |= (some row routed output c through input i)."""
    out_features = indices.shape[1]
    for rows in _chunks(indices.shape[0], _BACKWARD_CHUNK_ELEMENTS // (out_features * indices.shape[2])):
        idx = indices[rows].long().transpose(0, 1).reshape(out_features, -1)
        routing_mask.scatter_(1, idx, True)


def _fused_kernel_for(x: Tensor):
    """The Triton implementation when it applies to this tensor (CUDA + triton), else None."""
    if not x.is_cuda:
        return None
    try:
        from dka import kernels
    except ImportError:
        return None
    return kernels.fused_dynamic_k_linear if kernels.fused_available(x) else None


def dynamic_k_linear(x: Tensor, weight: Tensor, bias: Tensor | None, k: int,
                     routing_mask: Tensor | None = None) -> Tensor:
    """Functional Dynamic-K linear map: `x` (batch, in), `weight` (out, in), `bias` (out) or None.

    Under autocast the inputs are cast to the autocast dtype, as `nn.Linear` would be; the K
    products are summed in float32 either way. `routing_mask`, a bool (out, in) tensor, is OR-ed
    with the pairs this call selects: how the trainer counts weights that were never routed,
    exactly and without repeating the selection.
    """
    _check_arguments(x, weight, bias, k)
    if routing_mask is not None and (routing_mask.shape != weight.shape or routing_mask.dtype != torch.bool):
        raise ValueError(f"routing_mask must be a bool tensor of shape {tuple(weight.shape)}; "
                         f"got {routing_mask.dtype} {tuple(routing_mask.shape)}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _dispatch(x, weight, bias, k, routing_mask)
    if x.dtype != weight.dtype:
        raise ValueError(
            f"input dtype {x.dtype} differs from weight dtype {weight.dtype}; cast one of them "
            "or run under torch.autocast"
        )
    return _dispatch(x, weight, bias, k, routing_mask)


def _dispatch(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, routing_mask: Tensor | None) -> Tensor:
    fused = _fused_kernel_for(x)
    if fused is None:
        return _DynamicKFunction.apply(x, weight, bias, k, routing_mask)
    if routing_mask is not None:  # the fused kernel keeps its selection to itself: select once more
        _mark_routed(routing_mask, _select(x.detach(), weight.detach(), k, want_indices=True)[1])
    return fused(x, weight, bias, k)


@torch.no_grad()
def routed_indices(x: Tensor, weight: Tensor, k: int) -> Tensor:
    """The K inputs each output of each sample is routed through: LongTensor (batch, out, K).

    Uses the same selection as the forward pass (same chunking, same tie-breaking), so it names
    exactly the (c, i) pairs that received gradient.
    """
    _check_arguments(x, weight, None, k)
    if x.dtype != weight.dtype:
        weight = weight.to(x.dtype)
    return _select(x, weight, k, want_indices=True)[1].long()


class DynamicKLinear(nn.Module):
    """Drop-in for `nn.Linear` whose outputs each sum their K largest input products.

    `weight` (out, in) and `bias` (out) are named and shaped as in `nn.Linear`, so a linear layer's
    state_dict loads into it (and back).
    """

    def __init__(self, in_features: int, out_features: int, k: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        _check_k(k, in_features)
        self.in_features, self.out_features, self.k = in_features, out_features, k
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.routing_mask: Tensor | None = None  # see `dynamic_k_linear`; filled in training mode only
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, so dense and dynamic heads start from the same distribution.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        mask = self.routing_mask if self.training else None
        return dynamic_k_linear(x, self.weight, self.bias, self.k, mask)

    def routed_indices(self, x: Tensor) -> Tensor:
        return routed_indices(x, self.weight, self.k)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, bias={self.bias is not None}"


class DynamicKConv2d(nn.Module):
    """A 1x1 convolution applying the Dynamic-K rule independently at every output position.

    Used by the supplement's internal layers (res18-d[32,32,5]a). `weight` has `nn.Conv2d`'s shape
    (out, in, 1, 1) so a 1x1 convolution's state_dict loads into it. A stride s samples the input at
    every s-th position, exactly as a strided 1x1 convolution without padding does.
    """

    def __init__(self, in_channels: int, out_channels: int, k: int, stride: int = 1, bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        _check_k(k, in_channels)
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive integer; got {stride!r}")
        self.in_channels, self.out_channels, self.k, self.stride = in_channels, out_channels, k, stride
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.routing_mask: Tensor | None = None  # bool (out, in); see `dynamic_k_linear`
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels)
            nn.init.uniform_(self.bias, -bound, bound)

    def _rows(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"input must have shape (N, {self.in_channels}, H, W); got {tuple(x.shape)}"
            )
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        n, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(n * h * w, c), (n, h, w)

    def forward(self, x: Tensor) -> Tensor:
        rows, (n, h, w) = self._rows(x)
        weight = self.weight.view(self.out_channels, self.in_channels)
        mask = self.routing_mask if self.training else None
        y = dynamic_k_linear(rows, weight, self.bias, self.k, mask)
        # (N, H, W, C) viewed as NCHW: channels_last memory, which convolutions downstream accept.
        return y.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)

    def routed_indices(self, x: Tensor) -> Tensor:
        """Selected input channels per output position: LongTensor (N, out, H', W', K)."""
        rows, (n, h, w) = self._rows(x)
        idx = routed_indices(rows, self.weight.view(self.out_channels, self.in_channels), self.k)
        return idx.view(n, h, w, self.out_channels, self.k).permute(0, 3, 1, 2, 4)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, k={self.k}, kernel_size=(1, 1), "
                f"stride={self.stride}, bias={self.bias is not None}")
