"""Network Dissection with NetDissect-Lite's definitions, streaming and vectorised.

Why a re-implementation: the paper's interpretability numbers come from NetDissect-Lite
(Bau et al. 2017, the "Lite" code), whose tally loops over units x images in Python and keeps all
features in a float32 memmap. Here the same numbers come from two streaming passes:

1. features of the chosen layer (forward hook, any module by qualified name, e.g. ``layer4`` or the
   internal dynamic layer ``layer3.0.conv1``) are stored once, in memory when they fit the budget,
   else in a float32 memmap file; the per-unit threshold is the 994/999 quantile of the unit's raw
   (not upsampled) activations, computed exactly (see :func:`quantile_thresholds_sorted` and the
   bounded-memory :func:`quantile_thresholds_streaming`, which is also exact);
2. per batch, the (image, unit) maps whose max exceeds the unit's threshold (the only ones that
   can have active pixels) are upsampled (bilinear, pixel centres) to the segmentation size and
   thresholded; the labels under their active pixels, gathered from every label layer at once, are
   counted with index_add (:class:`TallyAccumulator`, a pure function of maps, thresholds and
   segmentations, so it is testable without any dataset). Work is proportional to the active
   pixels, as in NetDissect-Lite's loop, but with no Python loop over units or images.

The counting rules (see DESIGN.md, "Network Dissection, as NetDissect-Lite defines it"):
truth[label] pools pixel labels of all selected categories (label 0 excluded) and adds sh*sw per
image-level label; intersect[unit, label] counts active pixels carrying the label (all active pixels
for an image-level label); activation[unit, category] adds an image's active-pixel count only if
some active pixel carries a label whose primary category is that category, or the image has an
image-level label of it. IoU = intersect / (activation[primary(label)] + truth - intersect + 1e-10).

One deliberate difference from NetDissect-Lite's code: for an image with image-level labels but no
pixel labels (e.g. DTD textures) the Lite code reuses a stale category vector from the previous
unit/image; here such an image counts toward exactly the categories of its image-level labels, as
the rule above says.

Memory (paper scale: Broden 63,305 images, ResNet18 layer4 = 512 units x 7 x 7): the feature store
is 63,305 x 512 x 49 x 4 B = 6.4 GB, so it goes to a memmap file (``cache_dir``); the sorted
threshold then needs N*h*w*4 B = 12 MB per unit of working memory (units are processed in chunks),
the streaming threshold O(units x bins) = 2 x 512 x 2048 x 8 B = 17 MB plus the few values that fall
into the final bin. The tally upsamples the firing maps in chunks sized to a budget (~256 MB) and
keeps int64 counters of (units x labels).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dka.atomic import atomic_write

DEFAULT_CATEGORIES: tuple[str, ...] = ("color", "object", "part", "scene", "texture")
# NetDissect-Lite reads its threshold as QuantileVector.readout(1000)[:, int(1000 * (1 - 0.005) - 1)],
# i.e. entry 994 of 1000 evenly spaced quantiles in [0, 1]: the 994/999 quantile.
QUANTILE: float = 994 / 999
IOU_EPS = 1e-10
INTERPRETABLE_IOU = 0.04
FIELDS = ("label", "truth", "activation", "intersect", "iou")

BRODEN_HINT = (
    "Download Broden (broden1_224, ~1 GB) from http://netdissect.csail.mit.edu/data/broden1_224.zip and "
    "unzip it, or generate the built-in concept scenes in Broden format with "
    "`dka.data.scenes.generate('demo32', DIR)`"
)


# --------------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------------

def _rank_positions(n: int, q: float) -> tuple[int, int, float]:
    """numpy's 'linear' quantile: value = s[lo] + frac * (s[hi] - s[lo]) at position q * (n - 1)."""
    if n < 1:
        raise ValueError("cannot take a quantile of zero activations")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1], got {q}")
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    return lo, hi, pos - lo


def _interpolate(v_lo: Tensor, v_hi: Tensor, frac: float) -> np.ndarray:
    lo = v_lo.double().cpu().numpy()
    hi = v_hi.double().cpu().numpy()
    return lo + frac * (hi - lo)


def quantile_thresholds_sorted(
    features: Tensor | np.ndarray,
    q: float = QUANTILE,
    device: torch.device | str | None = None,
    chunk_bytes: int = 256 << 20,
) -> np.ndarray:
    """Exact per-unit quantile of stored features (N, U, h, w), by selection over unit chunks.

    Needs N*h*w*4 bytes per unit of working memory (chunked to ``chunk_bytes``); use
    :func:`quantile_thresholds_streaming` when even that is too much.
    """
    n_img, units = features.shape[0], features.shape[1]
    per_unit = n_img * int(np.prod(features.shape[2:]))
    lo, hi, frac = _rank_positions(per_unit, q)
    chunk = max(1, min(units, chunk_bytes // max(1, per_unit * 4)))
    out = np.empty(units, dtype=np.float64)
    for u0 in range(0, units, chunk):
        u1 = min(units, u0 + chunk)
        block = features[:, u0:u1]
        block = torch.as_tensor(np.ascontiguousarray(block)) if isinstance(block, np.ndarray) else block
        vals = block.to(device=device, dtype=torch.float32).transpose(0, 1).reshape(u1 - u0, -1)
        v_lo = torch.kthvalue(vals, lo + 1, dim=1).values
        v_hi = torch.kthvalue(vals, hi + 1, dim=1).values if hi != lo else v_lo
        out[u0:u1] = _interpolate(v_lo, v_hi, frac)
    return out


@dataclass
class StreamingQuantileStats:
    """How much work the streaming quantile needed (reported by the benchmark)."""

    passes: int
    collected: int


def quantile_thresholds_streaming(
    batches: Callable[[], Iterable[Tensor]],
    q: float = QUANTILE,
    bins: int = 2048,
    collect_limit: int = 1 << 14,
    device: torch.device | str | None = None,
    max_passes: int = 16,
    stats: list | None = None,
) -> np.ndarray:
    """Exact per-unit quantile in bounded memory, by histogram refinement over repeated passes.

    ``batches()`` must yield the same feature batches (B, U, h, w) in the same order each call.
    Pass 1 gets each unit's min/max; each further pass histograms the values in the unit's current
    interval [lo, hi] into ``bins`` bins, recording each bin's min and max value; the bins holding the
    two order statistics around the quantile (adjacent ranks) become the next interval, closed over
    their actual min and max values — by monotonicity of the bin map those are exactly the values of
    those bins, so nothing is lost or double counted. After one histogram pass the error is at most
    (max - min) / bins; once an interval holds at most ``collect_limit`` values (or one distinct
    value) a last pass collects them and the order statistics are read off exactly.
    Memory: O(3 U bins) counters plus at most U x collect_limit collected values.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")

    def unit_rows(x: Tensor) -> Tensor:
        return x.to(device=device, dtype=torch.float32).transpose(0, 1).reshape(x.shape[1], -1)

    n, lo, hi = 0, None, None
    for x in batches():
        v = unit_rows(x)
        bmin, bmax = v.min(dim=1).values, v.max(dim=1).values
        lo = bmin if lo is None else torch.minimum(lo, bmin)
        hi = bmax if hi is None else torch.maximum(hi, bmax)
        n += v.shape[1]
    passes = 1
    if lo is None:
        raise ValueError("no feature batches: the dataset is empty")
    units = lo.numel()
    r_lo, r_hi, frac = _rank_positions(n, q)
    below = torch.zeros(units, dtype=torch.long, device=device)  # values strictly below lo
    inside = torch.full((units,), n, dtype=torch.long, device=device)  # values in [lo, hi]
    rows = torch.arange(units, device=device)

    stalled = torch.zeros(units, dtype=torch.bool, device=device)  # interval can shrink no further
    while passes < max_passes:
        done = (inside <= collect_limit) | (lo == hi) | stalled
        if bool(done.all()):
            break
        # float64 bin map: finite for any float32 width > 0, and monotone in v as the method needs
        width = (hi - lo).double()
        scale = torch.where(width > 0, bins / width.clamp_min(1e-300), torch.zeros_like(width))
        lo64 = lo.double()
        counts = torch.zeros(units * bins, dtype=torch.long, device=device)
        bmin = torch.full((units * bins,), float("inf"), device=device)
        bmax = torch.full((units * bins,), float("-inf"), device=device)
        for x in batches():
            v = unit_rows(x)
            inr = (v >= lo[:, None]) & (v <= hi[:, None]) & ~done[:, None]
            idx = ((v.double() - lo64[:, None]) * scale[:, None]).floor().clamp_(0, bins - 1).long()
            flat = (rows[:, None] * bins + idx)[inr]
            vals = v[inr]
            counts.index_add_(0, flat, torch.ones_like(flat))
            bmin.scatter_reduce_(0, flat, vals, reduce="amin")
            bmax.scatter_reduce_(0, flat, vals, reduce="amax")
        passes += 1
        cum = counts.view(units, bins).cumsum(dim=1)
        j_lo = (cum <= (r_lo - below)[:, None]).sum(dim=1).clamp_(max=bins - 1)
        j_hi = (cum <= (r_hi - below)[:, None]).sum(dim=1).clamp_(max=bins - 1)
        before = torch.where(j_lo > 0, cum.gather(1, (j_lo - 1).clamp_min(0)[:, None])[:, 0], torch.zeros_like(j_lo))
        new_lo = bmin.view(units, bins).gather(1, j_lo[:, None])[:, 0]
        new_hi = bmax.view(units, bins).gather(1, j_hi[:, None])[:, 0]
        new_inside = cum.gather(1, j_hi[:, None])[:, 0] - before
        stalled = done | (new_inside == inside)
        lo = torch.where(done, lo, new_lo)
        hi = torch.where(done, hi, new_hi)
        below = torch.where(done, below, below + before)
        inside = torch.where(done, inside, new_inside)

    # last pass: collect the values inside each open interval (lo == hi: the value is known)
    v_lo, v_hi = lo.clone(), lo.clone()
    open_ = lo != hi
    collected = 0
    if bool(open_.any()):
        sel = rows[open_]
        width = int(inside[sel].max())
        padded = torch.full((sel.numel(), width), float("inf"), device=device)
        fill = torch.zeros(sel.numel(), dtype=torch.long, device=device)
        for x in batches():
            v = unit_rows(x)[sel]
            inr = (v >= lo[sel, None]) & (v <= hi[sel, None])
            r, c = inr.nonzero(as_tuple=True)
            slot = fill[r] + (inr.cumsum(dim=1)[r, c] - 1)
            padded[r, slot] = v[r, c]
            fill += inr.sum(dim=1)
        passes += 1
        collected = int(fill.sum())
        padded = padded.sort(dim=1).values
        v_lo[sel] = padded.gather(1, (r_lo - below[sel])[:, None])[:, 0]
        v_hi[sel] = padded.gather(1, (r_hi - below[sel])[:, None])[:, 0]
    if stats is not None:
        stats.append(StreamingQuantileStats(passes=passes, collected=collected))
    return _interpolate(v_lo, v_hi, frac)


def _strict_float32_threshold(thresholds: np.ndarray) -> np.ndarray:
    """float32 t with (v > t) <=> (v > thr) for every float32 v: round thr toward -inf."""
    t32 = thresholds.astype(np.float32)
    over = t32.astype(np.float64) > thresholds
    t32[over] = np.nextafter(t32[over], np.float32(-np.inf))
    return t32


# --------------------------------------------------------------------------------------------------
# The tally: a pure accumulation over (maps, thresholds, segmentations)
# --------------------------------------------------------------------------------------------------

@dataclass
class TallyCounts:
    """Dataset-wide pixel counts (NetDissect-Lite's tally_labels / tally_both / tally_units_cat)."""

    truth: np.ndarray  # (labels,) pixels (image-level labels: sh*sw per image)
    intersect: np.ndarray  # (units, labels)
    activation: np.ndarray  # (units, categories)
    images: int


class TallyAccumulator:
    """Accumulates NetDissect counts batch by batch; everything vectorised over units and labels.

    ``primary_category`` maps label number -> index of its primary category (-1: none / label 0).
    """

    def __init__(
        self,
        thresholds: np.ndarray | Tensor,
        primary_category: np.ndarray | Tensor,
        num_categories: int,
        seg_size: tuple[int, int],
        device: torch.device | str | None = None,
        chunk_bytes: int = 256 << 20,
    ):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        thr = np.asarray(thresholds, dtype=np.float64)
        self.thresholds = torch.as_tensor(_strict_float32_threshold(thr), device=self.device)
        self.units = self.thresholds.numel()
        prim = torch.as_tensor(np.asarray(primary_category), dtype=torch.long, device=self.device).clone()
        prim[0] = -1
        if int(prim.max()) >= num_categories:
            raise ValueError(f"primary_category holds {int(prim.max())} but there are {num_categories} categories")
        self.primary = prim
        self.num_labels = prim.numel()
        self.num_categories = num_categories
        self.seg_size = (int(seg_size[0]), int(seg_size[1]))
        self.chunk_bytes = chunk_bytes
        self.truth = torch.zeros(self.num_labels, dtype=torch.long, device=self.device)
        self.intersect = torch.zeros(self.units, self.num_labels, dtype=torch.long, device=self.device)
        self.activation = torch.zeros(self.units, num_categories, dtype=torch.long, device=self.device)
        self.images = 0

    def upsample(self, maps: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C, sh, sw): PIL-style bilinear (pixel centres), as NetDissect-Lite's imresize."""
        sh, sw = self.seg_size
        x = maps.to(device=self.device, dtype=torch.float32)
        if x.shape[-2:] == (sh, sw):
            return x
        # PIL's bilinear == align_corners=False when enlarging; antialias matches it when shrinking
        shrink = x.shape[-2] > sh or x.shape[-1] > sw
        return F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=shrink)

    @torch.no_grad()
    def update(self, features: Tensor, seg: Tensor, image_labels: Tensor | None = None) -> None:
        """features (B, U, h, w) raw; seg (B, L, sh, sw) label numbers (0 = none); image_labels (B, M)."""
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
        self._update_batch(features, seg, image_labels)
        self.images += b

    def _update_batch(self, features: Tensor, seg: Tensor, image_labels: Tensor) -> None:
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

        # truth: pixel labels pooled over categories/layers, plus sh*sw per image-level label
        self.truth += torch.bincount(pix.reshape(-1), minlength=n_lab)
        self.truth += torch.bincount(image_labels.reshape(-1), minlength=n_lab) * p
        self.truth[0] = 0
        img_cat = None
        if image_labels.numel():
            lab_cat = self.primary[image_labels]  # (b, M), -1 for padding
            img_cat = F.one_hot(lab_cat + 1, n_cat + 1)[..., 1:].sum(dim=1) > 0  # (b, C)

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
                il = image_labels[pb]  # (pairs, M)
                self.intersect.view(-1).index_add_(
                    0, (pu[:, None] * n_lab + il).reshape(-1), (act[:, None] * (il > 0)).reshape(-1)
                )
            self.activation.index_add_(0, pu, act[:, None] * present)
        self.intersect[:, 0] = 0

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
) -> pd.DataFrame:
    """NetDissect-Lite's tally.csv as a DataFrame: best label per category and unit, sorted by score."""
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
    best_cat = n_cat - 1 - best_score[::-1].argmax(axis=0)  # ties -> the later category
    score = best_score[best_cat, np.arange(units)]
    order = np.argsort(-score, kind="stable")
    names = np.asarray(label_names, dtype=object)
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


def tally_columns(categories: Sequence[str] = DEFAULT_CATEGORIES) -> list[str]:
    return ["unit", "category", "label", "score"] + [f"{c}-{f}" for c in categories for f in FIELDS]


# --------------------------------------------------------------------------------------------------
# Features of a named layer
# --------------------------------------------------------------------------------------------------

class _StopForward(Exception):
    pass


class LayerCapture:
    """Forward hook on ``model.get_submodule(layer)``; stops the forward pass once it has fired."""

    def __init__(self, model: nn.Module, layer: str, stop: bool = True):
        names = dict(model.named_modules())
        if layer not in names or layer == "":
            conv_like = [n for n, m in names.items() if n and not list(m.children())]
            blocks = [n for n in names if n and n.count(".") == 0]
            raise KeyError(
                f"model has no module {layer!r}; top-level modules: {blocks}; leaf modules look like "
                f"{conv_like[:6]}... (e.g. 'layer4' or an internal dynamic layer 'layer3.0.conv1')"
            )
        self.module = names[layer]
        self.layer = layer
        self.stop = stop
        self.output: Tensor | None = None

    def _hook(self, _module, _inputs, output):
        self.output = output
        if self.stop:
            raise _StopForward

    def __call__(self, model: nn.Module, x: Tensor) -> Tensor:
        handle = self.module.register_forward_hook(self._hook)
        try:
            try:
                model(x)
            except _StopForward:
                pass
        finally:
            handle.remove()
        out = self.output
        self.output = None
        if out is None:
            raise RuntimeError(f"layer {self.layer!r} did not run during the forward pass")
        if not isinstance(out, Tensor) or out.dim() != 4:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"layer {self.layer!r} outputs {shape}; dissection needs a (B, C, h, w) map")
        return out


class FeatureStore:
    """Features (N, U, h, w) float32 in dataset order: a tensor in memory, or a memmap file."""

    def __init__(self, n: int, shape: tuple[int, int, int], memory_budget: int, cache_dir: str | Path | None):
        self.shape = (n, *shape)
        nbytes = 4 * int(np.prod(self.shape))
        self.path: Path | None = None
        if nbytes <= memory_budget:
            self.data: Tensor | np.ndarray = torch.empty(self.shape, dtype=torch.float32)
        else:
            fd, name = tempfile.mkstemp(prefix="dka-features-", suffix=".f32", dir=cache_dir)
            os.close(fd)
            self.path = Path(name)
            self.data = np.memmap(self.path, dtype=np.float32, mode="w+", shape=self.shape)
        self.filled = 0

    @property
    def in_memory(self) -> bool:
        return self.path is None

    def append(self, x: Tensor) -> None:
        b = x.shape[0]
        x = x.detach().to("cpu", torch.float32)
        if self.in_memory:
            self.data[self.filled : self.filled + b] = x
        else:
            self.data[self.filled : self.filled + b] = x.numpy()
        self.filled += b

    def batch(self, start: int, stop: int) -> Tensor:
        part = self.data[start:stop]
        return part if isinstance(part, Tensor) else torch.from_numpy(np.asarray(part))

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        for s in range(0, self.filled, batch_size):
            yield self.batch(s, min(self.filled, s + batch_size))

    def close(self) -> None:
        if self.path is not None:
            del self.data
            self.path.unlink(missing_ok=True)
            self.path = None


# --------------------------------------------------------------------------------------------------
# The whole dissection
# --------------------------------------------------------------------------------------------------

def _open_dataset(dataset_root, categories, caffe):
    if not isinstance(dataset_root, (str, os.PathLike)):
        return dataset_root  # an already built BrodenDataset (or compatible)
    root = Path(dataset_root)
    if not (root / "index.csv").is_file():
        raise FileNotFoundError(f"no Broden dataset at {root} (index.csv missing). {BRODEN_HINT}.")
    from dka.data.broden import BrodenDataset

    return BrodenDataset(root, categories=tuple(categories), caffe=caffe)


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from dka.progress import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def pick_device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def dissect(
    model: nn.Module,
    layer: str,
    dataset_root,
    batch_size: int = 64,
    device=None,
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    caffe: bool = False,
    quantile: float = QUANTILE,
    threshold_method: str = "auto",
    memory_budget: int = 2 << 30,
    cache_dir: str | Path | None = None,
    workers: int = 0,
    progress: bool = True,
    return_details: bool = False,
):
    """Network Dissection of ``layer`` of ``model`` on a Broden-format dataset -> tally DataFrame.

    ``threshold_method``: "sorted" (exact selection over stored features), "streaming" (exact
    histogram refinement, bounded memory) or "auto" (sorted when features fit ``memory_budget``).
    With ``return_details`` returns (tally, DissectionDetails) with thresholds and raw counts.
    """
    if threshold_method not in ("auto", "sorted", "streaming"):
        raise ValueError(f"threshold_method must be 'auto', 'sorted' or 'streaming', got {threshold_method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = pick_device(device)
    dataset = _open_dataset(dataset_root, categories, caffe)
    cats = list(dataset.categories)
    n = len(dataset)
    if n == 0:
        raise ValueError(f"the dataset has no image with a label in categories {cats}")
    collate = getattr(type(dataset), "collate", None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
        pin_memory=dev.type == "cuda",
    )
    capture = LayerCapture(model, layer)
    was_training = model.training
    model.eval()
    store: FeatureStore | None = None
    try:
        # pass 1: features of the layer
        for batch in _progress(loader, len(loader), f"features {layer}", progress):
            images = batch["image"].to(dev, non_blocking=True)
            feats = capture(model, images)
            if store is None:
                store = FeatureStore(n, tuple(feats.shape[1:]), memory_budget, cache_dir)
            store.append(feats)
        method = threshold_method
        if method == "auto":
            method = "sorted" if store.in_memory else "streaming"
        if method == "sorted":
            thresholds = quantile_thresholds_sorted(store.data, quantile, device=dev)
        else:
            thresholds = quantile_thresholds_streaming(lambda: store.batches(256), quantile, device=dev)
        # pass 2: the tally
        acc = TallyAccumulator(thresholds, dataset.primary_category, len(cats), dataset.seg_size, device=dev)
        start = 0
        for batch in _progress(loader, len(loader), f"tally {layer}", progress):
            b = batch["seg"].shape[0]
            acc.update(store.batch(start, start + b), batch["seg"], batch.get("image_labels"))
            start += b
    finally:
        if store is not None:
            store.close()
        model.train(was_training)
    counts = acc.counts()
    tally = tally_frame(counts, dataset.primary_category, dataset.label_names, cats)
    if return_details:
        return tally, DissectionDetails(thresholds=thresholds, counts=counts, threshold_method=method)
    return tally


@dataclass
class DissectionDetails:
    thresholds: np.ndarray  # (units,) float64, unit i-1 for tally unit i
    counts: TallyCounts
    threshold_method: str


# --------------------------------------------------------------------------------------------------
# Tally files
# --------------------------------------------------------------------------------------------------

def reference_tally_loop(features: np.ndarray, thresholds: np.ndarray, seg: np.ndarray,
                         image_labels: np.ndarray, primary: np.ndarray, n_cat: int):
    """NetDissect-Lite's tally as its loop over images x units: the executable spec of
    `TallyAccumulator` (tests compare the two count for count; bench/dissect.py times both).

    Inputs are whole-dataset numpy arrays: features (N, units, h, w) float32, seg (N, layers, sh, sw)
    label numbers, image_labels (N, M) (0 = none), primary (labels,) category index or -1. Upsampling
    is PIL's bilinear on a float image, as scipy's imresize(mode="F") in NetDissect-Lite; the
    image-level category rule is the one in the module docstring. Returns (truth, intersect, activation).
    """
    from PIL import Image

    n, units = features.shape[:2]
    n_lab = len(primary)
    labelcat = np.zeros((n_lab, n_cat))
    for lab, c in enumerate(primary):
        if lab and c >= 0:
            labelcat[lab, c] = 1
    sh, sw = seg.shape[-2:]
    intersect = np.zeros((units, n_lab))
    activation = np.zeros((units, n_cat))
    truth = np.zeros(n_lab)
    for i in range(n):
        pixels = seg[i]
        scalars = [s for s in image_labels[i] if s]
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
                hits = np.bincount(pixels[:, idx[:, 0], idx[:, 1]].ravel(), minlength=n_lab).astype(float)
                hits[0] = 0
                cat = hits @ labelcat
                intersect[u] += hits
                for s in scalars:
                    cat += labelcat[s]
                    intersect[u, s] += len(idx)
                activation[u] += len(idx) * (cat > 0)
    return truth, intersect, activation


def write_tally(df: pd.DataFrame, path: str | Path) -> Path:
    """Write tally.csv atomically (temp file in the same folder, then os.replace)."""
    with atomic_write(path, newline="") as handle:
        df.to_csv(handle, index=False)
    return Path(path)


def read_tally(path: str | Path) -> pd.DataFrame:
    """Read a NetDissect-Lite tally.csv (ours or the authors' released one), checking its columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tally at {path}; produce one with `python -m dka dissect ... --out DIR`")
    df = pd.read_csv(path, keep_default_na=False, na_values=[])
    head = ["unit", "category", "label", "score"]
    if list(df.columns[:4]) != head or (len(df.columns) - 4) % len(FIELDS):
        raise ValueError(f"{path} is not a NetDissect tally: columns start {list(df.columns[:6])}")
    cats = [c[: -len("-label")] for c in df.columns[4:: len(FIELDS)]]
    if list(df.columns) != tally_columns(cats):
        raise ValueError(f"{path}: columns do not follow `<category>-{{{','.join(FIELDS)}}}` per category")
    return df


def tally_categories(df: pd.DataFrame) -> list[str]:
    return [c[: -len("-label")] for c in df.columns[4:: len(FIELDS)]]


def tally_summary(df: pd.DataFrame, iou_threshold: float = INTERPRETABLE_IOU) -> dict:
    """Interpretable units (score >= threshold), unique concepts among them, per-category counts."""
    good = df[df["score"] >= iou_threshold]
    return {
        "units": int(len(df)),
        "interpretable_units": int(len(good)),
        "unique_concepts": int(good["label"].nunique()),
        "mean_score": float(df["score"].mean()),
        "by_category": {str(k): int(v) for k, v in good["category"].value_counts().items()},
    }


def unit_labels(df: pd.DataFrame) -> pd.DataFrame:
    """unit (1-based) -> label, category, score, indexed by unit."""
    return df.set_index("unit")[["label", "category", "score"]].sort_index()


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dka dissect",
        description="Network Dissection (NetDissect-Lite definitions) of one layer of a checkpoint.",
    )
    parser.add_argument("--checkpoint", required=True, help="model checkpoint (final.pt from dka train)")
    parser.add_argument("--layer", default="layer4", help="module name, e.g. layer4 or layer3.0.conv1")
    parser.add_argument("--data", required=True, help="Broden-format dataset root (index.csv, label.csv ...)")
    parser.add_argument("--out", required=True, help="output folder: tally.csv, thresholds.csv")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--categories", default=",".join(DEFAULT_CATEGORIES))
    parser.add_argument("--caffe", action="store_true", help="Caffe-style preprocessing (as NetDissect-Lite)")
    parser.add_argument("--threshold-method", default="auto", choices=("auto", "sorted", "streaming"))
    parser.add_argument("--memory-budget-gb", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    from dka.checkpoint import load_model

    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        parser.error(f"no checkpoint at {ckpt}; train one with `python -m dka train ...` (writes final.pt)")
    model = load_model(ckpt)
    dev = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(dev)
    tally, details = dissect(
        model, args.layer, args.data, batch_size=args.batch_size, device=dev,
        categories=[c for c in args.categories.split(",") if c], caffe=args.caffe,
        threshold_method=args.threshold_method, memory_budget=int(args.memory_budget_gb * (1 << 30)),
        cache_dir=args.out, workers=args.workers, return_details=True,
    )
    write_tally(tally, out / "tally.csv")
    thr = pd.DataFrame({"unit": np.arange(1, len(details.thresholds) + 1), "threshold": details.thresholds})
    write_tally(thr, out / "thresholds.csv")
    s = tally_summary(tally)
    print(f"{out / 'tally.csv'}: {s['interpretable_units']}/{s['units']} units with IoU >= {INTERPRETABLE_IOU}, "
          f"{s['unique_concepts']} unique concepts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
