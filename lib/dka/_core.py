"""The Dynamic-K operation itself: selection of the K largest products and its autograd function.

For an input row x and weight W, output c is

    y[c] = (sum of the K largest values of W[c, i] * x[i] over i) + b[c]

with signed products taken largest first, as in the authors' Algorithm 2. Only the K selected (c, i)
pairs of each sample carry gradient.

Ties: among equal products the lower input index is selected first (-0.0 equals +0.0), on every
path: this module, the CPU kernel and the Triton kernel. `torch.topk` follows no rule of its own
here: on CPU it picks among equal values by std::partial_sort's heap order (K * 64 <= in) or by
std::nth_element (otherwise), e.g. 32 of 128 equal products come back as indices 65..96. So
`select` re-picks the indices wherever equal products straddle the K-th place (post-ReLU zeros
with K above the positive products; equal bf16-rounded products). Among NaN products (the output
is NaN either way) the pick is left to topk.

Why a custom autograd function: written directly, `(x[:, None, :] * W).topk(k).values.sum(-1)` keeps
the whole (batch, out, in) product tensor alive for backward and its backward builds another one of
the same size. Here the forward walks through the products in bounded chunks and keeps only the
(batch, out, K) selected indices (int16 when `in` allows), and the backward gathers and scatters
through those indices: memory O(batch x out x K) instead of O(batch x out x in).

This module is the bottom of the package: `dka.kernels` (fused implementations) and `dka.layers`
(the modules and the dispatch between implementations) import it, it imports neither.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DynamicKFunction", "select", "mark_routed", "check_arguments", "check_k",
           "CHUNK_ELEMENTS", "BACKWARD_CHUNK_ELEMENTS"]

# Elements of the product tensor materialised at once in the forward pass (4 MiB in float32):
# small enough to stay in cache on a CPU, large enough to amortise the per-chunk overhead.
CHUNK_ELEMENTS = 1 << 20
# Elements of the (rows, out, K) selection processed at once in the backward pass.
BACKWARD_CHUNK_ELEMENTS = 1 << 22


def check_arguments(x: Tensor, weight: Tensor, bias: Tensor | None, k: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features); got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    check_k(k, in_features)
    if x.dim() != 2:
        raise ValueError(
            f"input must have shape (batch, in_features={in_features}); got rank {x.dim()} shape "
            f"{tuple(x.shape)} (flatten leading dimensions first, e.g. x.flatten(0, -2))"
        )
    if x.shape[1] != in_features:
        raise ValueError(f"input has {x.shape[1]} features but the layer expects in_features={in_features}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},); got {tuple(bias.shape)}")


def check_k(k: int, in_features: int) -> None:
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


def select(x: Tensor, weight: Tensor, k: int, want_indices: bool) -> tuple[Tensor, Tensor | None]:
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
    out_step = max(1, min(out_features, CHUNK_ELEMENTS // in_features))
    row_step = max(1, CHUNK_ELEMENTS // (out_step * in_features))
    for outs in _chunks(out_features, out_step):
        w = weight[outs].unsqueeze(0)
        for rows in _chunks(batch, row_step):
            products = x[rows].unsqueeze(1) * w
            values, idx = products.topk(k, dim=-1, sorted=False)
            sums[rows, outs] = values.sum(-1, dtype=acc)
            if indices is not None:
                indices[rows, outs] = _lowest_index_ties(products, values, idx, k).to(indices.dtype)
    return sums, indices


def _lowest_index_ties(products: Tensor, values: Tensor, idx: Tensor, k: int) -> Tensor:
    """topk's indices, re-picked lowest index first where equal products straddle the K-th place."""
    kth = values.amin(-1, keepdim=True)
    straddle = (products == kth).sum(-1) > (values == kth).sum(-1)
    if not straddle.any():
        return idx
    p, t = products[straddle], kth[straddle]
    above, tied = p > t, p == t
    take = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
    idx = idx.clone()
    idx[straddle] = take.nonzero()[:, 1].view(-1, k)  # exactly k per row, in input order
    return idx


class DynamicKFunction(torch.autograd.Function):
    """Autograd through the saved selection only (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, k: int,
                routing_mask: Tensor | None = None) -> Tensor:
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        sums, indices = select(x, weight, k, want_indices=need_grad or routing_mask is not None)
        if routing_mask is not None:
            mark_routed(routing_mask, indices)
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
        rows_step = BACKWARD_CHUNK_ELEMENTS // (out_features * k)
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


def mark_routed(routing_mask: Tensor, indices: Tensor) -> None:
    """routing_mask[c, i] |= (some row routed output c through input i)."""
    out_features = indices.shape[1]
    for rows in _chunks(indices.shape[0], BACKWARD_CHUNK_ELEMENTS // (out_features * indices.shape[2])):
        idx = indices[rows].long().transpose(0, 1).reshape(out_features, -1)
        routing_mask.scatter_(1, idx, True)
