"""One pass of a trained model over a test split, kept per image, and what the paper computes from it.

The trainer logs accuracy per epoch; the paper's comparisons need more: per-image correctness (paired
tests between models on the same images, `dka.stats.mcnemar`), the pooled features x_i and the head's
products W[c,i] x_i over the whole test split (the residual of Fig. 7, computed on every image instead
of a handful), and the head restricted to the weights that actually route.

Residual definitions (share of the class score its top-n units leave unexplained), each documented with
its source:

- ``"paper"``: Sun et al. (Sec. 4.3, Fig. 7) divide unit i's product W[c,i] x_i by the class score Y_c
  summed over all units: ``1 - sum_top-n(W x) / sum_all(W x)``.
- ``"authors_demo"``: the authors' released `demo.py` shows ``W[c,i] x_i / sum_j |W[c,j] x_j|`` per unit
  (its percentages): ``1 - sum_top-n(W x) / sum_all|W x|``.
- ``"routed"``: dka's exact decomposition of the score the head computes, bias included (for a
  Dynamic-K head the score sums only its K routed products): ``1 - sum_top-n(used W x) / y_c``.

The explained class is the true class of each image, as in the authors' demo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dka.layers import routed_indices

__all__ = ["Collected", "collect", "residuals", "residual_table", "RESIDUAL_DEFINITIONS", "routed_weight"]

RESIDUAL_DEFINITIONS = ("paper", "authors_demo", "routed")


@dataclass
class Collected:
    """Per test image: the head's inputs, the logits and the label (numpy, float64 / int64)."""

    pooled: np.ndarray  # (N, U)
    logits: np.ndarray  # (N, classes)
    labels: np.ndarray  # (N,)

    @property
    def correct(self) -> np.ndarray:
        """(N,) bool: top-1 prediction is the label."""
        return self.logits.argmax(1) == self.labels

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy in percent."""
        return 100.0 * float(self.correct.mean())


@torch.no_grad()
def collect(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu", amp: bool = False,
            channels_last: bool = False) -> Collected:
    """Run `model` (features -> pool -> head) over `loader` (batches of (images, labels)) once, in eval mode.

    `amp` (bf16 autocast) and `channels_last` should be the run's own settings, so the predictions are
    the ones its training log reports.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    pooled, logits, labels = [], [], []
    try:
        for images, target in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                x = model.pool(model.features(images.to(device, memory_format=memory_format)))
                y = model.head(x)
            pooled.append(x.float().cpu())
            logits.append(y.float().cpu())
            labels.append(target.cpu())
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("the loader yielded no batch")
    return Collected(pooled=torch.cat(pooled).double().numpy(), logits=torch.cat(logits).double().numpy(),
                     labels=torch.cat(labels).long().numpy())


def routed_weight(weight: torch.Tensor | np.ndarray, routed_mask: torch.Tensor | np.ndarray | None) -> np.ndarray:
    """The head's weights that actually route: never-routed ones (mask False) set to 0.

    Zeroing them changes no logit of the images the mask was recorded on (the last training epoch), so
    concept statistics on this matrix describe the head as it computes. A dense head (no mask) is returned
    as it is.
    """
    w = np.asarray(weight.detach().cpu() if hasattr(weight, "detach") else weight, dtype=np.float64)
    if routed_mask is None:
        return w
    mask = np.asarray(routed_mask.cpu() if hasattr(routed_mask, "cpu") else routed_mask, dtype=bool)
    if mask.shape != w.shape:
        raise ValueError(f"routing mask {mask.shape} does not match the weight {w.shape}")
    return np.where(mask, w, 0.0)


def residuals(collected: Collected, weight: np.ndarray, bias: np.ndarray | None, k: int | None,
              n: int) -> dict[str, np.ndarray]:
    """Per image, the residual of its true class's score after the top-n units, by each definition.

    Args:
        collected: the pooled features and labels of the test split (`collect`).
        weight: (classes, U) head weight; bias: (classes,) or None.
        k: K of a Dynamic-K head (None for a dense head): the "routed" definition then uses its K products.
        n: units counted as explaining the score.

    Returns:
        {definition: (N,) residuals}; NaN where the denominator is 0.
    """
    w = np.asarray(weight, dtype=np.float64)
    x = collected.pooled
    c = collected.labels
    if not 1 <= n <= w.shape[1]:
        raise ValueError(f"n={n} is out of range: choose 1 <= n <= {w.shape[1]} (the head's inputs)")
    products = w[c] * x  # (N, U)
    top = np.sort(products, axis=1)[:, ::-1][:, :n].sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        paper = 1.0 - top / products.sum(1)
        demo = 1.0 - top / np.abs(products).sum(1)
        b = np.zeros(len(c)) if bias is None else np.asarray(bias, dtype=np.float64)[c]
        if k is None:
            used = products
        else:
            idx = routed_indices(torch.from_numpy(x).float(), torch.from_numpy(w).float(), k).numpy()
            idx = idx[np.arange(len(c)), c]  # (N, K): the inputs routed for the true class
            used = np.zeros_like(products)
            np.put_along_axis(used, idx, np.take_along_axis(products, idx, 1), 1)
        score = used.sum(1) + b
        routed = 1.0 - np.sort(used, axis=1)[:, ::-1][:, :n].sum(1) / score
    clean = lambda v: np.where(np.isfinite(v), v, np.nan)  # noqa: E731
    return {"paper": clean(paper), "authors_demo": clean(demo), "routed": clean(routed)}


def residual_table(models: dict, configs: dict, loader: DataLoader, device: str, n: int) -> tuple[dict, list[dict]]:
    """Every model's residuals over `loader` (its true classes) after the top `n` units, by each definition:
    ({model: {definition: (N,) residuals}}, rows of median with a bootstrap interval over images, mean, images)."""
    from dka.stats import bootstrap_interval

    per_image, rows = {}, []
    for name, model in models.items():
        config = configs[name]
        collected = collect(model, loader, device, amp=bool(config["amp"]), channels_last=bool(config["channels_last"]))
        head = model.head
        bias = None if head.bias is None else head.bias.detach().cpu().numpy()
        per_image[name] = residuals(collected, head.weight.detach().cpu().numpy(), bias, getattr(head, "k", None), n)
        for definition, values in per_image[name].items():
            iv = bootstrap_interval(values[np.isfinite(values)], np.median)
            rows.append({"model": name, "definition": definition, "median (%)": 100 * iv.mean,
                         "95% low": 100 * iv.low, "95% high": 100 * iv.high,
                         "mean (%)": 100 * float(np.nanmean(values)), "images": int(np.isfinite(values).sum())})
    return per_image, rows
