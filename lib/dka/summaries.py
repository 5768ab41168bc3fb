"""Numbers over seeds, as the notebooks' comparison tables report them.

Every run of a profile trains once per seed (`runtime.seeds`). A table row then shows, for each
quantity, the mean over the seeds and its 95% t-interval (`dka.stats.mean_interval`), and a comparison
with the baseline the paired difference over matching seeds (seed s of A against seed s of B: the same
data order and initialisation stream). With one seed the interval falls back to a paired bootstrap over
the test images, and the table says which interval it shows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

import pandas as pd

from dka.evaluation import Collected
from dka.models import parse_name
from dka.stats import Interval, bootstrap_interval, mcnemar, mean_interval, paired_difference

__all__ = ["per_seed", "over_seeds", "differences", "mcnemar_per_seed", "fmt", "cell", "bootstrap_share",
           "interval_note", "run_table", "head_k_share", "method_table"]


def over_seeds(values: Mapping[str, Sequence[float]]) -> dict[str, Interval]:
    """{run: mean and t-interval of its per-seed values}."""
    return {run: mean_interval(v) for run, v in values.items()}


def differences(values: Mapping[str, Sequence[float]], baseline: str,
                evals: Mapping[str, Sequence[Collected]] | None = None) -> dict[str, Interval]:
    """{run: run - baseline}, paired by seed; with one seed, a paired bootstrap over the test images.

    Args:
        values: per run, one value per seed (in percent for accuracies).
        baseline: the run compared against (it maps to a zero difference).
        evals: per run, the per-seed `Collected` test pass (needed only for the one-seed bootstrap of
            accuracies).
    """
    if baseline not in values:
        raise KeyError(f"baseline {baseline!r} is not among the runs {sorted(values)}")
    out = {}
    for run, v in values.items():
        ca = cb = None
        if evals is not None and len(v) == 1:
            ca, cb = evals[run][0].correct, evals[baseline][0].correct
        out[run] = paired_difference(v, values[baseline], ca, cb)
    return out


def mcnemar_per_seed(evals: Mapping[str, Sequence[Collected]], baseline: str) -> dict[str, list[float]]:
    """{run: [exact McNemar p-value against the baseline, one per seed]} on the same test images."""
    return {run: [mcnemar(a.correct, b.correct)["p_value"] for a, b in zip(runs, evals[baseline], strict=True)]
            for run, runs in evals.items()}


def cell(values: Sequence[float], digits: int = 2) -> str:
    """A table cell from per-seed values: mean ± 95% half-width, or "–" when any value is missing."""
    if not len(values) or any(v != v for v in values):  # NaN: the quantity does not apply to this run
        return "–"
    return fmt(mean_interval(values), digits)


def bootstrap_share(flags: Sequence[bool]) -> Interval:
    """The share of True among items (classes, units) with a bootstrap interval over the items."""
    return bootstrap_interval(np.asarray(flags, dtype=np.float64), np.mean)


def fmt(interval: Interval, digits: int = 2, scale: float = 1.0) -> str:
    """A table cell: "84.16 ± 0.31" (mean ± 95% half-width), or the bare mean without an interval."""
    return interval.format(digits, scale)


def interval_note(n_seeds: int) -> str:
    """One line saying what the ± in a table means."""
    if n_seeds >= 2:
        return f"mean ± 95% t-interval half-width over {n_seeds} seeds"
    return "one seed: differences carry a paired bootstrap interval over the test images; other numbers none"


def per_seed(results: Mapping[str, Sequence], value: Callable) -> dict[str, list[float]]:
    """{run: [value(result) for each seed's result]} — e.g. the final test top-1 of every seed."""
    return {run: [float(value(r)) for r in runs] for run, runs in results.items()}



def head_k_share(model: str, inputs: int) -> float:
    """K of a Dynamic-K head as a share of its inputs (%), NaN for a dense head.

    The paper's K = 5 routes 1% of ResNet18's 512 features; at width 16 (128 features) K = 5 routes 3.9%,
    so heads of different widths are compared by this share, not by K.
    """
    k = parse_name(model).head_k
    return float("nan") if k is None else 100.0 * k / inputs


def run_table(results: Mapping[str, Sequence], evals: Mapping[str, Sequence[Collected]],
              finals: Mapping[str, Sequence[dict]], baseline: str | None,
              paper: Mapping[str, float | tuple[float, float]] | None = None) -> tuple[pd.DataFrame, dict]:
    """Table 1 as the notebooks show it: accuracy, the difference from the baseline, both sparsities.

    Args:
        results: {run: [RunResult per seed]} (their metrics give the sparsities of the last epoch).
        evals: {run: [Collected per seed]} (the test pass: accuracy, paired tests).
        finals: {run: [final.pt payload per seed]} (the model name and the head's width).
        baseline: the run the others are compared with (None: no comparison columns).
        paper: {model: the paper's top-1, or (top-1, top-5)}.

    Returns:
        (the display table with "mean ± half-width" cells, {run: {quantity: Interval}} for metrics files
        and claims).
    """
    top1 = {run: [c.accuracy for c in cs] for run, cs in evals.items()}
    small = per_seed(results, lambda r: 100 * r.metrics[-1]["sparsity"]["head"])
    routed = per_seed(results, lambda r: 100 * r.metrics[-1].get("never_routed", {}).get("head", float("nan")))
    top5 = per_seed(results, lambda r: r.metrics[-1]["test_top5"])
    delta = differences(top1, baseline, evals) if baseline else {}
    pvalues = mcnemar_per_seed(evals, baseline) if baseline else {}
    rows, intervals = [], {}
    for run in results:
        model = finals[run][0]["config"]["model"]
        inputs = int(finals[run][0]["state_dict"]["head.weight"].shape[1])
        iv = {"top1": mean_interval(top1[run]), "top5": mean_interval(top5[run]),
              "small": mean_interval(small[run])}
        has_routing = not all(np.isnan(routed[run]))
        if has_routing:
            iv["never_routed"] = mean_interval(routed[run])
        if run in delta:
            iv["delta_top1"] = delta[run]
        ref = (paper or {}).get(model)
        ref = ref[0] if isinstance(ref, tuple) else ref
        rows.append({
            "model": run, "K / inputs (%)": head_k_share(model, inputs), "top-1 (%)": fmt(iv["top1"]),
            **({f"top-1 − {baseline}": fmt(delta[run]) if run != baseline else "–",
                "McNemar p": ", ".join(f"{p:.2g}" for p in pvalues[run]) if run != baseline else "–"}
               if baseline else {}),
            "top-5 (%)": fmt(iv["top5"]), "|w| < 1e-3 (%)": fmt(iv["small"], 1),
            "never routed (%)": fmt(iv["never_routed"], 1) if has_routing else "– (dense)",
            "paper top-1 (%)": ref if ref is not None else float("nan"), "seeds": len(evals[run]),
        })
        intervals[run] = iv
    return pd.DataFrame(rows), intervals


def method_table(scores: pd.DataFrame, key: str = "method") -> pd.DataFrame:
    """One row per `key` value, each numeric column as "mean ± sd" over its rows (the seeds).

    A column that is NaN for every seed of a row (the metric does not apply) shows "–".
    """
    numeric = [c for c in scores.columns if c not in (key, "seed") and pd.api.types.is_numeric_dtype(scores[c])]
    rows = []
    for name, group in scores.groupby(key, sort=False):
        row = {key: name, "seeds": len(group)}
        for column in numeric:
            values = group[column].to_numpy(dtype=float)
            if np.isnan(values).all():
                row[column] = "–"
                continue
            values = values[~np.isnan(values)]
            digits = 3 if np.nanmax(np.abs(values)) < 2 else 1
            sd = values.std(ddof=1) if len(values) > 1 else float("nan")
            row[column] = f"{values.mean():.{digits}f}" + ("" if sd != sd else f" ± {sd:.{digits}f}")
        rows.append(row)
    return pd.DataFrame(rows)
