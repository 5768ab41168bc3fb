"""Figures and tables for the notebooks: one seaborn style, one helper per kind of paper figure.

Why a module: the five notebooks draw the same kinds of figures (accuracy curves, weight heatmaps,
sparsity curves, K-sweep bars) and must look alike at README size; keeping the drawing here keeps the
notebooks short and lets the helpers be tested. Everything written to `results/` goes through
`save_figure` / `save_table`, which write atomically (temp file + os.replace) so an interrupted run
never leaves a half-written PNG or CSV that DVC would then record.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from dka.atomic import atomic_write, write_text
from dka.progress import widget_frontend_available  # re-exported: the notebooks' widget switch

# Figures are read in a README at ~700 px wide: ~120 dpi keeps a 6.4-inch figure at that size.
DEFAULT_DPI = 120
# Colours: "ours" vs "paper" everywhere the paper's number is drawn beside ours.
OURS_COLOR = "#3b6fb6"
PAPER_COLOR = "#b0b0b0"
# The paper's numbers that the notebooks print beside ours (Table 1 of Sun, Ravi, Singh, ICCV 2019;
# the reference tally is the authors' released NetDissect result of their Places365 Res18-d5a).
PAPER_CIFAR10_TOP1 = {
    "res18": 95.10, "res18-d1a": 95.02, "res18-d5a": 95.12, "res18-d10a": 95.22, "res18-d25a": 95.04,
    "res18-d50a": 95.06, "res18-d100a": 95.12, "res50": 95.62, "res50-d25a": 95.58,
}
PAPER_PLACES365_TOP1_TOP5 = {
    "res18": (53.69, 83.78), "res18-d1a": (27.83, 57.56), "res18-d5a": (53.60, 84.15),
    "res18-d10a": (53.64, 84.06), "res18-d25a": (53.87, 84.25), "res18-d50a": (53.58, 84.91),
    "res18-d100a": (53.81, 83.92), "res50": (54.74, 85.08), "res50-d25a": (55.00, 85.07),
}
PAPER_RELEASED_TALLY = {"model": "res18-d5a (Places365, layer4)", "units": 512, "interpretable_units": 441,
                        "unique_concepts": 230}
PAPER_CLAIMS = {
    "classes_within_5_concepts": "more than 95% of classes need at most 5 concepts",
    "units_within_5_concepts": "more than 80% of higher-layer units need at most 5 concepts",
}
SPARSITY_LABELS = {
    "small": "share of final-layer weights with |w| < 1e-3",
    "never_routed": "share of final-layer weights never routed (never among the top-K)",
}


def use_style() -> None:
    """The one look of every dka figure: seaborn whitegrid, fonts sized for README thumbnails."""
    sns.set_theme(
        context="notebook",
        style="whitegrid",
        palette="colorblind",
        font_scale=1.05,
        rc={
            "figure.dpi": DEFAULT_DPI,
            "savefig.dpi": DEFAULT_DPI,
            "savefig.bbox": "tight",
            "axes.titlesize": 12,
            "axes.titleweight": "bold",
            "axes.labelsize": 11,
            "legend.fontsize": 9,
            "legend.title_fontsize": 10,
            "figure.autolayout": False,
            "image.cmap": "vlag",
        },
    )


def model_palette(names: Sequence[str]) -> dict[str, tuple]:
    """A stable colour per model name, so the same model keeps its colour across figures."""
    colors = sns.color_palette("colorblind", n_colors=max(len(names), 1))
    return {name: colors[i % len(colors)] for i, name in enumerate(names)}


# --------------------------------------------------------------------------------------------
# writing results
# --------------------------------------------------------------------------------------------


def save_figure(fig: matplotlib.figure.Figure, path: str | os.PathLike, dpi: int = DEFAULT_DPI) -> Path:
    """Write `fig` as PNG to `path` atomically (small file: ~120 dpi) and return the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figures are written as PNG; got {path.name!r} — use a .png file name")
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path


def markdown_table(df: pd.DataFrame, floatfmt: str | Mapping[str, str] = ".2f", index: bool = False) -> str:
    """GitHub-flavoured Markdown for a small table (no tabulate dependency).

    `floatfmt` is one format for every float column or a {column: format} dict (others: ".2f");
    NaN prints as an en dash, "|" is escaped.
    """
    frame = df.reset_index() if index else df
    formats = floatfmt if isinstance(floatfmt, Mapping) else {}
    default = ".2f" if isinstance(floatfmt, Mapping) else floatfmt

    def cell(value, column) -> str:
        if isinstance(value, (float, np.floating)):
            return "–" if math.isnan(value) else format(float(value), formats.get(column, default))
        if value is None:
            return "–"
        return str(value).replace("|", "\\|")

    header = [str(c).replace("|", "\\|") for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |"]
    aligns = ["---:" if pd.api.types.is_numeric_dtype(frame[c]) else ":---" for c in frame.columns]
    lines.append("| " + " | ".join(aligns) + " |")
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v, c) for v, c in zip(row, frame.columns)) + " |")
    return "\n".join(lines) + "\n"


def save_table(df: pd.DataFrame, path_stem: str | os.PathLike, floatfmt: str | Mapping[str, str] = ".2f",
               title: str | None = None) -> tuple[Path, Path]:
    """Write `df` as `<stem>.csv` and `<stem>.md` (atomically); returns both paths."""
    stem = Path(path_stem)
    if stem.suffix in (".csv", ".md"):
        stem = stem.with_suffix("")
    csv_path = write_text(stem.with_suffix(".csv"), df.to_csv(index=False))
    md = (f"**{title}**\n\n" if title else "") + markdown_table(df, floatfmt=floatfmt)
    md_path = write_text(stem.with_suffix(".md"), md)
    return csv_path, md_path


def save_json(obj, path: str | os.PathLike) -> Path:
    """Write metrics as indented, strict JSON (atomically): numpy values become plain numbers and
    NaN/inf become null, so any JSON reader (jq, JavaScript, DVC) accepts the file."""

    def plain(value):
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, np.ndarray):
            return plain(value.tolist())
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Path):
            return str(value)
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        raise TypeError(f"cannot write {type(value).__name__} to JSON")

    text = json.dumps(plain(obj), indent=2, sort_keys=True, allow_nan=False)
    return write_text(Path(path), text + "\n")


# --------------------------------------------------------------------------------------------
# metrics -> long tables
# --------------------------------------------------------------------------------------------


def metrics_frame(runs: Mapping[str, Sequence[Mapping]]) -> pd.DataFrame:
    """Per-epoch metrics of several runs (model name -> metrics.jsonl records) as one long table.

    Scalar keys become columns; the per-layer dicts (`sparsity`, `never_routed`) are reduced to the
    final layer's value (`head`), the one the paper's figures show.
    """
    rows = []
    for model, records in runs.items():
        for record in records:
            row = {"model": model}
            for key, value in record.items():
                if isinstance(value, Mapping):
                    row[key] = value.get("head", np.nan)
                else:
                    row[key] = value
            rows.append(row)
    if not rows:
        raise ValueError("no metrics to tabulate: every run has an empty metrics list")
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def _integer_ticks(ax) -> None:
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def _new_axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


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
        sns.lineplot(data=frame, x="epoch", y=split, hue="model", hue_order=order, palette=palette,
                     marker="o", markersize=4, ax=ax, legend=ax is axes[0][-1])
        ax.set_title(split.replace("_top1", "").replace("_", " "))
        ax.set_xlabel("epoch")
        _integer_ticks(ax)
        ax.set_ylabel(ylabel)
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "center left", bbox_to_anchor=(1.02, 0.5), title="model")
    fig.suptitle(title, fontweight="bold")
    return fig


def weight_heatmap(weight, ax=None, title: str | None = None, class_names: Sequence[str] | None = None,
                   clip_quantile: float = 0.99, colorbar: bool = True):
    """Fig. 4(b) style: the final layer as a features x classes image, diverging colours centred at 0.

    `weight` is (classes, features) as stored in nn.Linear; it is drawn transposed (features down,
    classes across) like the paper's 512 x 10 panels. The colour limit is the `clip_quantile` of |w|
    so one large weight does not wash out the rest; exact zeros stay white.
    """
    w = np.asarray(weight.detach().cpu() if hasattr(weight, "detach") else weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight_heatmap expects a 2-D (classes, features) matrix, got shape {w.shape}")
    fig, ax = _new_axes(ax, (3.2, 5.0))
    limit = float(np.quantile(np.abs(w), clip_quantile)) if w.size else 1.0
    limit = limit if limit > 0 else float(np.abs(w).max() or 1.0)
    image = ax.imshow(w.T, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_xlabel("class")
    ax.set_ylabel(f"feature (of {w.shape[1]})")
    ax.grid(False)
    n_classes = w.shape[0]
    if class_names is not None and n_classes <= 12:
        ax.set_xticks(range(n_classes), [str(c) for c in class_names], rotation=90, fontsize=8)
    if title:
        ax.set_title(title)
    if colorbar:
        fig.colorbar(image, ax=ax, shrink=0.8, label="weight")
    return fig


def weight_heatmaps(weights: Mapping[str, object], class_names: Sequence[str] | None = None,
                    subtitles: Mapping[str, str] | None = None,
                    title: str = "Final-layer weights (features x classes)"):
    """Fig. 4(b): the final layers of several models side by side, each with its own colour scale."""
    if not weights:
        raise ValueError("weight_heatmaps needs at least one model's weights")
    n = len(weights)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n + 0.6, 5.0), layout="constrained", squeeze=False)
    for ax, (name, w) in zip(axes[0], weights.items()):
        sub = f"{name}\n{subtitles[name]}" if subtitles and name in subtitles else name
        weight_heatmap(w, ax=ax, title=sub, class_names=class_names, colorbar=True)
        if ax is not axes[0][0]:
            ax.set_ylabel("")
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
    sns.lineplot(data=data, x="epoch", y=column, hue="model", hue_order=order,
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
                          ours_label: str = "this run", paper_label: str = "paper", ax=None,
                          ylim: tuple[float, float] | None = None):
    """K-sweep / Table 1 bars: our value per model beside the paper's (grey), numbers printed on top.

    Models the paper does not report get only our bar. The two data sets differ, so compare the
    pattern across K (parity with the baseline), not the absolute heights.
    """
    models = list(ours)
    if not models:
        raise ValueError("paper_comparison_bars needs at least one model")
    paper = dict(paper or {})
    fig, ax = _new_axes(ax, (max(4.0, 0.9 * len(models) + 2.0), 3.8))
    x = np.arange(len(models))
    has_paper = any(m in paper for m in models)
    width = 0.4 if has_paper else 0.6
    ours_vals = np.array([ours[m] for m in models], dtype=float)
    bars = ax.bar(x - (width / 2 if has_paper else 0), ours_vals, width, color=OURS_COLOR, label=ours_label)
    ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=1)
    if has_paper:
        paper_vals = np.array([paper.get(m, np.nan) for m in models], dtype=float)
        pbars = ax.bar(x + width / 2, np.nan_to_num(paper_vals, nan=0.0), width, color=PAPER_COLOR,
                       label=paper_label)
        for bar, value in zip(pbars, paper_vals):
            if np.isnan(value):
                bar.set_visible(False)
        ax.bar_label(pbars, labels=["" if np.isnan(v) else f"{v:.1f}" for v in paper_vals], fontsize=8,
                     padding=1)
    ax.set_xticks(x, models, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    else:
        top = np.nanmax([ours_vals.max(), *(paper.get(m, np.nan) for m in models)])
        ax.set_ylim(0, min(100.0, top * 1.12) if top <= 100 else top * 1.12)
    if title:
        ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=True)
    return fig


def model_lines(frame: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, title: str,
                order: Sequence[str] | None = None, marker: str | None = "o", ax=None):
    """A line per model (Fig. 5(c) mean unit IoU over training, Fig. 5(d) sorted unit scores)."""
    missing = [c for c in ("model", x, y) if c not in frame.columns]
    if missing:
        raise KeyError(f"model_lines needs columns {missing}; got {list(frame.columns)}")
    order = list(order) if order is not None else list(dict.fromkeys(frame["model"]))
    fig, ax = _new_axes(ax, (6.4, 3.8))
    sns.lineplot(data=frame, x=x, y=y, hue="model", hue_order=order, palette=model_palette(order),
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
        sub = curves[curves["model"] == name]
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


def display_rgb(image) -> np.ndarray:
    """A normalised (3, H, W) image tensor as uint8 (H, W, 3), min-max stretched for display."""
    a = np.asarray(image.detach().float().cpu() if hasattr(image, "detach") else image, dtype=np.float32)
    a = np.transpose(a, (1, 2, 0))
    lo, hi = float(a.min()), float(a.max())
    return (255 * (a - lo) / max(hi - lo, 1e-8)).astype(np.uint8)


def explanation_figure(images, explanations: Mapping[str, tuple], index: int, n: int = 3,
                       class_names: Sequence[str] | None = None, true_label: int | None = None):
    """Fig. 7: one image explained by several models — a row per model: the image, then its top-n units.

    `explanations` maps a model name to (dka.explain.Attribution of the batch `images`, tally DataFrame or
    None). Each unit panel overlays the unit's activation map on the image and names its contribution
    W[c,i]·x_i / y_c, its concept and IoU; the row title gives the predicted class, K and the residual
    (the share of the score the n units leave unexplained, bias included).
    """
    if not explanations:
        raise ValueError("explanation_figure needs at least one model's explanation")
    if not 0 <= index < images.shape[0]:
        raise IndexError(f"image index {index} out of range 0..{images.shape[0] - 1}")
    names = list(explanations)
    fig, axes = plt.subplots(len(names), n + 1, figsize=(1.9 * (n + 1) + 0.4, 2.45 * len(names)),
                             layout="constrained", squeeze=False)
    rgb = display_rgb(images[index])
    size = tuple(images.shape[-2:])
    cname = (lambda c: class_names[c]) if class_names is not None else (lambda c: f"class {c}")  # noqa: E731
    for row, name in enumerate(names):
        attr, tally = explanations[name]
        units, values = attr.top_units(n)
        residual = float(attr.residual(n)[index])
        heat = attr.heatmaps(units[index:index + 1], size)[0].numpy()
        labels = tally.set_index("unit") if tally is not None else None
        c = int(attr.target[index])
        ax = axes[row][0]
        ax.imshow(rgb, interpolation="nearest")
        k = f", K={attr.k}" if getattr(attr, "k", None) else ""
        truth = f"\ntrue: {cname(true_label)}" if true_label is not None else ""
        ax.set_title(f"{name}{k}\npredicted: {cname(c)}{truth}", fontsize=9)
        ax.set_xlabel(f"residual {residual:.0%}", fontsize=9)
        for r in range(n):
            ax = axes[row][r + 1]
            u = int(units[index, r]) + 1
            ax.imshow(rgb, interpolation="nearest")
            ax.imshow(heat[r], cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
            concept = ""
            if labels is not None and u in labels.index:
                concept = f"\n{labels.loc[u, 'label']} (IoU {float(labels.loc[u, 'score']):.2f})"
            ax.set_title(f"unit {u}: {float(values[index, r]):.0%}{concept}", fontsize=9)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
    fig.suptitle("Fig. 7: top units, their contribution W[c,i]·x_i / y_c and concept", fontweight="bold",
                 fontsize=11)
    return fig
