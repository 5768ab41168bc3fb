"""Statistics that tell an effect from noise: intervals over seeds, paired tests on one test set, bootstrap.

Why this module: a single seed carries no comparison (the same demo command moved res18 from 89.95 to
92.20 between two machines, and a 2,000-image test set alone gives one accuracy a standard error near
1.1 points). Every comparison table in dka therefore reports, for each number, the mean over seeds with
a 95% t-interval, and for two models evaluated on the same images a paired test:

- `Interval` / `mean_interval`: mean ± t-interval over seeds (n = 1 gives the value and no interval).
- `bootstrap_interval`: a percentile bootstrap interval of any statistic of per-item values (images,
  classes, units), for numbers that come from one run (dissection and composability statistics).
- `mcnemar`: the exact McNemar test of two classifiers' per-image correctness on the same images.
- `paired_difference`: the mean difference of two models over matching seeds with its t-interval, and
  the per-image paired bootstrap interval when only one seed exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["Interval", "mean_interval", "bootstrap_interval", "bootstrap_difference", "mcnemar", "paired_difference",
           "CONFIDENCE"]

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval: `low`/`high` are NaN when it cannot be estimated (n = 1)."""

    mean: float
    low: float
    high: float
    n: int
    sd: float = float("nan")
    method: str = "t"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __neg__(self) -> Interval:
        """The interval of minus the quantity (e.g. B - A from A - B)."""
        return Interval(-self.mean, -self.high, -self.low, self.n, self.sd, self.method)

    def excludes(self, value: float) -> bool:
        """Whether the interval lies entirely on one side of `value` (False without an interval)."""
        return bool(self.low > value or self.high < value)

    def format(self, digits: int = 2, scale: float = 1.0) -> str:
        """"93.10 ± 0.84" (mean ± half-width), or just the mean when there is no interval."""
        mean = self.mean * scale
        if math.isnan(self.low):
            return f"{mean:.{digits}f}"
        return f"{mean:.{digits}f} ± {self.half_width * scale:.{digits}f}"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "sd": self.sd,
                "method": self.method}


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and two-sided t-interval of independent values (e.g. one accuracy per seed); NaNs dropped."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(float(x))], dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_interval needs at least one finite value")
    mean = float(v.mean())
    if v.size == 1:
        return Interval(mean, float("nan"), float("nan"), 1)
    sd = float(v.std(ddof=1))
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, v.size - 1)) * sd / math.sqrt(v.size)
    return Interval(mean, mean - half, mean + half, int(v.size), sd, "t")


def bootstrap_interval(items: Sequence | np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean,
                       n_boot: int = 2000, confidence: float = CONFIDENCE, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of `statistic` over resampled items (rows of `items`).

    Args:
        items: per-item values (1-D) or per-item rows (2-D: the statistic sees the resampled rows).
        statistic: maps the (resampled) items to one number.
        n_boot: resamples; seed: the resampling stream (fixed, so tables are reproducible).
    """
    arr = np.asarray(items)
    if arr.shape[0] == 0:
        raise ValueError("bootstrap_interval needs at least one item")
    point = float(statistic(arr))
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for b in range(n_boot):
        draws[b] = statistic(arr[rng.integers(0, arr.shape[0], arr.shape[0])])
    alpha = (1 - confidence) / 2
    low, high = np.nanquantile(draws, [alpha, 1 - alpha])
    return Interval(point, float(low), float(high), int(arr.shape[0]), float(np.nanstd(draws, ddof=1)), "bootstrap")


def bootstrap_difference(items_a: Sequence[float], items_b: Sequence[float],
                         statistic: Callable[[np.ndarray], float] = np.mean, n_boot: int = 2000,
                         confidence: float = CONFIDENCE, seed: int = 0) -> Interval:
    """statistic(A) - statistic(B) for two independent samples (e.g. the IoUs of two models' units, which
    are not paired), with a percentile interval from resampling each sample on its own."""
    a, b = np.asarray(items_a, dtype=np.float64), np.asarray(items_b, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("bootstrap_difference needs at least one item in each sample")
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(a[rng.integers(0, a.size, a.size)]) - statistic(b[rng.integers(0, b.size, b.size)])
                      for _ in range(n_boot)])
    alpha = (1 - confidence) / 2
    low, high = np.nanquantile(draws, [alpha, 1 - alpha])
    return Interval(float(statistic(a) - statistic(b)), float(low), float(high), int(min(a.size, b.size)),
                    float(np.nanstd(draws, ddof=1)), "bootstrap (independent samples)")


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact McNemar test: do two classifiers differ in accuracy on the same images?

    Returns the discordant counts (`a_only`: A right and B wrong, `b_only`) and the two-sided exact
    binomial p-value of a_only given a_only + b_only discordant images.
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"the two models were scored on different images ({a.shape} vs {b.shape})")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n = a_only + b_only
    p = 1.0 if n == 0 else float(_scipy_stats.binomtest(a_only, n, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p, "images": int(a.size)}


def paired_difference(values_a: Sequence[float], values_b: Sequence[float], correct_a=None, correct_b=None,
                      confidence: float = CONFIDENCE, seed: int = 0) -> Interval:
    """Mean of A - B over matching seeds with its t-interval.

    With a single seed the interval comes from a paired bootstrap over the test images instead
    (`correct_a`/`correct_b`: that seed's per-image correctness, in percent units like the values).
    """
    a, b = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs one value per seed for both models ({a.size} vs {b.size})")
    if a.size >= 2:
        return mean_interval(a - b, confidence)
    if correct_a is None or correct_b is None:
        return Interval(float(a[0] - b[0]), float("nan"), float("nan"), 1)
    diff = 100.0 * (np.asarray(correct_a, dtype=np.float64) - np.asarray(correct_b, dtype=np.float64))
    iv = bootstrap_interval(diff, np.mean, confidence=confidence, seed=seed)
    return Interval(float(a[0] - b[0]), iv.low, iv.high, 1, iv.sd, "paired bootstrap over images")
