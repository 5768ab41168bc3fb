"""The tally: dataset-wide pixel counts of (unit, label) overlaps and the IoU table built from them.

A pure accumulation over (maps, thresholds, segmentations), so it is testable without any dataset.
Per batch, the (image, unit) maps whose max exceeds the unit's threshold (the only ones that can have
active pixels) are upsampled (bilinear, pixel centres) to the segmentation size and thresholded; the
labels under their active pixels, gathered from every label layer at once, are counted with
index_add. Work is proportional to the active pixels, as in NetDissect-Lite's loop, but with no
Python loop over units or images. :func:`reference_tally_loop` is that loop, kept as the executable
specification the tests compare against, under both rule sets (`dka.dissection.rules`).

Image-level labels arrive as (B, M) label numbers padded with -1. Under dka's rules 0 means "no
label"; under NetDissect-Lite's it is label 0, counted like any other (see rules.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from dka.dissection.legacy_sort import legacy_argsort
from dka.dissection.pil_resize import pil_bilinear
from dka.dissection.rules import DissectionRules, get_rules
from dka.dissection.thresholds import strict_float32_threshold

__all__ = ["TallyCounts", "TallyAccumulator", "compute_iou", "tally_frame", "reference_tally_loop", "IOU_EPS",
           "FIELDS", "counting_categories"]

IOU_EPS = 1e-10
FIELDS = ("label", "truth", "activation", "intersect", "iou")


@dataclass
class TallyCounts:
    """Dataset-wide pixel counts (NetDissect-Lite's tally_labels / tally_both / tally_units_cat)."""

    truth: np.ndarray  # (labels,) pixels (image-level labels: sh*sw per image)
    intersect: np.ndarray  # (units, labels)
    activation: np.ndarray  # (units, categories)
    images: int


def counting_categories(primary_category, num_categories: int, rules: DissectionRules) -> np.ndarray:
    """Per label, the category its hits count toward (-1: none): the primary category; labels with
    none (label 0 included) go to the last category under NetDissect-Lite's rules (its one-hot
    `labelcat`), to none under dka's."""
    prim = np.asarray(primary_category, dtype=np.int64).copy()
    prim[0] = -1
    if rules.uncovered_to_last:
        prim[prim < 0] = num_categories - 1
    return prim


class TallyAccumulator:
    """Accumulates NetDissect counts batch by batch; everything vectorised over units and labels.

    ``primary_category`` maps label number -> index of its primary category (-1: none / label 0);
    ``rules`` ("dka" or "netdissect", see rules.py) picks the upsampling and the handling of label 0,
    uncovered labels and map-less images.
    """

    def __init__(
        self,
        thresholds: np.ndarray | Tensor,
        primary_category: np.ndarray | Tensor,
        num_categories: int,
        seg_size: tuple[int, int],
        device: torch.device | str | None = None,
        chunk_bytes: int = 256 << 20,
        rules: str | DissectionRules = "dka",
    ):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.rules = get_rules(rules)
        thr = np.asarray(thresholds, dtype=np.float64)
        self.thresholds = torch.as_tensor(strict_float32_threshold(thr), device=self.device)
        self.units = self.thresholds.numel()
        primary = np.asarray(primary_category.cpu() if isinstance(primary_category, Tensor) else primary_category)
        if int(primary.max()) >= num_categories:
            raise ValueError(f"primary_category holds {int(primary.max())} but there are {num_categories} categories")
        self.primary = torch.as_tensor(counting_categories(primary, num_categories, self.rules), device=self.device)
        self.min_image_label = 0 if self.rules.zero_image_labels else 1
        self._stale: Tensor | None = None  # NetDissect-Lite's category vector left by the last firing pair
        self.num_labels = self.primary.numel()
        self.num_categories = num_categories
        self.seg_size = (int(seg_size[0]), int(seg_size[1]))
        self.chunk_bytes = chunk_bytes
        self.truth = torch.zeros(self.num_labels, dtype=torch.long, device=self.device)
        self.intersect = torch.zeros(self.units, self.num_labels, dtype=torch.long, device=self.device)
        self.activation = torch.zeros(self.units, num_categories, dtype=torch.long, device=self.device)
        self.images = 0

    def upsample(self, maps: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C, sh, sw): PIL-style bilinear (pixel centres), as NetDissect-Lite's imresize
        (under its rules with PIL's exact arithmetic, see pil_resize.py)."""
        sh, sw = self.seg_size
        x = maps.to(device=self.device, dtype=torch.float32)
        if x.shape[-2:] == (sh, sw):
            return x
        if self.rules.upsample == "pil":
            return pil_bilinear(x, (sh, sw))
        # PIL's bilinear == align_corners=False when enlarging; antialias matches it when shrinking
        shrink = x.shape[-2] > sh or x.shape[-1] > sw
        return F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=shrink)

    @torch.no_grad()
    def update(self, features: Tensor, seg: Tensor, image_labels: Tensor | None = None,
               has_maps: Tensor | None = None) -> None:
        """features (B, U, h, w) raw; seg (B, L, sh, sw) label numbers (0 = none); image_labels (B, M)
        padded with -1; has_maps (B,) bool: whether the image has any label map (None: all have;
        only NetDissect-Lite's stale-category rule reads it)."""
        if features.dim() != 4 or features.shape[1] != self.units:
            raise ValueError(f"features must be (B, {self.units}, h, w), got {tuple(features.shape)}")
        b = features.shape[0]
        sh, sw = self.seg_size
        if seg.dim() == 3:
            seg = seg[:, None]
        if seg.shape[0] != b or tuple(seg.shape[-2:]) != (sh, sw):
            raise ValueError(f"seg must be (B={b}, L, {sh}, {sw}), got {tuple(seg.shape)}")
        if image_labels is None:
            image_labels = torch.zeros(b, 0, dtype=torch.long)
        seg = seg.to(self.device, torch.long)
        image_labels = image_labels.to(self.device, torch.long)
        top = max(int(seg.max()) if seg.numel() else 0, int(image_labels.max()) if image_labels.numel() else 0)
        if top >= self.num_labels:
            raise ValueError(f"label {top} out of range: primary_category covers {self.num_labels} labels")
        if has_maps is not None:
            has_maps = has_maps.to(self.device, torch.bool)
            if has_maps.shape != (b,):
                raise ValueError(f"has_maps must be ({b},), got {tuple(has_maps.shape)}")
        self._update_batch(features, seg, image_labels, has_maps)
        self.images += b

    def _stale_categories(self, present: Tensor, own: Tensor, scalar_cats: Tensor) -> Tensor:
        """NetDissect-Lite's category vector for pairs of map-less images, in (image, unit) order: the
        vector of the last firing pair with maps (or the one carried in), OR-ed with the image-level
        categories of every map-less pair since then (its loop adds them to that vector in place)."""
        steps = torch.arange(own.numel(), device=own.device)
        anchor = torch.where(own, steps, torch.full_like(steps, -1)).cummax(dim=0).values.tolist()
        state, current = self._stale, -1
        present = present.clone()
        for j in (~own).nonzero()[:, 0].tolist():
            if anchor[j] != current:
                current = anchor[j]
                state = present[current]
            if state is None:
                raise ValueError("NetDissect-Lite fails on this data: the first firing image has no label map, "
                                 "so its tally reads its category vector before setting it (UnboundLocalError); "
                                 "use rules='dka'")
            state = state | scalar_cats[j]
            present[j] = state
        self._stale = present[-1].clone()
        return present

    def _update_batch(self, features: Tensor, seg: Tensor, image_labels: Tensor, has_maps: Tensor | None) -> None:
        """Sparse in the (image, unit) pairs that fire and in their active pixels, dense in nothing.

        Only pairs whose map max exceeds the threshold can have active pixels (bilinear upsampling
        is a convex combination), so only those maps are upsampled; the active pixels' labels are
        gathered from every label layer and counted with one bincount-style index_add.
        """
        b, n_lab, n_cat, units = features.shape[0], self.num_labels, self.num_categories, self.units
        dev = self.device
        sh, sw = self.seg_size
        p = sh * sw
        n_layers = seg.shape[1]
        x = features.to(device=dev, dtype=torch.float32)
        pix = seg.reshape(b, n_layers, p)

        # truth: pixel labels pooled over categories/layers (0 = none), plus sh*sw per image-level label
        pixel_truth = torch.bincount(pix.reshape(-1), minlength=n_lab)
        pixel_truth[0] = 0
        self.truth += pixel_truth
        valid = image_labels >= self.min_image_label  # (b, M): padding (-1) and, under dka's rules, 0 drop out
        il = torch.where(valid, image_labels, torch.zeros_like(image_labels))
        self.truth += torch.bincount(il[valid], minlength=n_lab) * p
        img_cat = None
        if image_labels.numel():
            lab_cat = torch.where(valid, self.primary[il], torch.full_like(il, -1))  # (b, M)
            img_cat = F.one_hot(lab_cat + 1, n_cat + 1)[..., 1:].sum(dim=1) > 0  # (b, C)
        stale = self.rules.stale_categories and has_maps is not None

        fired = x.flatten(2).amax(dim=2) > self.thresholds[None, :]  # (b, U)
        pair_img, pair_unit = fired.nonzero(as_tuple=True)
        step = max(1, self.chunk_bytes // (p * 5))  # float map + bool mask per pair
        layer_ids = torch.arange(n_layers, device=dev)
        for s in range(0, pair_img.numel(), step):
            pb, pu = pair_img[s : s + step], pair_unit[s : s + step]
            n_pairs = pb.numel()
            mask = self.upsample(x[pb, pu][None])[0].reshape(n_pairs, p) > self.thresholds[pu][:, None]
            q, pos = mask.nonzero(as_tuple=True)  # active pixels: pair index, pixel
            act = torch.bincount(q, minlength=n_pairs)  # (pairs,) active-pixel counts
            labs = pix[pb[q][:, None], layer_ids[None, :], pos[:, None]].reshape(-1)  # (active * L,)
            owner = q.repeat_interleave(n_layers)
            keep = labs > 0
            labs, owner = labs[keep], owner[keep]
            self.intersect.view(-1).index_add_(0, pu[owner] * n_lab + labs, torch.ones_like(labs))
            cats = self.primary[labs]
            ok = cats >= 0
            hits = torch.zeros(n_pairs * n_cat, dtype=torch.long, device=dev)
            hits.index_add_(0, owner[ok] * n_cat + cats[ok], torch.ones_like(cats[ok]))
            present = hits.view(n_pairs, n_cat) > 0
            if img_cat is not None:
                present |= img_cat[pb]
                self.intersect.view(-1).index_add_(
                    0, (pu[:, None] * n_lab + il[pb]).reshape(-1), (act[:, None] * valid[pb]).reshape(-1)
                )
            if stale and n_pairs:
                own = has_maps[pb]
                if bool(own.all()):
                    self._stale = present[-1].clone()
                else:
                    scalar_cats = img_cat[pb] if img_cat is not None else torch.zeros_like(present)
                    present = self._stale_categories(present, own, scalar_cats)
            self.activation.index_add_(0, pu, act[:, None] * present)

    def counts(self) -> TallyCounts:
        return TallyCounts(
            truth=self.truth.cpu().numpy().astype(np.float64),
            intersect=self.intersect.cpu().numpy().astype(np.float64),
            activation=self.activation.cpu().numpy().astype(np.float64),
            images=self.images,
        )


def _lookup_category(primary_category: np.ndarray, num_categories: int) -> np.ndarray:
    """NetDissect-Lite gives labels without a primary category (label 0) the last category."""
    prim = np.asarray(primary_category, dtype=np.int64).copy()
    prim[0] = -1
    return np.where(prim < 0, num_categories - 1, prim)


def compute_iou(counts: TallyCounts, primary_category: np.ndarray) -> np.ndarray:
    """IoU[unit, label] = intersect / (activation[primary] + truth - intersect + 1e-10)."""
    look = _lookup_category(primary_category, counts.activation.shape[1])
    act = counts.activation[:, look]
    return counts.intersect / (act + counts.truth[None, :] - counts.intersect + IOU_EPS)


def tally_frame(
    counts: TallyCounts,
    primary_category: np.ndarray,
    label_names: Sequence[str],
    categories: Sequence[str],
    rules: str | DissectionRules = "dka",
) -> pd.DataFrame:
    """NetDissect-Lite's tally.csv as a DataFrame: best label per category and unit, sorted by score.

    Label 0 is named by the rules ("-" or NetDissect-Lite's empty string); under "netdissect" rules
    ties between units' scores are ordered as NetDissect-Lite's quicksort leaves them.
    """
    rules = get_rules(rules)
    categories = list(categories)
    n_cat = len(categories)
    iou = compute_iou(counts, primary_category)
    look = _lookup_category(primary_category, n_cat)
    units = iou.shape[0]
    best_label = np.empty((n_cat, units), dtype=np.int64)
    best_score = np.empty((n_cat, units), dtype=np.float64)
    for ci in range(n_cat):  # loop over the few categories only; argmax ties -> lowest label number
        masked = iou * (look == ci)[None, :]
        best_label[ci] = masked.argmax(axis=1)
        best_score[ci] = masked[np.arange(units), best_label[ci]]
    if rules.unit_order == "netdissect":  # score.argsort()[::-1] on numpy's classic quicksort
        best_cat = np.array([legacy_argsort(best_score[:, u])[-1] for u in range(units)], dtype=np.int64)
        score = best_score[best_cat, np.arange(units)]
        order = legacy_argsort(score)[::-1]
    else:
        best_cat = n_cat - 1 - best_score[::-1].argmax(axis=0)  # ties -> the later category
        score = best_score[best_cat, np.arange(units)]
        order = np.argsort(-score, kind="stable")
    names = np.asarray(label_names, dtype=object).copy()
    names[0] = rules.empty_label
    cols: dict[str, object] = {
        "unit": order + 1,
        "category": np.asarray(categories, dtype=object)[best_cat[order]],
        "label": names[best_label[best_cat[order], order]],
        "score": score[order],
    }
    for ci, cat in enumerate(categories):
        lab = best_label[ci, order]
        cols[f"{cat}-label"] = names[lab]
        cols[f"{cat}-truth"] = counts.truth[lab]
        cols[f"{cat}-activation"] = counts.activation[order, look[lab]]
        cols[f"{cat}-intersect"] = counts.intersect[order, lab]
        cols[f"{cat}-iou"] = best_score[ci, order]
    return pd.DataFrame(cols)


def reference_tally_loop(features: np.ndarray, thresholds: np.ndarray, seg: np.ndarray,
                         image_labels: np.ndarray, primary: np.ndarray, n_cat: int,
                         rules: str | DissectionRules = "dka", has_maps: np.ndarray | None = None):
    """NetDissect-Lite's tally as its loop over images x units: the executable spec of
    `TallyAccumulator` (tests compare the two count for count; bench/dissect.py times both).

    Inputs are whole-dataset numpy arrays: features (N, units, h, w) float32, seg (N, layers, sh, sw)
    label numbers, image_labels (N, M) padded with -1, primary (labels,) category index or -1,
    has_maps (N,) bool (None: every image has label maps). Upsampling is PIL's bilinear on a float
    image, as scipy's imresize(mode="F") in NetDissect-Lite. Under "netdissect" rules the loop keeps
    its category vector across pairs, as NetDissect-Lite's does: a pair of an image without label
    maps reuses (and adds to, in place) the vector of the previous firing pair.
    Returns (truth, intersect, activation).
    """
    from PIL import Image

    rules = get_rules(rules)
    n, units = features.shape[:2]
    n_lab = len(primary)
    labelcat = np.zeros((n_lab, n_cat))
    for lab, c in enumerate(counting_categories(primary, n_cat, rules)):
        if c >= 0:
            labelcat[lab, c] = 1
    lowest = 0 if rules.zero_image_labels else 1
    sh, sw = seg.shape[-2:]
    intersect = np.zeros((units, n_lab))
    activation = np.zeros((units, n_cat))
    truth = np.zeros(n_lab)
    cat = None
    for i in range(n):
        pixels = seg[i]
        scalars = [s for s in image_labels[i] if s >= lowest]
        own_maps = has_maps is None or bool(has_maps[i]) or not rules.stale_categories
        for s in scalars:
            truth[s] += sh * sw
        counts = np.bincount(pixels.ravel(), minlength=n_lab)
        counts[0] = 0
        truth += counts
        for u in range(units):
            fm = features[i, u].astype(np.float32)
            if fm.max() > thresholds[u]:
                mask = np.asarray(Image.fromarray(fm, mode="F").resize((sw, sh), Image.BILINEAR))
                idx = np.argwhere(mask > thresholds[u])
                if own_maps:
                    hits = np.bincount(pixels[:, idx[:, 0], idx[:, 1]].ravel(), minlength=n_lab).astype(float)
                    hits[0] = 0
                    cat = hits @ labelcat
                    intersect[u] += hits
                elif cat is None:
                    raise ValueError("the first firing image has no label map: NetDissect-Lite fails here")
                for s in scalars:
                    cat += labelcat[s]
                    intersect[u, s] += len(idx)
                activation[u] += len(idx) * (cat > 0)
    return truth, intersect, activation
