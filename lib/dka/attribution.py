"""What an explanation is: the Attribution record and the exact decomposition of a linear head.

The paper's Fig. 7: the final layer's score decomposes exactly over its inputs,
``y_c = sum_i W[c,i] x_i + b_c`` (dense head) or ``y_c = sum_{i in R_c(x)} W[c,i] x_i + b_c`` with
``R_c(x)`` the K routed inputs (Dynamic-K head). So ``W[c,i] x_i / y_c`` is unit i's share of the
score; for a DKA head a handful of routed units carry all of it, while a dense head spreads it.

This module sits below `dka.models` (B-cos style): a model implements ``explain(x, target)`` with
these pieces, and nothing here imports a model. `dka.explain.attribute(model, x, target)` is the
model-agnostic entry point; tables and reports build on the Attribution it returns.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dka.layers import routed_indices

__all__ = ["Attribution", "decompose_linear_head", "resolve_target", "inference_mode"]


@dataclass
class Attribution:
    """Unit contributions of a batch of images to their target classes (one target per image).

    All tensors are on the CPU, float32 (a model may keep float64 when it runs in float64, as CoDA-Nets do
    for exact checks). Units are 0-based here (tally units are 1-based).
    """

    target: Tensor  # (B,) long: the explained class per image
    logits: Tensor  # (B, classes)
    score: Tensor  # (B,) y_c of the target
    bias: Tensor  # (B,) b_c of the target (0 without bias)
    activations: Tensor  # (B, U) pooled x_i
    products: Tensor  # (B, U) W[c, i] * x_i
    contributions: Tensor  # (B, U) W[c, i] * x_i / y_c over all units (the paper's Fig. 7 definition)
    effective: Tensor  # (B, U) contributions of the units the head actually sums (dense: = contributions)
    feature_maps: Tensor  # (B, U, h, w) the unit maps the head pools
    routed: Tensor | None = None  # (B, K) units routed for the target (Dynamic-K head), by product desc.
    routed_contributions: Tensor | None = None  # (B, K) their contributions
    k: int | None = None
    spatial: Tensor | None = None  # (B, h, w) where the explained score sits; sums to score - bias

    def pixel_map(self, size: tuple[int, int]) -> Tensor:
        """(B, H, W) the `spatial` contribution map resized onto the image (bilinear), for localisation.

        Values are densities, not sums: compare shares of it across pixels, not its total with the score.
        """
        if self.spatial is None:
            raise ValueError("this explanation has no spatial contribution map")
        if tuple(self.spatial.shape[-2:]) == tuple(size):
            return self.spatial
        return F.interpolate(self.spatial[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    @property
    def dynamic(self) -> bool:
        return self.routed is not None

    def top_units(self, n: int = 5) -> tuple[Tensor, Tensor]:
        """(B, n) units with the largest contributions the head actually uses, and those contributions."""
        n = self._check_n(n)
        values, units = self.effective.topk(n, dim=1)
        return units, values

    def residual(self, n: int = 5) -> Tensor:
        """(B,) share of y_c the top-n units leave unexplained: 1 - sum of their contributions.

        It includes the bias share b_c / y_c; for a Dynamic-K head with n >= K it is exactly that.
        """
        return 1.0 - self.top_units(n)[1].sum(dim=1)

    def heatmaps(self, units: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, n, H, W) maps of the given units (B, n) upsampled bilinearly onto the image, in [0, 1]."""
        maps = self.feature_maps.gather(1, units[:, :, None, None].expand(-1, -1, *self.feature_maps.shape[2:]))
        up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        top = up.flatten(2).amax(dim=2).clamp_min(1e-12)[:, :, None, None]
        return (up / top).clamp(0, 1)

    def _check_n(self, n: int) -> int:
        units = self.effective.shape[1]
        if not 1 <= n <= units:
            raise ValueError(f"n={n} is out of range: choose 1 <= n <= {units} (the head's inputs)")
        return n


@contextmanager
def inference_mode(model: nn.Module):
    """Eval mode and no autograd for the duration; the model's train/eval state is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def resolve_target(logits: Tensor, target: Tensor | int | Sequence[int] | None) -> Tensor:
    """(B,) classes to explain: the predicted class (None), one class for all (int), or one per image."""
    b, n_cls = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    tgt = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
    if tgt.numel() == 1:
        tgt = tgt.expand(b)
    if tgt.numel() != b:
        raise ValueError(f"target has {tgt.numel()} entries for {b} images; give one per image or one for all")
    if int(tgt.min()) < 0 or int(tgt.max()) >= n_cls:
        raise ValueError(f"target out of range: classes are 0..{n_cls - 1}")
    return tgt.clone()


def decompose_linear_head(fmap: Tensor, pooled: Tensor, logits: Tensor, head: nn.Module,
                          target: Tensor | int | Sequence[int] | None = None) -> Attribution:
    """Decompose each image's target-class score over the inputs of a linear (dense or Dynamic-K) head.

    Args:
        fmap: (B, U, h, w) the feature maps the head's inputs are pooled from.
        pooled: (B, U) the head's inputs x_i.
        logits: (B, classes) the head's outputs for `pooled`.
        head: `nn.Linear` or `dka.layers.DynamicKLinear` (anything with `weight`, optional `bias`
            and, for a Dynamic-K head, `k`).
        target: see `resolve_target`.

    Returns:
        An Attribution whose contributions sum (with the bias share) to 1 for every image.
    """
    fmap, pooled, logits = fmap.float(), pooled.float(), logits.float()
    b = logits.shape[0]
    tgt = resolve_target(logits, target)
    weight = head.weight.float()[tgt]  # (B, U)
    bias = head.bias.float()[tgt] if getattr(head, "bias", None) is not None else torch.zeros(b, device=weight.device)
    products = weight * pooled
    score = logits.gather(1, tgt[:, None])[:, 0]
    contributions = products / score[:, None]
    k = getattr(head, "k", None)
    routed = routed_contrib = None
    if k is not None:
        all_routed = routed_indices(pooled, head.weight, k)  # (B, classes, K)
        routed = all_routed[torch.arange(b, device=all_routed.device), tgt]  # (B, K)
        order = products.gather(1, routed).argsort(dim=1, descending=True)
        routed = routed.gather(1, order)
        routed_contrib = contributions.gather(1, routed)
        effective = torch.zeros_like(contributions).scatter_(1, routed, routed_contrib)
    else:
        effective = contributions
    # where the explained part of the score sits: sum_i used(i) W[c,i] fmap_i(h, w) / (h w), which sums over
    # positions to score - bias because the pooled x_i is the mean of fmap_i
    used = weight if routed is None else weight * torch.zeros_like(weight).scatter_(1, routed, 1.0)
    spatial = torch.einsum("bu,buhw->bhw", used, fmap) / (fmap.shape[-2] * fmap.shape[-1])
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    return Attribution(
        target=cpu(tgt), logits=cpu(logits), score=cpu(score), bias=cpu(bias), activations=cpu(pooled),
        products=cpu(products), contributions=cpu(contributions), effective=cpu(effective),
        feature_maps=cpu(fmap), routed=cpu(routed), routed_contributions=cpu(routed_contrib), k=k,
        spatial=cpu(spatial),
    )
