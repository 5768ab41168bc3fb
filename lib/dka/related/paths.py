"""Calculation paths of a decoupled network (`res18-decouple`): sparsity, per-class paths, executed FLOPs.

A path is the set of open filters of every gated layer for one input (`DecoupledResNet.paths`).

- `gate_sparsity`: the share of closed gates per layer and over all gates.
- `class_open_rates`: per class, how often each filter is open on the class's images.
- `class_paths`: per class and layer, the filters its images route through more than the average
  image does, with their Network Dissection concept (a tally per layer from `dka.dissect`), so a
  path reads as a chain of concepts.
- `forward_macs`: multiply-accumulates of the convolutions and linear layers one forward pass
  executes (forward hooks), the dense reference for `DecoupledResNet.sparse_forward`'s count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from dka.progress import tqdm

__all__ = ["PathRecord", "collect_paths", "gate_sparsity", "class_open_rates", "class_paths", "forward_macs",
           "flatten_path"]


@dataclass
class PathRecord:
    """Paths, logits and labels of a set of images."""

    gates: dict[str, Tensor]  # gated layer -> (N, filters) bool
    logits: Tensor  # (N, classes)
    labels: Tensor  # (N,)


def collect_paths(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], total: int | None = None,
                  progress: bool = True) -> PathRecord:
    """`model.paths` over (images, labels) batches."""
    gates: dict[str, list[Tensor]] = {}
    logits, labels = [], []
    for images, y in tqdm(batches, total=total, desc="paths", disable=not progress, leave=False):
        out, path = model.paths(images)
        logits.append(out)
        labels.append(torch.as_tensor(y).cpu())
        for name, g in path.items():
            gates.setdefault(name, []).append(g)
    if not logits:
        raise ValueError("no batch to collect paths from")
    return PathRecord({k: torch.cat(v) for k, v in gates.items()}, torch.cat(logits), torch.cat(labels))


def flatten_path(gates: Mapping[str, Tensor]) -> Tensor:
    """(N, all filters) float: the layers' gates side by side, in the mapping's order."""
    return torch.cat([g.float() for g in gates.values()], dim=1)


def gate_sparsity(gates: Mapping[str, Tensor]) -> dict:
    """Share of closed gates per layer (``layers``) and over all gates of all images (``overall``)."""
    layers = {name: float(1 - g.float().mean()) for name, g in gates.items()}
    closed = sum(float((~g.bool()).sum()) for g in gates.values())
    count = sum(g.numel() for g in gates.values())
    return {"overall": closed / count, "layers": layers}


def class_open_rates(gates: Mapping[str, Tensor], labels: Tensor, num_classes: int) -> dict[str, Tensor]:
    """Gated layer -> (classes, filters): the share of each class's images for which a filter is open."""
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).float()[:, None]
    return {name: torch.zeros(num_classes, g.shape[1]).index_add_(0, labels, g.float()) / counts
            for name, g in gates.items()}


def class_paths(gates: Mapping[str, Tensor], labels: Tensor, class_names: Sequence[str],
                tallies: Mapping[str, pd.DataFrame] | None = None, top: int = 3, min_open: float = 0.5) -> pd.DataFrame:
    """Per class and gated layer, the `top` filters most specific to the class's path.

    A filter is on the class's path when it is open for at least `min_open` of the class's images;
    the listed ones have the largest excess ``open rate in the class - open rate over all images``.

    Args:
        gates: from `collect_paths` (layer -> (N, filters) bool).
        labels: (N,) classes of the images.
        class_names: one per class.
        tallies: optional gated-layer name -> Network Dissection tally (`dka.dissect` of that layer's
            gated output) to label each filter with its concept.

    Returns:
        Rows (class, layer, unit [0-based], open_in_class, open_overall, label, category, iou).
    """
    rates = class_open_rates(gates, labels, len(class_names))
    rows = []
    for name, r in rates.items():
        overall = gates[name].float().mean(0)
        tally = None if tallies is None or name not in tallies else tallies[name].set_index("unit")
        for c, cname in enumerate(class_names):
            excess = (r[c] - overall).masked_fill(r[c] < min_open, float("-inf"))
            for unit in excess.argsort(descending=True)[:top].tolist():
                if excess[unit] == float("-inf"):
                    break
                row = {"class": cname, "layer": name, "unit": unit, "open_in_class": float(r[c, unit]),
                       "open_overall": float(overall[unit]), "label": None, "category": None, "iou": float("nan")}
                if tally is not None and unit + 1 in tally.index:  # tally units are 1-based
                    t = tally.loc[unit + 1]
                    row.update(label=t["label"], category=t["category"], iou=float(t["score"]))
                rows.append(row)
    return pd.DataFrame(rows, columns=["class", "layer", "unit", "open_in_class", "open_overall", "label",
                                       "category", "iou"])


@torch.no_grad()
def forward_macs(model: nn.Module, x: Tensor) -> int:
    """Multiply-accumulates per image of the Conv2d and Linear layers that one forward pass of `x` runs."""
    total = [0]

    def conv_hook(module, inputs, output):
        per_out = module.weight[0].numel()  # (in / groups) * kh * kw
        total[0] += per_out * output[0].numel()

    def linear_hook(module, inputs, output):
        total[0] += module.weight.numel()

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(x[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total[0]
