"""The Interpretable-CNN paper's checks of top-layer filters, for any dka model (`res18-icnn` or a plain baseline).

A filter of the interpretable conv-layer should fire for one category, at one place. Measured on the
maps the head pools (`model.features`):

- `assign_categories`: each filter's category by the paper's rule, ``argmax_c mean_{I in c} sum_ij x_ij``.
- `category_specificity`: the share of a filter's mean activation that its own category's images
  get, ``A[f, c_f] / sum_c A[f, c]`` (1 / classes for a filter blind to the category).
- `location_instability`: the paper's measure. For each filter, on the top-M images of its category
  (by peak value), the standard deviation over images of the distance between the filter's peak
  (the centre of the peak cell, in pixels) and a landmark, averaged over landmarks and divided by
  the image diagonal; the mean over filters. On the concept scenes the landmarks are the centroids of
  the class's true concepts (the paper used annotated part centres).
- `concept_hits`: what the paper could only approximate: how often the peak falls inside the mask of
  one of its category's true concepts, which concept, and the rate a randomly placed peak would get.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from dka.attribution import inference_mode
from dka.progress import tqdm

__all__ = ["FilterMaps", "collect_filter_maps", "assign_categories", "class_activation", "category_specificity",
           "peak_pixels", "location_instability", "concept_hits", "random_peaks", "concept_landmarks"]


@dataclass
class FilterMaps:
    """Per image and filter: the peak cell (raster index), the peak value and the map's sum."""

    peaks: Tensor  # (N, U) long
    peak_values: Tensor  # (N, U) float
    totals: Tensor  # (N, U) float, sum_ij x_ij
    labels: Tensor  # (N,) long
    map_size: tuple[int, int]  # (h, w) of the filters' maps
    image_size: tuple[int, int]  # (H, W) of the images


@torch.no_grad()
def collect_filter_maps(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], total: int | None = None,
                        progress: bool = True) -> FilterMaps:
    """Run `model.features` (eval mode) over (images, labels) batches and keep each map's peak and sum."""
    device = next(model.parameters()).device
    peaks, values, totals, labels = [], [], [], []
    map_size = image_size = None
    with inference_mode(model):
        for images, y in tqdm(batches, total=total, desc="filter maps", disable=not progress, leave=False):
            fmaps = model.features(images.to(device)).float()
            flat = fmaps.flatten(2)
            v, p = flat.max(dim=2)
            peaks.append(p.cpu())
            values.append(v.cpu())
            totals.append(flat.sum(2).cpu())
            labels.append(torch.as_tensor(y).cpu())
            map_size, image_size = tuple(fmaps.shape[2:]), tuple(images.shape[2:])
    if not peaks:
        raise ValueError("no batch to collect filter maps from")
    return FilterMaps(torch.cat(peaks), torch.cat(values), torch.cat(totals), torch.cat(labels), map_size, image_size)


def class_activation(totals: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(U, classes) mean of each filter's map sum over the images of each class (NaN for an absent class)."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    sums = torch.zeros(num_classes, totals.shape[1], dtype=torch.float64).index_add_(0, labels, totals.double())
    means = sums / counts[:, None]
    return means.T.float()


def assign_categories(totals: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(U,) the paper's filter -> category rule: the class whose images activate the filter most."""
    return class_activation(totals, labels, num_classes).nan_to_num(-1.0).argmax(dim=1)


def category_specificity(maps: FilterMaps, categories: Tensor, num_classes: int) -> dict:
    """Share of each filter's class-mean activation that its own category gets; filters that never fire
    are left out (``silent``)."""
    act = class_activation(maps.totals, maps.labels, num_classes).nan_to_num(0.0)
    total = act.sum(1)
    alive = total > 0
    share = act.gather(1, categories[:, None])[:, 0] / total.clamp_min(1e-30)
    return {"mean_share": float(share[alive].mean()) if alive.any() else float("nan"),
            "chance": 1.0 / num_classes, "silent": int((~alive).sum()), "per_filter": share.where(alive, torch.nan)}


def peak_pixels(peaks: Tensor, map_size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """(..., 2) float (row, col) image coordinates of the centres of the peak cells."""
    h, w = map_size
    rows = (peaks // w).float() + 0.5
    cols = (peaks % w).float() + 0.5
    return torch.stack([rows * image_size[0] / h, cols * image_size[1] / w], dim=-1)


def random_peaks(maps: FilterMaps, seed: int = 0) -> FilterMaps:
    """The same maps with each peak moved to a uniformly random cell: the baseline of a filter that
    fires anywhere (peak values kept, so the same top images are chosen)."""
    g = torch.Generator().manual_seed(seed)
    h, w = maps.map_size
    peaks = torch.randint(0, h * w, maps.peaks.shape, generator=g)
    return FilterMaps(peaks, maps.peak_values, maps.totals, maps.labels, maps.map_size, maps.image_size)


def _top_images(maps: FilterMaps, unit: int, category: int, top: int) -> Tensor:
    """Indices of the `top` images of `category` with the largest peak of `unit` (peak > 0 only)."""
    own = (maps.labels == category).nonzero()[:, 0]
    values = maps.peak_values[own, unit]
    own, values = own[values > 0], values[values > 0]
    return own[values.argsort(descending=True)[:top]]


def location_instability(maps: FilterMaps, categories: Tensor, landmarks: list[dict[int, tuple[float, float]]],
                         top: int = 100) -> dict:
    """The paper's location instability (lower = each filter fires at a more stable place).

    Args:
        maps: from `collect_filter_maps` over the images `landmarks` describe, in the same order.
        categories: (U,) each filter's category.
        landmarks: per image, landmark id -> (row, col) in pixels (e.g. `concept_landmarks`).
        top: images per filter (the paper's code: 100).
    """
    if len(landmarks) != maps.labels.shape[0]:
        raise ValueError(f"{len(landmarks)} landmark sets for {maps.labels.shape[0]} images")
    pix = peak_pixels(maps.peaks, maps.map_size, maps.image_size).numpy()
    diagonal = float(np.hypot(*maps.image_size))
    per_filter = np.full(categories.shape[0], np.nan)
    for unit, category in enumerate(categories.tolist()):
        chosen = _top_images(maps, unit, category, top).tolist()
        ids = sorted({k for i in chosen for k in landmarks[i]})
        deviations = []
        for k in ids:
            with_k = [i for i in chosen if k in landmarks[i]]
            if len(with_k) < 2:
                continue
            d = np.hypot(*(np.array([landmarks[i][k] for i in with_k]) - pix[with_k, unit]).T)
            deviations.append(d.std(ddof=1))
        if deviations:
            per_filter[unit] = np.mean(deviations) / diagonal
    return {"instability": float(np.nanmean(per_filter)) if np.isfinite(per_filter).any() else float("nan"),
            "filters": int(np.isfinite(per_filter).sum()), "per_filter": per_filter}


def concept_landmarks(masks: list[dict[int, Tensor]], exclude: set[int] = frozenset()) -> list[dict[int, tuple]]:
    """Per image, concept -> (row, col) centroid of its mask (empty masks and `exclude`d concepts left out)."""
    out = []
    for image in masks:
        marks = {}
        for k, m in image.items():
            if k in exclude or not m.any():
                continue
            rows, cols = m.nonzero(as_tuple=True)
            marks[k] = (float(rows.float().mean()) + 0.5, float(cols.float().mean()) + 0.5)
        out.append(marks)
    return out


def concept_hits(maps: FilterMaps, categories: Tensor, masks: list[dict[int, Tensor]], top: int = 100) -> dict:
    """How often a filter's peak falls inside one of its category's true concept masks.

    Args:
        maps: from `collect_filter_maps` over the images `masks` describe, in the same order.
        categories: (U,) each filter's category.
        masks: per image, concept -> (H, W) bool mask of that true concept (`ConceptTruth.concept_masks`);
            masks may be at another resolution than the images (peaks are scaled onto them).
        top: images per filter (as `location_instability`).

    Returns:
        dict with ``hit_rate`` (mean over filters of the share of their top images whose peak is inside a
        true concept), ``chance`` (the same for a peak at a random cell), ``purity`` (mean over filters
        of the share of hits inside their most frequent concept), ``concept_rate`` (mean over filters of
        the share of top images whose peak is inside the mask of the filter's own concept: one concept
        per filter, a miss where the image lacks it), ``concept_chance`` (the same for a random cell)
        and per-filter arrays. The own concept is cross-fitted: the modal concept of the other half of
        the filter's top images (alternating by peak rank), so choosing it does not inflate its rate.
    """
    if len(masks) != maps.labels.shape[0]:
        raise ValueError(f"{len(masks)} mask sets for {maps.labels.shape[0]} images")
    h, w = maps.map_size
    cells = torch.arange(h * w)
    inside, union = [], []  # per image: concept -> (h*w,) bool at the cell centres, and their union
    for image in masks:
        if not image:
            inside.append({})
            union.append(torch.zeros(h * w, dtype=torch.bool))
            continue
        r, c = _cell_pixels(cells, (h, w), next(iter(image.values())).shape)
        at = {k: m[r, c] for k, m in image.items()}
        inside.append(at)
        union.append(torch.stack(list(at.values())).any(0))
    hit_rate = np.full(categories.shape[0], np.nan)
    chance = np.full_like(hit_rate, np.nan)
    purity = np.full_like(hit_rate, np.nan)
    modal = np.full(categories.shape[0], -1)
    concept_rate = np.full_like(hit_rate, np.nan)
    concept_chance = np.full_like(hit_rate, np.nan)
    for unit, category in enumerate(categories.tolist()):
        chosen = [i for i in _top_images(maps, unit, category, top).tolist() if inside[i]]
        if not chosen:
            continue
        peaks = maps.peaks[chosen, unit].tolist()
        hits = [bool(union[i][p]) for i, p in zip(chosen, peaks)]
        counts: dict[int, int] = {}
        for i, p in zip(chosen, peaks):
            for k, at in inside[i].items():
                if at[p]:
                    counts[k] = counts.get(k, 0) + 1
        hit_rate[unit] = np.mean(hits)
        chance[unit] = np.mean([float(union[i].float().mean()) for i in chosen])
        if counts:
            best = max(counts, key=counts.get)
            modal[unit], purity[unit] = best, counts[best] / sum(hits)
        own = _own_concept_rate(list(zip(chosen, peaks)), inside)
        if own is not None:
            concept_rate[unit], concept_chance[unit] = own
    return {"hit_rate": float(np.nanmean(hit_rate)), "chance": float(np.nanmean(chance)),
            "purity": float(np.nanmean(purity)), "concept_rate": _nanmean(concept_rate),
            "concept_chance": _nanmean(concept_chance), "per_filter_hit_rate": hit_rate, "per_filter_chance": chance,
            "per_filter_purity": purity, "per_filter_concept_rate": concept_rate, "modal_concept": modal}


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _own_concept_rate(top: list[tuple[int, int]], inside: list[dict[int, Tensor]]) -> tuple[float, float] | None:
    """(rate, chance) of peaks inside one concept's mask, the concept chosen on the other half of the
    (image, peak cell) pairs (ranks 0, 2, 4, ... vs 1, 3, 5, ...); None if a half has no hit to choose from."""
    halves = (top[0::2], top[1::2])
    hits = n = chance = 0.0
    for this, other in (halves, halves[::-1]):
        counts: dict[int, int] = {}
        for i, p in other:
            for k, at in inside[i].items():
                counts[k] = counts.get(k, 0) + int(at[p])
        if not this or not counts or max(counts.values()) == 0:
            return None
        k = max(counts, key=counts.get)
        for i, p in this:
            at = inside[i].get(k)
            hits += float(at is not None and bool(at[p]))
            chance += 0.0 if at is None else float(at.float().mean())
        n += len(this)
    return hits / n, chance / n


def _cell_pixels(cells: Tensor, map_size: tuple[int, int], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Integer (row, col) in an image of `size` of the centres of the map cells `cells`."""
    pix = peak_pixels(cells, map_size, size)
    return (pix[:, 0].long().clamp(0, size[0] - 1), pix[:, 1].long().clamp(0, size[1] - 1))
