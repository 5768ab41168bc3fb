"""Every interpretable-by-design method scored the same way, against the concept scenes' ground truth.

`score_run` takes one trained model (any dka family, or a dense model with a post-hoc explanation) and
measures on the same concept-scenes test split what notebook 06 compares:

- explanation localisation (share of the predicted class's positive attribution inside its true concepts,
  and the pointing game) and faithfulness (deletion-curve area), on the model's own explanation or the
  given post-hoc one (`dka.metrics`);
- Network Dissection of the model's last feature map (`feature_layer`): interpretable units, unique
  concepts, mean IoU;
- for models whose last layer maps pooled units to classes: concepts per class (80% rule, on the weights
  that route), concept recovery against `class_concepts.csv`, and the residual the top units leave of a
  class score (the paper's definition, `dka.evaluation.residuals`).

A method without a unit -> class layer (e.g. CoDA-Nets) gets NaN in those columns, and the table says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from dka import concepts, evaluation
from dka.dissection import dissect, tally_summary
from dka.metrics import ConceptTruth, score_explanations

__all__ = ["own_explanation", "score_run", "feature_layer", "SCORE_COLUMNS"]

SCORE_COLUMNS = ("localisation", "pointing game", "deletion AUC", "interpretable units (%)", "unique concepts",
                 "mean IoU", "concepts per class", "classes <= 5 concepts (%)", "recovery precision",
                 "recovery recall", "residual top-5 (paper)")


def own_explanation(model: nn.Module, images: Tensor, classes: Tensor) -> Tensor:
    """The model's own explanation of `classes` as (B, H, W) maps at image resolution."""
    return model.explain(images, classes).pixel_map(tuple(images.shape[-2:]))


def feature_layer(model: nn.Module) -> str:
    """The module whose output is the model's last feature map (what dissection labels)."""
    return str(getattr(model, "feature_layer", "layer4"))


def _linear_head(model: nn.Module):
    head = getattr(model, "head", None)
    weight = getattr(head, "weight", None)
    return head if weight is not None and weight.dim() == 2 and hasattr(model, "pool") else None


def score_run(model: nn.Module, truth: ConceptTruth, broden_root: str | Path,
              explain: Callable[[nn.Module, Tensor, Tensor], Tensor] = own_explanation, routed: dict | None = None,
              eval_images: int | None = None, batch_size: int = 64, share: float = 0.8, max_concepts: int = 5,
              residual_n: int = 5, device: str = "cpu", progress: bool = False) -> dict[str, float]:
    """All of notebook 06's numbers for one trained model (see the module docstring).

    Args:
        model: the trained model, on `device`.
        truth: the concept-scenes test split (`ConceptTruth(root, "test")`).
        broden_root: the scenes export, dissected in Broden's format.
        explain: ``explain(model, images, classes) -> (B, H, W)``; default: the model's own.
        routed: the run's routing masks (final.pt's ``routed``), so concepts use the weights that route.
        eval_images: score explanations on the first N test images only (None: all).
    """
    model.eval()
    items = truth if eval_images is None else Subset(truth, range(min(eval_images, len(truth))))
    scores = score_explanations(model, _SubsetTruth(truth, items), explain, batch_size=batch_size, progress=progress)
    out = {"localisation": float(np.nanmean(scores["localisation"])),
           "pointing game": float(np.mean(scores["pointing"])),
           "deletion AUC": float(np.mean(scores["deletion_auc"]))}
    tally = dissect(model, feature_layer(model), broden_root, batch_size=batch_size, device=device, progress=progress)
    summary = tally_summary(tally)
    out.update({"interpretable units (%)": 100.0 * summary["interpretable_units"] / summary["units"],
                "unique concepts": float(summary["unique_concepts"]), "mean IoU": summary["mean_score"]})
    head = _linear_head(model)
    if head is None or head.weight.shape[1] != summary["units"]:
        out.update({k: math.nan for k in ("concepts per class", "classes <= 5 concepts (%)", "recovery precision",
                                          "recovery recall", "residual top-5 (paper)")})
        return out
    weight = evaluation.routed_weight(head.weight, (routed or {}).get("head"))
    per_class = concepts.class_concepts(weight, tally, truth.class_names, share=share)
    recovery = concepts.recovery_summary(concepts.concept_recovery(per_class, concepts.read_class_concepts(truth.root)))
    loader = torch.utils.data.DataLoader(_ImagesLabels(items), batch_size=batch_size)
    collected = evaluation.collect(model, loader, device)
    bias = None if head.bias is None else head.bias.detach().cpu().double().numpy()
    residual = evaluation.residuals(collected, weight, bias, getattr(head, "k", None), residual_n)["paper"]
    out.update({"concepts per class": float(per_class["n_concepts"].mean()),
                "classes <= 5 concepts (%)": 100.0 * concepts.share_within(per_class, max_concepts),
                "recovery precision": recovery["precision"], "recovery recall": recovery["recall"],
                "residual top-5 (paper)": float(np.nanmedian(residual))})
    return out


class _SubsetTruth(torch.utils.data.Dataset):
    """A ConceptTruth restricted to some items, keeping its masks() for score_explanations."""

    def __init__(self, truth: ConceptTruth, items):
        self.truth, self.items = truth, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j):
        return self.items[j]

    def masks(self, batch, classes):
        return self.truth.masks(batch, classes)


class _ImagesLabels(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j):
        item = self.items[j]
        return item["image"], item["label"]
