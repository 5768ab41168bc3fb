"""The training objective, and the engine's one extension point for a method's extra loss.

Every model trains on a classification loss, `classification_loss`: cross-entropy (the default), or the
one-vs-all binary cross-entropy CoDA-Nets train with (``TrainConfig.loss = "bce"``). A method that needs more (the L1 head of the paper's baseline, the
Interpretable-CNN filter loss, the gate losses of network decoupling) adds it by defining on its model::

    def auxiliary_losses(self, labels: Tensor, recipe: TrainConfig) -> dict[str, Tensor]:
        ...

The engine calls it right after the model's training forward pass (so a model may use what it cached
during that pass, e.g. its feature maps or gates) and adds every returned scalar, already weighted, to
the loss; each term's epoch mean is logged in `metrics.jsonl` under ``aux_losses``. Nothing else in the
loop knows about methods.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Loss", "training_loss", "classification_loss"]


class Loss(NamedTuple):
    """The loss of one step: what is optimised (`total`), its classification part (`cross_entropy`: the
    softmax cross-entropy, or the binary one under ``loss="bce"``), the extra terms."""

    total: Tensor
    cross_entropy: Tensor
    auxiliary: dict[str, Tensor]


def classification_loss(logits: Tensor, labels: Tensor, kind: str = "cross-entropy",
                        reduction: str = "mean") -> Tensor:
    """The classification loss of `logits` (B, classes) for `labels` (B,), in float32.

    ``"cross-entropy"``: softmax cross-entropy. ``"bce"``: binary cross-entropy of every logit against the
    one-hot target, averaged over the classes (so one image's loss does not grow with the class count; the
    CoDA-Nets recipe, `nn.BCEWithLogitsLoss` on one-hot targets). ``reduction``: "mean" or "sum" over images.
    """
    logits = logits.float()
    if kind == "cross-entropy":
        return F.cross_entropy(logits, labels, reduction=reduction)
    if kind == "bce":
        target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        per_image = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
        return per_image.sum() if reduction == "sum" else per_image.mean()
    raise ValueError(f"unknown classification loss {kind!r}; valid: cross-entropy, bce")


def training_loss(model: nn.Module, logits: Tensor, labels: Tensor, recipe) -> Loss:
    """The classification loss of `logits` plus the model's `auxiliary_losses` (see the module docstring).

    Args:
        model: the bare network (not the DDP / compile wrapper), which defines the extra terms.
        logits: (B, classes) of the training forward pass just run.
        labels: (B,) class indices.
        recipe: the run's resolved `TrainConfig` (its `loss` kind, e.g. its `l1` strength).
    """
    ce = classification_loss(logits, labels, getattr(recipe, "loss", None) or "cross-entropy")
    hook = getattr(model, "auxiliary_losses", None)
    extra = dict(hook(labels, recipe)) if callable(hook) else {}
    for name, value in extra.items():
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise TypeError(f"{type(model).__name__}.auxiliary_losses returned {name!r} = {value!r}; "
                            "each term must be a scalar tensor")
    total = ce
    for value in extra.values():
        total = total + value.float()
    return Loss(total=total, cross_entropy=ce, auxiliary=extra)
