"""Post-hoc attributions computed with Captum, beside DKA's built-in explanation, scored the same way.

DKA explains a class score exactly: the final layer sums K products ``W[c,i] x_i`` (plus the bias), so
those products *are* the explanation, with no gradient or baseline involved. Post-hoc methods estimate
an explanation of any network. To compare them on equal terms:

- `DynamicKContributions(model, layer)` gives DKA's exact per-unit contributions in Captum's conventions
  (a `captum.attr.LayerAttribution`: ``attribute(inputs, target)`` -> the layer input's shape, summing
  with the bias to the target score). For a linear layer over non-negative pooled features it equals
  Captum's `LayerIntegratedGradients` on the layer input with a zero baseline (the tests check this).
- `attribution_maps(model, images, method)` -> (B, H, W) maps at image resolution: ``"dka"`` (the model's
  own decomposition, `Attribution.pixel_map`), ``"grad_cam"`` (Captum's LayerGradCam on the feature layer)
  and ``"integrated_gradients"`` (Captum's IntegratedGradients on the pixels, summed over channels).
- `localisation(maps, masks)` scores maps against the concept scenes' true masks with `dka.metrics`;
  `class_masks` gives the masks of any class (e.g. the predicted one) for images of a `ConceptTruth`;
  `localisation_table(models, truth, items)` does it for every model and method (notebooks 04, 06).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
from torch import Tensor, nn

from dka.attribution import resolve_target
from dka.layers import routed_indices
from dka.metrics import ConceptTruth, localisation_share, pointing_game

__all__ = ["DynamicKContributions", "attribution_maps", "localisation", "class_masks", "localisation_table",
           "METHODS"]

METHODS = ("dka", "grad_cam", "integrated_gradients")


class DynamicKContributions(LayerAttribution):
    """DKA's exact contributions ``W[c,i] x_i`` of the units a linear layer sums, as a Captum attribution.

    Args:
        forward_func: the model (or any callable whose output row holds the target scores).
        layer: the model's final `DynamicKLinear` or `nn.Linear` (e.g. ``model.head``, ``model.fc``).

    ``attribute(inputs, target)`` returns (B, in_features): for a Dynamic-K layer the K routed products
    of each image's target class (zero elsewhere), for a dense layer all of them. Their sum plus the
    layer's bias is the target score (Captum's completeness convention).
    """

    def __init__(self, forward_func, layer: nn.Module) -> None:
        if not hasattr(layer, "weight") or layer.weight.dim() != 2:
            raise TypeError(f"DynamicKContributions explains a linear layer (DynamicKLinear or nn.Linear); "
                            f"got {type(layer).__name__}")
        super().__init__(forward_func, layer)

    def attribute(self, inputs: Tensor, target=None, additional_forward_args=None,
                  attribute_to_layer_input: bool = True) -> Tensor:
        if not attribute_to_layer_input:
            raise ValueError("a linear layer's contributions are per input unit: use attribute_to_layer_input=True")
        seen = []
        hook = self.layer.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
        try:
            with torch.no_grad():
                extra = () if additional_forward_args is None else tuple(additional_forward_args)
                self.forward_func(inputs, *extra)
        finally:
            hook.remove()
        x, out = seen[-1]
        tgt = resolve_target(out, target)
        weight = self.layer.weight.detach()
        products = weight[tgt] * x.detach()
        k = getattr(self.layer, "k", None)
        if k is None:
            return products
        routed = routed_indices(x.detach(), weight, k)[torch.arange(len(tgt), device=tgt.device), tgt]  # (B, K)
        return torch.zeros_like(products).scatter_(1, routed, products.gather(1, routed))


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h, w) -> (B, H, W), bilinear as `Attribution.pixel_map` does it."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def attribution_maps(model: nn.Module, images: Tensor, method: str, target: Tensor | int | Sequence[int] | None = None,
                     layer: str = "layer4", steps: int = 32, batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """Per-image attribution maps at image resolution and the classes they explain.

    Args:
        model: a classifier; ``"dka"`` needs a dka model (``explain``), ``"grad_cam"`` a module `layer`
            whose output is the last (B, C, h, w) feature map.
        images: (B, 3, H, W) normalised images.
        method: one of `METHODS`.
        target: None (each image's predicted class), an int, or one class per image.
        layer: the feature layer Grad-CAM weighs (dka's ResNets and torchvision's: ``"layer4"``).
        steps: Integrated Gradients' path steps (baseline: the zero image, i.e. the dataset mean).
        batch_size: images per Captum call (bounds memory).

    Returns:
        ((B, H, W) float maps on the CPU, where positive means evidence for the class, (B,) classes).
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = torch.cat([model(chunk.to(device)).float().cpu() for chunk in images.split(batch_size)])
        classes = resolve_target(logits, target)
        maps = [_maps(model, chunk.to(device), tgt.to(device), method, layer, steps)
                for chunk, tgt in zip(images.split(batch_size), classes.split(batch_size))]
    finally:
        model.train(was_training)
    return torch.cat(maps).float().cpu(), classes


def _maps(model: nn.Module, images: Tensor, target: Tensor, method: str, layer: str, steps: int) -> Tensor:
    size = tuple(images.shape[-2:])
    if method == "dka":
        if not callable(getattr(model, "explain", None)):
            raise TypeError(f"{type(model).__name__} has no `explain`: the 'dka' maps need a dka model "
                            "(dka.build / dka.load_model); use 'grad_cam' or 'integrated_gradients' for others")
        return model.explain(images, target).pixel_map(size)
    if method == "grad_cam":
        cam = LayerGradCam(model, model.get_submodule(layer)).attribute(images, target=target)
        return _upsample(cam[:, 0].detach(), size)
    ig = IntegratedGradients(model).attribute(images, baselines=torch.zeros_like(images), target=target,
                                              n_steps=steps, internal_batch_size=len(images) * 8)
    return ig.detach().sum(1)


def localisation(maps: Tensor, masks: Tensor) -> dict[str, float]:
    """Mean and sd of the positive attribution's share inside the masks, pointing-game rate, mask area.

    `mask_area` is the share a uniform map would get (the chance level of `share`); images whose map has
    no positive mass are left out of `share` (`images` counts those kept).
    """
    share = localisation_share(maps, masks)
    kept = ~share.isnan()
    area = masks.flatten(1).float().mean(1)
    return {"share": float(share[kept].mean()) if kept.any() else float("nan"),
            "share_sd": float(share[kept].std()) if int(kept.sum()) > 1 else float("nan"),
            "pointing": float(pointing_game(maps, masks).float().mean()),
            "mask_area": float(area.mean()), "images": int(kept.sum())}


def class_masks(truth: ConceptTruth, items: Sequence[int], classes: Sequence[int] | Tensor) -> Tensor:
    """(B, H, W) bool: in image `items[b]` of `truth`, the pixels of class `classes[b]`'s true concepts."""
    if len(items) != len(classes):
        raise ValueError(f"{len(items)} images but {len(classes)} classes: give one class per image")
    masks = []
    for j, c in zip(items, classes):
        index, _ = truth.items[int(j)]
        item = truth.broden[index]
        masks.append(truth.mask(item["seg"], item["image_labels"], int(c)))
    return torch.stack(masks)


def localisation_table(models: Mapping[str, nn.Module], truth: ConceptTruth, items: Sequence[int],
                       methods: Sequence[str] = METHODS, **options) -> pd.DataFrame:
    """One row per (model, method): `localisation` of the maps explaining each model's predicted class.

    Args:
        models: name -> model (methods a model cannot do, e.g. "dka" without `explain`, are skipped).
        truth: the concept scenes' split with true masks; `items` are indices into it.
        methods: a subset of `METHODS`.
        options: passed to `attribution_maps` (layer, steps, batch_size).

    Columns: model, method, share, share_sd, pointing, mask_area, images, accuracy (of the models on
    these images, %).
    """
    batch = ConceptTruth.collate([truth[int(j)] for j in items])
    rows = []
    for name, model in models.items():
        for method in methods:
            if method == "dka" and not callable(getattr(model, "explain", None)):
                continue
            maps, classes = attribution_maps(model, batch["image"], method, **options)
            masks = class_masks(truth, batch["index"].tolist(), classes)
            rows.append({"model": name, "method": method, **localisation(maps, masks),
                         "accuracy": 100 * float((classes == batch["label"]).float().mean())})
    return pd.DataFrame(rows)
