"""Figures of training runs: accuracy curves, sparsity curves, K-sweep bars, per-model lines, the slider view."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from dka.plots.style import SPARSITY_LABELS, _integer_ticks, _new_axes, model_color, model_palette
from dka.plots.weights import weight_heatmap
from dka.stats import mean_interval

__all__ = ["accuracy_curves", "sparsity_curves", "paper_comparison_bars", "model_lines", "sweep_dashboard", "frontier",
           "share_sweep", "metric_panels"]


def _t_band(values) -> tuple[float, float]:
    """The band seaborn draws around a line of several seeds: the 95% t-interval of their mean."""
    iv = mean_interval(list(values))
    return (iv.low, iv.high) if iv.n > 1 else (iv.mean, iv.mean)


def accuracy_curves(frame: pd.DataFrame, splits: Sequence[str] = ("train_top1", "test_top1"),
                    title: str = "Top-1 accuracy over training", ylabel: str = "top-1 accuracy (%)",
                    order: Sequence[str] | None = None):
    """Fig. 4(a) / 5(a): one panel per split, one line per model (`frame` from `metrics_frame`)."""
    missing = [c for c in ("model", "epoch", *splits) if c not in frame.columns]
    if missing:
        raise KeyError(f"accuracy_curves needs columns {missing}; got {list(frame.columns)}")
    order = list(order) if order is not None else list(dict.fromkeys(frame["model"]))
    palette = model_palette(order)
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 3.8), sharey=True,
                             layout="constrained", squeeze=False)
    for ax, split in zip(axes[0], splits):
        sns.lineplot(data=frame, x="epoch", y=split, hue="model", hue_order=order, palette=palette, errorbar=_t_band,
                     marker="o", markersize=4, ax=ax, legend=ax is axes[0][-1])
        ax.set_title(split.replace("_top1", "").replace("_", " "))
        ax.set_xlabel("epoch")
        _integer_ticks(ax)
        ax.set_ylabel(ylabel)
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "center left", bbox_to_anchor=(1.02, 0.5), title="model")
    fig.suptitle(title, fontweight="bold")
    return fig


def sparsity_curves(frame: pd.DataFrame, measure: str = "small", order: Sequence[str] | None = None,
                    title: str | None = None, ax=None):
    """Fig. 5(b): final-layer sparsity over training, one line per model.

    `measure` names which sparsity the figure shows — "small" (|w| < 1e-3, the paper's measure, the
    `sparsity` column) or "never_routed" (share of weights never selected by top-K) — and is
    written on the y axis so no reader confuses the two.
    """
    column = {"small": "sparsity", "never_routed": "never_routed"}.get(measure)
    if column is None:
        raise ValueError(f"measure must be 'small' or 'never_routed', got {measure!r}")
    if column not in frame.columns:
        raise KeyError(f"sparsity_curves needs a {column!r} column; got {list(frame.columns)}")
    data = frame.dropna(subset=[column])
    order = list(order) if order is not None else list(dict.fromkeys(frame["model"]))
    order = [m for m in order if m in set(data["model"])]
    fig, ax = _new_axes(ax, (6.4, 3.8))
    sns.lineplot(data=data, x="epoch", y=column, hue="model", hue_order=order, errorbar=_t_band,
                 palette=model_palette(order), marker="o", markersize=4, ax=ax)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("epoch")
    _integer_ticks(ax)
    ax.set_ylabel(SPARSITY_LABELS[measure].replace(" (never among the top-K)", ""), fontsize=9)
    ax.set_title(title or ("Final-layer sparsity: " + ("|w| < 1e-3" if measure == "small" else "never routed")))
    if ax.get_legend() is not None:
        sns.move_legend(ax, "center left", bbox_to_anchor=(1.02, 0.5), title="model")
    return fig


def paper_comparison_bars(ours: Mapping[str, float], paper: Mapping[str, float] | None = None,
                          ylabel: str = "top-1 accuracy (%)", title: str = "",
                          ours_label: str = "this run", paper_label: str = "paper",
                          errors: Mapping[str, tuple[float, float]] | None = None):
    """Table 1 as bars: our value per model in one panel, the paper's in another, each on its own axis.

    The two come from different data (e.g. a stand-in dataset vs Places365), so they are never drawn
    on one axis: compare the pattern across models, not the heights. `errors` maps a model to the
    (low, high) of our interval, drawn as an error bar. Bars take each model's colour (`model_color`).
    """
    models = list(ours)
    if not models:
        raise ValueError("paper_comparison_bars needs at least one model")
    paper = {m: v for m, v in (paper or {}).items() if m in models}
    panels = [(ours_label, {m: ours[m] for m in models})] + ([(paper_label, paper)] if paper else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.0, 0.75 * len(models) + 1.8) * len(panels), 3.9),
                             layout="constrained", squeeze=False)
    for ax, (label, values) in zip(axes[0], panels):
        names = [m for m in models if m in values]
        x = np.arange(len(names))
        heights = np.array([values[m] for m in names], dtype=float)
        bars = ax.bar(x, heights, 0.7, color=[model_color(m) for m in names])
        if errors and label == ours_label:
            lows = np.array([errors.get(m, (np.nan, np.nan))[0] for m in names], dtype=float)
            highs = np.array([errors.get(m, (np.nan, np.nan))[1] for m in names], dtype=float)
            ok = ~np.isnan(lows)
            ax.errorbar(x[ok], heights[ok], yerr=[heights[ok] - lows[ok], highs[ok] - heights[ok]], fmt="none",
                        ecolor="0.2", capsize=3, lw=1)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        top = np.nanmax(heights) if len(heights) else 1.0
        ax.set_ylim(0, min(100.0, top * 1.15) if top <= 100 else top * 1.15)
        ax.set_title(label, fontsize=10)
    if title:
        fig.suptitle(title, fontweight="bold")
    return fig


def model_lines(frame: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, title: str,
                order: Sequence[str] | None = None, marker: str | None = "o", ax=None):
    """A line per model (Fig. 5(c) mean unit IoU over training, Fig. 5(d) sorted unit scores)."""
    missing = [c for c in ("model", x, y) if c not in frame.columns]
    if missing:
        raise KeyError(f"model_lines needs columns {missing}; got {list(frame.columns)}")
    order = list(order) if order is not None else list(dict.fromkeys(frame["model"]))
    fig, ax = _new_axes(ax, (6.4, 3.8))
    sns.lineplot(data=frame, x=x, y=y, hue="model", hue_order=order, palette=model_palette(order), errorbar=_t_band,
                 marker=marker, markersize=4 if marker else None, ax=ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if pd.api.types.is_integer_dtype(frame[x]):
        _integer_ticks(ax)
    if ax.get_legend() is not None:
        sns.move_legend(ax, "center left", bbox_to_anchor=(1.02, 0.5), title="model")
    return fig


def sweep_dashboard(weights: Mapping[str, object], curves: pd.DataFrame,
                    sparsity: Mapping[str, Mapping[str, float]], class_names: Sequence[str] | None = None,
                    title: str | None = None):
    """The K slider's view: the chosen models' final layers, their test curves, their two sparsities.

    `weights` maps the shown models (usually the d{K}a model and the model it is compared with) to
    their final-layer weights; `curves` is `metrics_frame` of all models (the others are drawn faint
    for context); `sparsity` maps each shown model to {"small": share |w| < 1e-3, "never_routed":
    share never selected (NaN for a dense layer)}. One function, so that the static (headless) output
    and the interactive redraw are the same figure.
    """
    shown = list(weights)
    if not shown:
        raise ValueError("sweep_dashboard needs at least one model to show")
    palette = model_palette(list(dict.fromkeys([*curves["model"], *shown])))  # same colours as the other figures
    fig = plt.figure(figsize=(3.0 * len(shown) + 8.4, 4.4), layout="constrained")
    grid = fig.add_gridspec(1, len(shown) + 2, width_ratios=[1.0] * len(shown) + [1.7, 1.3])
    for i, name in enumerate(shown):
        ax = fig.add_subplot(grid[0, i])
        weight_heatmap(weights[name], ax=ax, title=name, class_names=class_names, colorbar=False)
        if i:
            ax.set_ylabel("")
    ax_acc = fig.add_subplot(grid[0, len(shown)])
    for name in dict.fromkeys(curves["model"]):
        sub = curves[curves["model"] == name].groupby("epoch", as_index=False)["test_top1"].mean()  # over seeds
        if name in shown:
            ax_acc.plot(sub["epoch"], sub["test_top1"], marker="o", markersize=4, lw=2.2,
                        color=palette[name], label=name)
        else:
            ax_acc.plot(sub["epoch"], sub["test_top1"], lw=0.9, color="0.6", alpha=0.6)
    ax_acc.set_xlabel("epoch")
    _integer_ticks(ax_acc)
    ax_acc.set_ylabel("test top-1 (%)")
    ax_acc.set_title("test accuracy (grey: other models)")
    ax_acc.legend(loc="lower right")
    ax_sp = fig.add_subplot(grid[0, len(shown) + 1])
    measures = [("small", "|w| < 1e-3"), ("never_routed", "never routed")]
    x = np.arange(len(measures))
    width = 0.8 / len(shown)
    for j, name in enumerate(shown):
        values = [float(sparsity.get(name, {}).get(m, np.nan)) for m, _ in measures]
        bars = ax_sp.bar(x + (j - (len(shown) - 1) / 2) * width, np.nan_to_num(values, nan=0.0), width,
                         color=palette[name], label=name)
        ax_sp.bar_label(bars, labels=["n/a" if np.isnan(v) else f"{v:.0%}" for v in values], fontsize=8)
    ax_sp.set_xticks(x, [label for _, label in measures])
    ax_sp.set_ylim(0, 1.12)
    ax_sp.set_ylabel("share of final-layer weights")
    ax_sp.set_title("sparsity after training")
    if title:
        fig.suptitle(title, fontweight="bold")
    return fig


def frontier(points: Mapping[str, tuple], xlabel: str, ylabel: str, title: str = "", ax=None):
    """One marker per run at (x, y) with both 95% intervals as error bars: e.g. accuracy against sparsity.

    `points` maps a run to (x, y), each a `dka.stats.Interval` (or a plain number).
    """
    if not points:
        raise ValueError("frontier needs at least one run")
    fig, ax = _new_axes(ax, (6.0, 4.2))
    for run, (x, y) in points.items():
        xm, ym = getattr(x, "mean", x), getattr(y, "mean", y)
        xerr = [[xm - x.low], [x.high - xm]] if getattr(x, "n", 1) > 1 else None
        yerr = [[ym - y.low], [y.high - ym]] if getattr(y, "n", 1) > 1 else None
        ax.errorbar([xm], [ym], xerr=xerr, yerr=yerr, fmt="o", color=model_color(run), capsize=3, label=run)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, title="run")
    return fig


def share_sweep(ours: Mapping[float, object], paper: Mapping[float, float], ours_baseline=None,
                paper_baseline: float | None = None, ours_label: str = "this run", paper_label: str = "paper",
                ylabel: str = "top-1 (%)", title: str = ""):
    """Accuracy against the share of the head's inputs that K routes (log axis), ours and the paper's.

    Heads of different widths are compared by K / inputs (the paper's K = 5 routes 1% of 512 features),
    and ours and the paper's numbers are drawn in two panels (different data), each with its dense
    baseline as a dashed line. `ours` maps a share (%) to an Interval or a number.
    """
    fig, axes = plt.subplots(1, 2 if paper else 1, figsize=(11.5 if paper else 6.0, 3.9), layout="constrained",
                             squeeze=False)
    panels = [(axes[0][0], ours, ours_baseline, ours_label)]
    if paper:
        panels.append((axes[0][1], paper, paper_baseline, paper_label))
    for ax, points, base, label in panels:
        shares = sorted(points)
        means = np.array([getattr(points[s], "mean", points[s]) for s in shares], dtype=float)
        lows = np.array([getattr(points[s], "low", np.nan) for s in shares], dtype=float)
        highs = np.array([getattr(points[s], "high", np.nan) for s in shares], dtype=float)
        ax.plot(shares, means, "o-", color=model_color("res18-d5a"), label="Dynamic-K head")
        if not np.isnan(lows).all():
            ax.fill_between(shares, lows, highs, color=model_color("res18-d5a"), alpha=0.2, lw=0)
        if base is not None:
            bm = getattr(base, "mean", base)
            ax.axhline(bm, color=model_color("res18"), ls="--", lw=1.2, label="dense head")
            if getattr(base, "n", 1) > 1:
                ax.axhspan(base.low, base.high, color=model_color("res18"), alpha=0.08, lw=0)
        ax.set_xscale("log")
        ax.set_xlabel("K / inputs of the head (%)")
        ax.set_ylabel(ylabel)
        ax.set_title(label, fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontweight="bold")
    return fig


def metric_panels(scores: pd.DataFrame, columns: Sequence[str], key: str = "method", title: str = ""):
    """One panel per metric: a bar per method (mean over its rows, the seeds) with each seed as a dot.

    Methods where a metric does not apply (all NaN) get no bar and a "n/a" mark, so absence is not
    mistaken for zero.
    """
    names = list(dict.fromkeys(scores[key]))
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns) + 1.0, 4.2), layout="constrained",
                             squeeze=False)
    for ax, column in zip(axes[0], columns):
        for i, name in enumerate(names):
            values = scores.loc[scores[key] == name, column].to_numpy(dtype=float)
            if np.isnan(values).all():
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8, color="0.4")
                continue
            ax.bar(i, np.nanmean(values), 0.7, color=model_color(name), alpha=0.85)
            ax.plot(np.full(len(values), i), values, "o", color="0.15", markersize=3)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(column, fontsize=10)
    if title:
        fig.suptitle(title, fontweight="bold")
    return fig
