"""Per-unit activation thresholds: the 994/999 quantile of each unit's raw activations.

NetDissect-Lite reads its threshold as QuantileVector.readout(1000)[:, int(1000 * (1 - 0.005) - 1)], i.e.
entry 994 of 1000 evenly spaced quantiles in [0, 1]: the 994/999 quantile. Two exact ways to get it:
:func:`quantile_thresholds_sorted` (selection over stored features, N*h*w*4 bytes per unit of working
memory) and :func:`quantile_thresholds_streaming` (histogram refinement over repeated passes, bounded
memory), which agree to the last bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

__all__ = ["QUANTILE", "quantile_thresholds_sorted", "quantile_thresholds_streaming", "StreamingQuantileStats",
           "strict_float32_threshold"]

QUANTILE: float = 994 / 999


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


def strict_float32_threshold(thresholds: np.ndarray) -> np.ndarray:
    """float32 t with (v > t) <=> (v > thr) for every float32 v: round thr toward -inf."""
    t32 = thresholds.astype(np.float32)
    over = t32.astype(np.float64) > thresholds
    t32[over] = np.nextafter(t32[over], np.float32(-np.inf))
    return t32
