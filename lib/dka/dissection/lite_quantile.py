"""NetDissect-Lite's threshold rule: its streaming quantile sketch and its readout, reproduced.

NetDissect-Lite (`feature_operation.quantile_threshold`) does not take an exact quantile. It feeds a
randomised KLL-style sketch (`util/vecquantile.py`, class QuantileVector, depth = units,
resolution 24 * 1024, seed 1) with the layer's float64 features, 64 images at a time, each batch
laid out as rows (image, y, x) x units, and takes ``readout(1000)[:, 994]``. This module keeps the
same state and makes the same random draws, so it returns the same thresholds:

- *Levels.* Level k holds samples of weight 2**k. Values enter level 0 (capacity 24,576 at first).
  When level 0 is full it is sorted, its min/max merged into the running extremes, and every other
  value (offset 0 or 1, one `RandomState(1).binomial(1, 0.5)` draw shared by all units) moves up a
  level; a level with less free room than half the capacity of the level below it is compacted the
  same way. When the top level must be compacted, a new level 0 of capacity
  ceil(24576 * 0.67**levels) is inserted below all others (every level's weight doubles), and each
  old level moves down one step if it fits there, else is compacted in place.
- *Exact regime.* Up to 24,576 values per unit nothing is ever compacted: the summary is every value
  with weight 1.
- *Readout.* The summary is [min, max, level values...] with weights [0, 0, 2**k...], argsorted per
  unit; positions are ``cumsum(w) - w/2`` in float32, shifted to start at 0 and divided by their last
  entry (numpy.percentile's convention); the threshold is ``np.interp(q, positions, values)`` at
  q = linspace(0, 1, 1000)[994] = 994/999. The zero-weight extremes tie with the data's own min and
  max, so where the sort puts them moves the cut: min first gives the position 0, max after the data
  max stretches the last step to a full rank, before it squeezes it to half. In the exact regime with
  the extremes placed as numpy's classic sort places them (min first, always), the threshold is the
  linear interpolation of the sorted values at rank ``q * b - 1/2`` with b = n when the max extreme
  ends last, b = n - 1/2 otherwise (numpy's own linear quantile is rank q * (n - 1)).
- *Sort order.* NetDissect-Lite ran on numpy's classic introsort; :mod:`dka.dissection.legacy_sort`
  reproduces its order for the positions that matter (first, last, and the tie groups at the cut).

Reproduced exactly: the state, the draws, the float32 positions and the interpolation. The inputs
must be in NetDissect-Lite's order (dataset rows in index.csv order). Not reproduced: the subsampling
mode the sketch enters beyond about 10**11 values per unit (an error says so).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from dka.dissection.legacy_sort import legacy_order_at

__all__ = ["LiteQuantileSketch", "netdissect_thresholds", "lite_readout", "readout_index", "LITE_RESOLUTION",
           "LITE_SEED", "LITE_FEED_IMAGES", "LITE_READOUT", "LITE_TOP_SHARE"]

LITE_RESOLUTION = 24 * 1024
LITE_SEED = 1
LITE_FEED_IMAGES = 64  # images per add() in feature_operation.quantile_threshold
LITE_READOUT = 1000  # readout(1000): evenly spaced quantiles in [0, 1]
LITE_TOP_SHARE = 0.005  # settings.QUANTILE: it reads entry int(1000 * (1 - 0.005) - 1) = 994


def readout_index(q: float, count: int = LITE_READOUT) -> int:
    """The readout entry whose position linspace(0, 1, count)[i] is q (994 for q = 994/999).

    NetDissect-Lite can only cut at those positions; q = 994/999 is the one its settings
    (QUANTILE = 0.005: entry int(1000 * (1 - 0.005) - 1)) give.
    """
    index = int(round(q * (count - 1)))
    if not 0 <= index < count or abs(np.linspace(0.0, 1.0, count)[index] - q) > 1e-12:
        raise ValueError(f"NetDissect-Lite's threshold can only be read at i/{count - 1} (its readout({count})); "
                         f"{q} is not one of those (its own setting gives {int(count * (1 - LITE_TOP_SHARE) - 1)}"
                         f"/{count - 1})")
    return index


class LiteQuantileSketch:
    """NetDissect-Lite's QuantileVector with `depth` = units, fed rows of (values, units) float64."""

    def __init__(self, units: int, resolution: int = LITE_RESOLUTION, seed: int = LITE_SEED):
        self.units = int(units)
        self.resolution = int(resolution)
        self.buffer = min(128, (self.resolution + 7) // 8)
        self.levels = [np.zeros((self.units, self.resolution))]  # levels[k]: samples of weight 2**k
        self.fill = [0]
        self.random = np.random.RandomState(seed)
        self.extremes = np.full((self.units, 2), np.nan)
        self.size = 0

    @property
    def exact(self) -> bool:
        """True while every value added is still held with weight 1 (no compaction yet)."""
        return len(self.levels) == 1

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.units:
            raise ValueError(f"rows must be (n, {self.units}), got {rows.shape}")
        self.size += rows.shape[0]
        start = 0
        while start < rows.shape[0]:
            room = self.levels[0].shape[1] - self.fill[0]
            if room == 0:
                self._make_room()
                room = self.levels[0].shape[1] - self.fill[0]
            take = min(room, rows.shape[0] - start)
            f = self.fill[0]
            self.levels[0][:, f : f + take] = rows[start : start + take].T
            self.fill[0] += take
            start += take

    def _need(self, k: int) -> int:
        """Free room level k must keep: 1 for level 0, else half the level below it (rounded up)."""
        return 1 if k == 0 else -(-self.levels[k - 1].shape[1] // 2)

    def _merge_extremes(self, block: np.ndarray) -> None:
        self.extremes[:, 0] = np.nanmin([self.extremes[:, 0], block[:, 0]], axis=0)
        self.extremes[:, 1] = np.nanmax([self.extremes[:, 1], block[:, -1]], axis=0)

    def _halve(self, block: np.ndarray, track_extremes: bool) -> np.ndarray:
        block.sort(axis=1)
        if track_extremes:
            self._merge_extremes(block)
        return block[:, self.random.binomial(1, 0.5)::2]

    def _make_room(self) -> None:
        k = 0
        while self.levels[k].shape[1] - self.fill[k] < self._need(k):
            if k + 1 == len(self.levels):
                self._add_level()
                return
            kept = self._halve(self.levels[k][:, : self.fill[k]], track_extremes=k == 0)
            f = self.fill[k + 1]
            self.levels[k + 1][:, f : f + kept.shape[1]] = kept
            self.fill[k] = 0
            self.fill[k + 1] += kept.shape[1]
            k += 1

    def _add_level(self) -> None:
        cap = math.ceil(self.resolution * 0.67 ** len(self.levels))
        if cap < 2:
            raise ValueError("NetDissect-Lite's sketch would switch to subsampling here (over ~1e11 values per "
                             "unit); that mode is not reproduced")
        self.levels.insert(0, np.empty((self.units, max(self.buffer, int(cap)))))
        self.fill.insert(0, 0)
        for k in range(1, len(self.levels)):
            amount = self.fill[k]
            if amount == 0:
                continue
            below = self.fill[k - 1]
            if self.levels[k - 1].shape[1] - (amount + below) >= self._need(k - 1):
                self.levels[k - 1][:, below : below + amount] = self.levels[k][:, :amount]
                self.fill[k - 1] += amount
                self.fill[k] = 0
            else:
                kept = self._halve(self.levels[k][:, :amount], track_extremes=k == 1).copy()
                self.levels[k][:, : kept.shape[1]] = kept
                self.fill[k] = kept.shape[1]

    def summary(self) -> tuple[np.ndarray, np.ndarray]:
        """(values (units, m), weights (m,) float32): the extremes (weight 0) then each level's values."""
        if self.fill[0]:
            live = self.levels[0][:, : self.fill[0]]
            self.extremes[:, 0] = np.nanmin([self.extremes[:, 0], np.nanmin(live, axis=1)], axis=0)
            self.extremes[:, 1] = np.nanmax([self.extremes[:, 1], np.nanmax(live, axis=1)], axis=0)
        parts = [self.extremes]
        weights = [np.zeros(2, dtype=np.float32)]
        for k, f in enumerate(self.fill):
            if f:
                parts.append(self.levels[k][:, :f])
                weights.append(np.full(f, 2.0**k, dtype=np.float32))
        return np.concatenate(parts, axis=1), np.concatenate(weights)

    def readout_at(self, index: int, count: int = LITE_READOUT) -> np.ndarray:
        """readout(count)[:, index] (old-style positions), per unit."""
        if self.size == 0:
            return np.full(self.units, np.nan)
        values, weights = self.summary()
        q = float(np.linspace(0.0, 1.0, count)[index])
        return np.array([lite_readout(values[u], weights, q) for u in range(self.units)])


def _order_for_readout(values: np.ndarray, weights: np.ndarray, q: float) -> np.ndarray:
    """The legacy argsort, decided where the readout at q can depend on the order of ties: the first
    and last entries and the tie groups around the cut (see legacy_sort.legacy_order_at)."""
    stable = np.argsort(values, kind="stable")
    sv, sw = values[stable], weights[stable].astype(np.float64)
    n = len(sv)
    total = float(sw.sum())
    wmax = float(sw.max())
    cum = np.cumsum(sw)
    # the cut lies at cum0 + q * (last - cum0) with cum0 in [0, wmax/2], last in [total - wmax/2, total]
    lo_t, hi_t = q * (total - wmax) - wmax, q * total + wmax
    new_group = np.r_[True, sv[1:] != sv[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:] - 1, n - 1]
    before = np.r_[0.0, cum][starts]  # weight before each group
    after = cum[ends]
    near = (after >= lo_t) & (before <= hi_t)
    positions = np.r_[0, n - 1, starts[near], ends[near]]
    return legacy_order_at(values, positions)


def lite_readout(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """One unit's readout at q from its summary (values (m,), weights (m,) float32), as
    QuantileVector.quantiles(old_style=True) computes it after numpy's classic argsort."""
    order = _order_for_readout(values, weights, q)
    v = values[order]
    w = weights[order]
    pos = np.cumsum(w) - w / 2  # float32, as in the sketch
    pos -= pos[0:1]
    pos /= pos[-1:]
    return float(np.interp(q, pos, v))


def netdissect_thresholds(
    batches: Callable[[], Iterable[Tensor]] | Iterable[Tensor] | Tensor | np.ndarray,
    q: float = 994 / 999,
    feed_images: int = LITE_FEED_IMAGES,
    stats: dict | None = None,
) -> np.ndarray:
    """Per-unit thresholds by NetDissect-Lite's rule, from features (N, U, h, w) in dataset order.

    `q` is the readout position (994/999, NetDissect-Lite's setting; it must be some i/999).

    `batches` is the whole feature array, or (a callable returning) an iterable of (B, U, h, w)
    batches in dataset order; they are regrouped into the 64-image feeds NetDissect-Lite uses.
    With `stats` (a dict) records whether the sketch stayed exact and how many values it took.
    """
    if isinstance(batches, (Tensor, np.ndarray)):
        source: Iterable = [batches]
    else:
        source = batches() if callable(batches) else batches
    sketch: LiteQuantileSketch | None = None
    pending: list[np.ndarray] = []
    held = 0

    def feed(block: np.ndarray) -> None:
        nonlocal sketch
        if sketch is None:
            sketch = LiteQuantileSketch(block.shape[1])
        rows = np.ascontiguousarray(block.transpose(0, 2, 3, 1)).reshape(-1, block.shape[1])
        sketch.add(rows.astype(np.float64))

    for x in source:
        arr = x.detach().to("cpu", torch.float32).numpy() if isinstance(x, Tensor) else np.asarray(x, np.float32)
        if arr.ndim != 4:
            raise ValueError(f"features must be (B, U, h, w), got shape {arr.shape}")
        pending.append(arr)
        held += arr.shape[0]
        while held >= feed_images:
            joined = np.concatenate(pending)
            feed(joined[:feed_images])
            rest = joined[feed_images:]
            pending, held = ([rest] if len(rest) else []), rest.shape[0]
    if held:
        feed(np.concatenate(pending))
    if sketch is None:
        raise ValueError("no feature batches: the dataset is empty")
    if stats is not None:
        stats.update(exact=sketch.exact, values_per_unit=sketch.size, levels=len(sketch.levels))
    return sketch.readout_at(readout_index(q))
