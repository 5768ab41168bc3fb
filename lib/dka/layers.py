"""Dynamic-K layers: a linear map where each output sums only its K largest input products.

For an input row x and weight W, output c is

    y[c] = (sum of the K largest values of W[c, i] * x[i] over i) + b[c]

with signed products taken largest first, as in the authors' Algorithm 2. Only the K selected (c, i)
pairs of each sample carry gradient, so every output is routed through K inputs: the dynamic,
routing-like behaviour that makes the paper's final layers sparse and concept-aligned.

The operation and its memory-lean autograd function live in `dka._core`; this module holds the
modules (`DynamicKLinear`, `DynamicKConv2d`), the functional form, and the choice of implementation:
on CUDA, when Triton is available, `dka.kernels` supplies a fused kernel for the same function (set
DKA_DISABLE_TRITON=1 to force the PyTorch path); on CPU, `dka.kernels.cpu` supplies a fused C++
kernel, built at first use (set DKA_DISABLE_CPU_KERNEL=1 to force the PyTorch path). All paths
select the same products, ties included (see `dka._core`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dka._core import DynamicKFunction, check_arguments, check_k, mark_routed, select

__all__ = ["DynamicKLinear", "DynamicKConv2d", "dynamic_k_linear", "routed_indices"]


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
    check_arguments(x, weight, bias, k)
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


def _cpu_kernel_for(x: Tensor):
    """The fused CPU kernel's module when it applies to this tensor, else None."""
    if x.device.type != "cpu":
        return None
    from dka.kernels import cpu

    return cpu if cpu.cpu_kernel_available(x) else None


def _dispatch(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, routing_mask: Tensor | None) -> Tensor:
    fused = _fused_kernel_for(x)
    if fused is None:
        cpu = _cpu_kernel_for(x)
        if cpu is not None:
            return cpu.cpu_dynamic_k_linear(x, weight, bias, k, routing_mask)
        return DynamicKFunction.apply(x, weight, bias, k, routing_mask)
    if routing_mask is not None:  # the fused kernel keeps its selection to itself: select once more
        mark_routed(routing_mask, select(x.detach(), weight.detach(), k, want_indices=True)[1])
    return fused(x, weight, bias, k)


@torch.no_grad()
def routed_indices(x: Tensor, weight: Tensor, k: int) -> Tensor:
    """The K inputs each output of each sample is routed through: LongTensor (batch, out, K).

    Uses the same selection as the forward pass (same chunking, same tie-breaking), so it names
    exactly the (c, i) pairs that received gradient.
    """
    check_arguments(x, weight, None, k)
    if x.dtype != weight.dtype:
        weight = weight.to(x.dtype)
    cpu = _cpu_kernel_for(x)
    pick = cpu.cpu_select if cpu is not None else select
    return pick(x, weight, k, want_indices=True)[1].long()


class DynamicKLinear(nn.Module):
    """Drop-in for `nn.Linear` whose outputs each sum their K largest input products.

    `weight` (out, in) and `bias` (out) are named and shaped as in `nn.Linear`, so a linear layer's
    state_dict loads into it (and back).
    """

    def __init__(self, in_features: int, out_features: int, k: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        check_k(k, in_features)
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
        check_k(k, in_channels)
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
