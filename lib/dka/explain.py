"""Per-image explanations: which units carry a class score, what concept each unit detects, where.

``attribute(model, images, target)`` asks the model to explain itself (``model.explain``, built from
`dka.attribution`), so every model family of dka is explained through one call. It follows Captum's
shape convention: ``contributions`` has the shape of the head's input (B, units), one row per image for
its target class. ``explanation_table`` joins the top units with their Network Dissection concepts.
The HTML report lives in `dka.report`, the Fig. 7 figure in `dka.plots`.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
from torch import Tensor, nn

from dka.attribution import Attribution
from dka.dissection import unit_labels

__all__ = ["Attribution", "attribute", "explanation_table"]


def attribute(model: nn.Module, images: Tensor, target: Tensor | int | Sequence[int] | None = None) -> Attribution:
    """Decompose each image's target-class score over the units the model's final layer weighs.

    Args:
        model: a dka model (anything with ``explain(images, target)``, e.g. from `dka.build` or
            `dka.load_model`).
        images: (B, 3, H, W) normalised images, moved to the model's device.
        target: None (the predicted class), an int (same class for all), or one class per image.

    Returns:
        An `Attribution` (CPU tensors).
    """
    if not callable(getattr(model, "explain", None)):
        raise TypeError(
            f"{type(model).__name__} has no `explain`: attribute() needs a dka model, whose features(x), "
            "pool(fmap) and head it decomposes (build one with dka.build or load one with dka.load_model)"
        )
    return model.explain(images, target)


def explanation_table(
    attr: Attribution, tally: pd.DataFrame | None = None, n: int = 5, class_names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Long table: image, class, rank, unit (1-based), contribution, concept, category, IoU, residual."""
    units, values = attr.top_units(n)
    res = attr.residual(n)
    labels = unit_labels(tally, attr.contributions.shape[1]) if tally is not None else None
    rows = []
    for bi in range(units.shape[0]):
        c = int(attr.target[bi])
        for r in range(units.shape[1]):
            u = int(units[bi, r]) + 1
            info = labels.loc[u] if labels is not None and isinstance(labels.loc[u, "label"], str) else None
            rows.append({
                "image": bi, "class": c, "class_name": class_names[c] if class_names is not None else str(c),
                "score": float(attr.score[bi]), "rank": r + 1, "unit": u, "contribution": float(values[bi, r]),
                "concept": None if info is None else info["label"],
                "category": None if info is None else info["category"],
                "iou": None if info is None else float(info["score"]), "residual": float(res[bi]),
            })
    return pd.DataFrame(rows)
