"""Routing bookkeeping: which weights of each Dynamic-K layer were selected, and how sparse layers are.

`never_routed` (per dynamic layer, share of weights (c, i) never selected by any sample during the
epoch's training steps) is recorded by the layers themselves: each ORs the (c, i) pairs it selects
into a mask (`routing_mask`, see `dka.layers.dynamic_k_linear`), exact and nearly free. Under
torch.compile that in-place bookkeeping would force recompilations, so there forward hooks outside
the graph repeat the selection instead (`dka.layers.routed_indices`, same dtype and tie-breaking; for
the internal 1x1 layers on a rotating subsample of at most `_ROUTING_BUDGET` products per step, a
close upper estimate).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dka.layers import routed_indices
from dka.train.distributed import DistContext, all_reduce

__all__ = ["RoutingTracker", "layer_sparsity", "SPARSITY_THRESHOLD"]

_ROUTING_BUDGET = 1 << 21  # products recomputed per internal layer per step for `never_routed` (~2 M)
SPARSITY_THRESHOLD = 1e-3


class RoutingTracker:
    """Per dynamic layer, a boolean (out, in) mask of the weights selected at least once this epoch.

    Eager mode: the layers fill the masks themselves (`routing_mask`). Compiled: forward hooks
    repeat the selection (see the module docstring).
    """

    def __init__(self, layers: dict[str, nn.Module], compiled: bool = False) -> None:
        self._routed_indices = routed_indices
        self.layers = layers
        self.used: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._compiled = compiled
        self._handles = (
            [module.register_forward_hook(self._hook(name)) for name, module in layers.items()] if compiled else []
        )
        self.reset()

    def reset(self) -> None:
        for name, module in self.layers.items():
            out_features, in_features = module.weight.shape[0], module.weight.shape[1]
            self.used[name] = torch.zeros(out_features, in_features, dtype=torch.bool, device=module.weight.device)
            self._calls[name] = 0
            if not self._compiled:
                module.routing_mask = self.used[name]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not module.training or not torch.is_grad_enabled():
                return
            self._record(name, module, inputs[0].detach())

        # Kept out of torch.compile graphs: the bookkeeping (a Python step counter, in-place scatter
        # into a mask owned here) would otherwise force a recompilation at every step. Only then:
        # importing the compiler costs seconds.
        return torch.compiler.disable(hook) if self._compiled else hook

    def _record(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        weight = module.weight.detach()
        out_features, in_features = weight.shape[0], weight.shape[1]
        weight = weight.reshape(out_features, in_features)
        if x.dim() == 4:  # DynamicKConv2d: every output position is a row; subsample to the budget
            stride = getattr(module, "stride", 1)
            stride = stride[0] if isinstance(stride, tuple) else stride
            rows = x[:, :, ::stride, ::stride].permute(0, 2, 3, 1).reshape(-1, in_features)
            every = max(1, math.ceil(rows.shape[0] * out_features * in_features / _ROUTING_BUDGET))
            if every > 1:
                rows = rows[self._calls[name] % every::every]
        else:
            rows = x
        self._calls[name] += 1
        device_type = rows.device.type
        if torch.is_autocast_enabled(device_type):  # select in the same dtype as the layer does
            dtype = torch.get_autocast_dtype(device_type)
            rows, weight = rows.to(dtype), weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            idx = self._routed_indices(rows.contiguous(), weight.contiguous(), module.k)  # (N, out, k)
        self.used[name].scatter_(1, idx.transpose(0, 1).reshape(out_features, -1), True)

    def routed_masks(self, dist_ctx: DistContext) -> dict[str, torch.Tensor]:
        """Per layer, the bool (out, in) mask of weights selected at least once this epoch on any rank (CPU)."""
        return {name: all_reduce(used.to(torch.uint8), dist_ctx, op="max").bool().cpu()
                for name, used in self.used.items()}

    def never_routed(self, dist_ctx: DistContext, masks: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Per layer, the share of weights never selected this epoch."""
        masks = self.routed_masks(dist_ctx) if masks is None else masks
        return {name: 1.0 - mask.float().mean().item() for name, mask in masks.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self.layers.values():
            module.routing_mask = None


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Share of |w| < 1e-3 for the head and every dynamic layer (the paper's sparsity measure)."""
    layers = {"head": model.head}
    layers.update(model.dynamic_layers())
    return {name: (m.weight.detach().abs() < SPARSITY_THRESHOLD).float().mean().item()
            for name, m in layers.items()}
