"""The training objective, and the engine's one extension point for a method's extra loss.

Every model trains on cross-entropy. A method that needs more (the L1 head of the paper's baseline, the
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

__all__ = ["Loss", "training_loss"]


class Loss(NamedTuple):
    """The loss of one step: what is optimised (`total`), its cross-entropy part, the extra terms."""

    total: Tensor
    cross_entropy: Tensor
    auxiliary: dict[str, Tensor]


def training_loss(model: nn.Module, logits: Tensor, labels: Tensor, recipe) -> Loss:
    """Cross-entropy of `logits` plus the model's `auxiliary_losses` (see the module docstring).

    Args:
        model: the bare network (not the DDP / compile wrapper), which defines the extra terms.
        logits: (B, classes) of the training forward pass just run.
        labels: (B,) class indices.
        recipe: the run's resolved `TrainConfig` (e.g. its `l1` strength).
    """
    ce = F.cross_entropy(logits.float(), labels)
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
