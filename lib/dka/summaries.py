"""Numbers over seeds, as the notebooks' comparison tables report them.

Every run of a profile trains once per seed (`runtime.seeds`). A table row then shows, for each
quantity, the mean over the seeds and its 95% t-interval (`dka.stats.mean_interval`), and a comparison
with the baseline the paired difference over matching seeds (seed s of A against seed s of B: the same
data order and initialisation stream). With one seed the interval falls back to a paired bootstrap over
the test images, and the table says which interval it shows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from dka.evaluation import Collected
from dka.stats import Interval, mcnemar, mean_interval, paired_difference

__all__ = ["per_seed", "over_seeds", "differences", "mcnemar_per_seed", "fmt", "interval_note"]


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

