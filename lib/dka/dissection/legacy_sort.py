"""numpy's classic `argsort(kind="quicksort")`, reproduced to the order it gives tied values.

Why: NetDissect-Lite's threshold readout sorts a summary in which the minimum and maximum appear
twice (a zero-weight extreme entry and the data value itself), and the unit ranking of its tally
sorts scores; where the two copies of a tie land decides the threshold to half a rank, and the
order of tied units. numpy computed those sorts with its scalar introsort from 1.12 until SIMD sorts
replaced it (numpy >= 1.25/1.26 on AVX512/AVX2 machines), so today's `np.argsort` no longer gives
that order. The algorithm, as documented in numpy's `npysort/quicksort` sources: median-of-three
pivot, a partition whose two scans both stop on values equal to the pivot, ranges of at most 16
elements finished by insertion sort, the larger part deferred on a stack and the smaller continued,
and a heapsort for a deferred range once 2 * floor(log2(n)) partitions lie above it.

:func:`legacy_argsort` runs the whole algorithm (each partition vectorised with numpy).
:func:`legacy_order_at` runs it only where it decides something asked for: the caller names final
positions, and a range is processed only while it holds two or more members of the tie group that
ends at one of them (any other range's members are distinct at those positions, so value order
settles them). That is what makes the readout cheap: a few chains of shrinking ranges per unit.
"""

from __future__ import annotations

import numpy as np

__all__ = ["legacy_argsort", "legacy_order_at", "SMALL_RANGE"]

SMALL_RANGE = 16  # ranges of at most this many elements are insertion-sorted


def _msb(n: int) -> int:
    return max(int(n).bit_length() - 1, 0)


def _swap(a: np.ndarray, i: int, j: int) -> None:
    a[i], a[j] = a[j], a[i]


def _partition(v: np.ndarray, a: np.ndarray, pl: int, pr: int) -> int:
    """One partition step of the classic algorithm on a[pl..pr]; returns the pivot's final place.

    The scans are vectorised: the left scan visits, in order, the places holding values >= pivot,
    the right scan the places holding values <= pivot (right to left); the k-th of each are
    swapped until they cross, exactly as the pointer loop does (see the module docstring).
    """
    pm = pl + ((pr - pl) >> 1)
    if v[a[pm]] < v[a[pl]]:
        _swap(a, pm, pl)
    if v[a[pr]] < v[a[pm]]:
        _swap(a, pr, pm)
    if v[a[pm]] < v[a[pl]]:
        _swap(a, pm, pl)
    vp = v[a[pm]]
    _swap(a, pm, pr - 1)
    seg = v[a[pl:pr]]  # places pl .. pr-1
    left = np.flatnonzero(seg[1:] >= vp) + (pl + 1)  # places the left scan stops at (pivot at pr-1 ends it)
    right = (np.flatnonzero(seg[:-1] <= vp) + pl)[::-1]  # places the right scan stops at (a[pl] <= pivot)
    m = min(len(left), len(right))
    k = int(np.argmax(left[:m] >= right[:m]))  # first round in which the scans meet (always exists)
    if k:
        li, ri = left[:k], right[:k]
        a[li], a[ri] = a[ri], a[li].copy()
    pi = int(left[0]) if k == 0 else int(min(left[k], right[k - 1]))
    _swap(a, pi, pr - 1)
    return pi


def _insertion(v: np.ndarray, a: np.ndarray, pl: int, pr: int) -> None:
    idx = a[pl : pr + 1].tolist()
    for i in range(1, len(idx)):
        item = idx[i]
        key = v[item]
        j = i
        while j > 0 and key < v[idx[j - 1]]:
            idx[j] = idx[j - 1]
            j -= 1
        idx[j] = item
    a[pl : pr + 1] = idx


def _heapsort(v: np.ndarray, a: np.ndarray, pl: int, pr: int) -> None:
    """numpy's argsort heapsort on a[pl..pr] (1-based heap over the range)."""
    h = [0] + a[pl : pr + 1].tolist()
    n = len(h) - 1

    def sift(i: int, size: int, item: int) -> None:
        j = i << 1
        while j <= size:
            if j < size and v[h[j]] < v[h[j + 1]]:
                j += 1
            if v[item] < v[h[j]]:
                h[i] = h[j]
                i = j
                j += j
            else:
                break
        h[i] = item

    for top in range(n >> 1, 0, -1):
        sift(top, n, h[top])
    while n > 1:
        item = h[n]
        h[n] = h[1]
        n -= 1
        sift(1, n, item)
    a[pl : pr + 1] = h[1:]


def _introsort(v: np.ndarray, a: np.ndarray, wanted) -> list[tuple[int, int]]:
    """Sort a (indices into v) in place as numpy's classic aquicksort does; ranges for which
    ``wanted(pl, pr)`` is False are left as they are and returned (their order is not decided)."""
    skipped: list[tuple[int, int]] = []
    stack: list[tuple[int, int, int]] = []
    pl, pr, depth = 0, len(a) - 1, 2 * _msb(len(a))
    while True:
        if depth < 0:
            if wanted(pl, pr):
                _heapsort(v, a, pl, pr)
            else:
                skipped.append((pl, pr))
        else:
            done = False
            while pr - pl >= SMALL_RANGE:
                if not wanted(pl, pr):
                    skipped.append((pl, pr))
                    done = True
                    break
                pi = _partition(v, a, pl, pr)
                depth -= 1
                if pi - pl < pr - pi:
                    stack.append((pi + 1, pr, depth))
                    pr = pi - 1
                else:
                    stack.append((pl, pi - 1, depth))
                    pl = pi + 1
            if not done and pr > pl:
                if wanted(pl, pr):
                    _insertion(v, a, pl, pr)
                else:
                    skipped.append((pl, pr))
        if not stack:
            return skipped
        pl, pr, depth = stack.pop()


def _check(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values)
    if v.ndim != 1:
        raise ValueError(f"legacy sorts take a 1-d array, got shape {v.shape}")
    if v.dtype.kind == "f" and np.isnan(v).any():
        raise ValueError("legacy sorts do not reproduce numpy's NaN ordering; the values hold NaN")
    return v


def legacy_argsort(values: np.ndarray) -> np.ndarray:
    """`np.argsort(values)` as numpy 1.12-1.25 computed it (the scalar introsort), ties included."""
    v = _check(values)
    a = np.arange(len(v), dtype=np.int64)
    if len(a) > 1:
        _introsort(v, a, lambda pl, pr: True)
    return a


def legacy_order_at(values: np.ndarray, positions) -> np.ndarray:
    """An argsort of `values` that agrees with :func:`legacy_argsort` at the final `positions`.

    Elsewhere tied values may be ordered differently (stably); values themselves are in sorted order
    everywhere. Cost: only the ranges that decide which tied element ends at a named position are
    sorted the legacy way.
    """
    v = _check(values)
    n = len(v)
    a = np.arange(n, dtype=np.int64)
    if n < 2:
        return a
    sv = np.sort(v, kind="stable")
    new_group = np.r_[True, sv[1:] != sv[:-1]]
    gid = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:] - 1, n - 1]
    pos = np.unique(np.clip(np.asarray(list(positions), dtype=np.int64), 0, n - 1))
    pos = pos[ends[gid[pos]] > starts[gid[pos]]]  # a position in a group of one is settled by value
    if len(pos) == 0:
        return np.argsort(v, kind="stable")
    g_lo, g_hi = starts[gid[pos]], ends[gid[pos]]

    def wanted(pl: int, pr: int) -> bool:
        inside = (pos >= pl) & (pos <= pr)
        return bool(np.any(inside & (np.minimum(pr, g_hi) - np.maximum(pl, g_lo) >= 1)))

    for pl, pr in _introsort(v, a, wanted):
        part = a[pl : pr + 1]
        a[pl : pr + 1] = part[np.argsort(v[part], kind="stable")]
    return a
