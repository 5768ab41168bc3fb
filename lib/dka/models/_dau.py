"""Dynamic Alignment Units (Böhle, Fritz, Schiele, CVPR 2021): the layers CoDA-Nets are built from.

A DAU computes its weight vector from its input, ``w(x) = g(B C x + b)`` (C: D -> r, B: r -> D per unit,
rank r), and outputs ``w(x)^T x``. The non-linearity g only rescales: ``g(v) = v * s(||v||^2)`` with

- ``"squash"`` (the paper's default, the capsule squashing): ``||g(v)|| = ||v||^2 / (1 + ||v||^2) < 1``;
- ``"l2"``: ``||g(v)|| = 1``.

With ``||w(x)|| <= 1`` a unit can only produce a large output by pointing w(x) at x (alignment). As the
output is ``w(x)^T x`` with nothing after it, a stack of DAU layers with no non-linearity in between is a
*dynamic linear* map: the output is ``W(x) x`` exactly, with ``W(x)`` the product of the layers' dynamic
matrices. `frozen=True` in `forward` treats the dynamic weights as constants (no gradient through them),
so the gradient of an output with respect to the input is exactly that row of ``W(x)``.

`DALayer` is the definition, on vectors: it materialises ``w(x)`` (N, out, D). `DAUConv2d` applies the same
units to every k x k patch of an image without materialising the (N, out, D, h, w) weights; it uses

    w_j(x)^T x = u^T (B_j^T x) + b_j^T x,            u = C x,
    ||B_j u + b_j||^2 = u^T (B_j^T B_j) u + 2 (B_j^T b_j)^T u + ||b_j||^2,

so a layer is one convolution of x (for u, every B_j^T x and every b_j^T x) plus a 1x1 convolution of u
with the per-unit Gram matrices: r/D of the memory (9x less for 3x3 kernels over 64 channels at r = 64)
for the same arithmetic. The norm is computed in float32 also under bf16 autocast (the expansion
cancels terms). `tests/test_coda.py` checks the convolution against `DALayer` on every patch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NORMS", "bounded_scale", "DALayer", "DAUConv2d"]

NORMS = ("squash", "l2")
_EPS = 1e-12  # floor of ||v||^2: g(0) is undefined for "l2"; v = 0 exactly has measure zero


def bounded_scale(sq_norm: Tensor, norm: str) -> Tensor:
    """The factor s with g(v) = v * s, from ``sq_norm = ||v||^2`` (see the module docstring)."""
    sq = sq_norm.clamp_min(_EPS)
    if norm == "squash":
        return sq.sqrt() / (1.0 + sq)
    if norm == "l2":
        return sq.rsqrt()
    raise ValueError(f"unknown DAU norm {norm!r}; valid: {', '.join(NORMS)}")


def _check(in_features: int, out_features: int, rank: int, norm: str) -> None:
    if min(in_features, out_features, rank) < 1:
        raise ValueError(f"in/out features and rank must be positive; got {in_features}, {out_features}, {rank}")
    if norm not in NORMS:
        raise ValueError(f"unknown DAU norm {norm!r}; valid: {', '.join(NORMS)}")


class _Factors(nn.Module):
    """The parameters shared by both layer kinds: C (r, D), B (out, r, D), b (out, D)."""

    def __init__(self, dim: int, out_features: int, rank: int, norm: str):
        super().__init__()
        _check(dim, out_features, rank, norm)
        self.dim, self.out_features, self.rank, self.norm = dim, out_features, rank, norm
        self.reduce = nn.Parameter(torch.empty(rank, dim))  # C
        self.expand = nn.Parameter(torch.empty(out_features, rank, dim))  # B_j^T, row r = B_j[:, r]
        self.bias = nn.Parameter(torch.empty(out_features, dim))  # b_j
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PyTorch's default for the two convolutions of the authors' formulation: U(+-1/sqrt(fan_in))
        nn.init.uniform_(self.reduce, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.expand, -1 / math.sqrt(self.rank), 1 / math.sqrt(self.rank))
        nn.init.uniform_(self.bias, -1 / math.sqrt(self.rank), 1 / math.sqrt(self.rank))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, out={self.out_features}, rank={self.rank}, norm={self.norm!r}"


class DALayer(_Factors):
    """A Dynamic Alignment layer over vectors: ``out_j = g(B_j C x + b_j)^T x`` for j < out_features."""

    def __init__(self, in_features: int, out_features: int, rank: int, norm: str = "squash"):
        super().__init__(in_features, out_features, rank, norm)

    def dynamic_weights(self, x: Tensor) -> Tensor:
        """(N, out, D) the bounded weight vectors w_j(x) = g(B_j C x + b_j) of inputs x (N, D)."""
        u = x @ self.reduce.t()
        v = torch.einsum("nr,jrd->njd", u, self.expand) + self.bias
        return v * bounded_scale((v * v).sum(-1, keepdim=True), self.norm)

    def forward(self, x: Tensor, frozen: bool = False) -> Tensor:
        w = self.dynamic_weights(x)
        return torch.einsum("njd,nd->nj", w.detach() if frozen else w, x)


class DAUConv2d(_Factors):
    """A CoDA layer: the DAUs of a `DALayer` with D = in_channels * k * k applied to every k x k patch.

    The patch vector is ordered as `F.unfold` orders it (channel, row, column), so
    ``DAUConv2d(...)(x)[:, :, i, j]`` equals ``layer.as_patch_layer()(patch)`` for the patch at (i, j).
    """

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, norm: str = "squash"):
        if kernel_size < 1 or stride < 1:
            raise ValueError(f"kernel_size and stride must be positive; got {kernel_size} and {stride}")
        super().__init__(in_channels * kernel_size * kernel_size, out_channels, rank, norm)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.padding = (kernel_size - 1) // 2 if padding is None else padding

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, rank={self.rank}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, norm={self.norm!r}")

    def as_patch_layer(self) -> DALayer:
        """A `DALayer` over unfolded patches that shares this layer's parameters (the definition)."""
        layer = DALayer.__new__(DALayer)
        nn.Module.__init__(layer)
        layer.dim, layer.out_features, layer.rank, layer.norm = self.dim, self.out_features, self.rank, self.norm
        layer.reduce, layer.expand, layer.bias = self.reduce, self.expand, self.bias
        return layer

    def squared_norms(self, u: Tensor) -> Tensor:
        """(P, out) ||B_j u + b_j||^2 for rows u = C x (P, r), by the Gram expansion, in float32 or better
        (float64 stays float64)."""
        dtype = torch.promote_types(u.dtype, torch.float32)
        with torch.autocast(u.device.type, enabled=False):
            u = u.to(dtype)
            expand, bias = self.expand.to(dtype), self.bias.to(dtype)
            gram = torch.einsum("jrd,jsd->jrs", expand, expand).reshape(-1, self.rank)
            cross = 2 * torch.einsum("jrd,jd->jr", expand, bias).reshape(-1)
            gu = torch.addmm(cross, u, gram.t())  # (P, out * r): G_j u + 2 B_j^T b_j
            quad = torch.bmm(gu.view(-1, self.out_features, self.rank), u.unsqueeze(2)).squeeze(2)
            return quad + (bias * bias).sum(1)

    def forward(self, x: Tensor, frozen: bool = False) -> Tensor:
        k, out, r = self.kernel_size, self.out_features, self.rank
        filters = torch.cat([self.reduce, self.expand.reshape(out * r, -1), self.bias])
        y = F.conv2d(x, filters.view(-1, self.in_channels, k, k), stride=self.stride, padding=self.padding)
        n, _, h, w = y.shape
        # one row per position (free for channels_last maps, which the trainer uses)
        rows = y.permute(0, 2, 3, 1).reshape(n * h * w, -1)
        u, proj, bx = rows.split([r, out * r, out], dim=1)  # C x, B_j^T x, b_j^T x at every position
        if frozen:
            u = u.detach()
        aligned = torch.bmm(proj.reshape(-1, out, r), u.unsqueeze(2)).squeeze(2) + bx  # (B_j u + b_j)^T x
        scale = bounded_scale(self.squared_norms(u), self.norm)
        return (aligned * scale.to(aligned.dtype)).view(n, h, w, out).permute(0, 3, 1, 2)
