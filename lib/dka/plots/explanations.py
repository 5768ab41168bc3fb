"""Explanation figures: the paper's Fig. 7 (top units of one image) and Fig. 6 (class -> unit -> concept)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
import numpy as np
import pandas as pd

from dka.concepts import head_weight
from dka.dissection import unit_labels
from dka.plots.style import model_color
from dka.results import save_figure

__all__ = ["explanation_figure", "concept_graph", "display_rgb", "method_maps", "localisation_bars", "METHOD_LABELS"]


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
        labels = unit_labels(tally, attr.contributions.shape[1]) if tally is not None else None
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
            if labels is not None and isinstance(labels.loc[u, "label"], str):
                concept = f"\n{labels.loc[u, 'label']} (IoU {float(labels.loc[u, 'score']):.2f})"
            ax.set_title(f"unit {u}: {float(values[index, r]):.0%}{concept}", fontsize=9)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
    fig.suptitle("Fig. 7: top units, their contribution W[c,i]·x_i / y_c and concept", fontweight="bold",
                 fontsize=11)
    return fig


def concept_graph(
    model_or_weight,
    tally: pd.DataFrame,
    classes: Sequence[int],
    path: str | Path,
    class_names: Sequence[str] | None = None,
    top_units: int = 5,
    title: str | None = None,
    source_label: str = "class",
) -> Path:
    """The paper's Fig. 6: class -> unit -> concept graph as a PNG.

    Left: the chosen classes (or, with `source_label`, any outputs of the weight matrix, e.g. the
    units of an internal 1x1 layer); middle: each one's `top_units` units by weight (edge width ∝
    weight, red for negative); right: the units' concepts, each unit edge labelled with its IoU.
    Drawn on a bare Figure, not through pyplot, so it never touches the caller's backend.
    """
    w = head_weight(model_or_weight)
    units = unit_labels(tally, w.shape[1])
    classes = list(classes)
    if not classes:
        raise ValueError("choose at least one class")
    bad = [c for c in classes if not 0 <= c < w.shape[0]]
    if bad:
        raise ValueError(f"classes {bad} out of range 0..{w.shape[0] - 1}")
    edges = []  # (class, unit, weight)
    chosen_units: list[int] = []
    for c in classes:
        for u in np.argsort(-w[c], kind="stable")[:top_units]:
            edges.append((c, int(u), float(w[c, u])))
            if u not in chosen_units:
                chosen_units.append(int(u))
    concepts: list[str] = []
    for u in chosen_units:
        lab = str(units.loc[u + 1, "label"])
        if lab not in concepts:
            concepts.append(lab)

    def ys(n):
        return np.linspace(1, 0, n) if n > 1 else np.array([0.5])

    y_cls = dict(zip(classes, ys(len(classes))))
    y_unit = dict(zip(chosen_units, ys(len(chosen_units))))
    y_con = dict(zip(concepts, ys(len(concepts))))
    height = max(4.0, 0.35 * max(len(chosen_units), len(concepts), len(classes)))
    fig = Figure(figsize=(10, height))
    ax = fig.add_subplot()
    wmax = max(abs(e[2]) for e in edges) or 1.0
    for c, u, wt in edges:
        ax.plot([0, 1], [y_cls[c], y_unit[u]], color="tab:blue" if wt >= 0 else "tab:red",
                lw=0.3 + 5 * abs(wt) / wmax, alpha=0.7, zorder=1)
    for u in chosen_units:
        info = units.loc[u + 1]
        iou = float(info["score"])
        ax.plot([1, 2], [y_unit[u], y_con[str(info["label"])]], color="grey", lw=0.3 + 8 * min(iou, 0.5),
                alpha=0.6, zorder=1)
        ax.text(1.5, (y_unit[u] + y_con[str(info["label"])]) / 2, f"IoU {iou:.2f}", fontsize=7, ha="center",
                va="bottom", color="dimgrey")
    name = (lambda c: class_names[c]) if class_names is not None else (lambda c: f"{source_label} {c}")  # noqa: E731
    ax.scatter([0] * len(classes), [y_cls[c] for c in classes], s=120, color="tab:orange", zorder=2)
    ax.scatter([1] * len(chosen_units), [y_unit[u] for u in chosen_units], s=60, color="tab:blue", zorder=2)
    ax.scatter([2] * len(concepts), [y_con[k] for k in concepts], s=80, color="tab:green", zorder=2)
    for c in classes:
        ax.text(-0.05, y_cls[c], name(c), ha="right", va="center", fontsize=10)
    for u in chosen_units:
        ax.text(1, y_unit[u] + 0.02, f"unit {u + 1}", ha="center", va="bottom", fontsize=8)
    for k in concepts:
        ax.text(2.05, y_con[k], k, ha="left", va="center", fontsize=10)
    ax.set_xlim(-0.8, 2.8)
    ax.set_ylim(-0.08, 1.08)
    ax.set_xticks([0, 1, 2], [source_label, "unit (line width = weight)", "concept"])
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=130)


def method_maps(images, masks, maps: Mapping[str, object], captions: Sequence[str] | None = None, title: str = ""):
    """Rows of images: the image, its true concept mask, then each method's attribution map (B, H, W).

    Each map is shown as its positive part scaled to its own maximum (the methods' units differ); the
    mask's outline is drawn over every map so one sees at a glance what falls inside the truth.
    """
    names = list(maps)
    b = images.shape[0]
    fig, axes = plt.subplots(b, len(names) + 2, figsize=(1.6 * (len(names) + 2) + 0.4, 1.7 * b + 0.6),
                             layout="constrained", squeeze=False)
    for i in range(b):
        rgb = display_rgb(images[i])
        mask = np.asarray(masks[i], dtype=float)
        axes[i][0].imshow(rgb, interpolation="nearest")
        axes[i][1].imshow(mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        if captions is not None:
            axes[i][0].set_ylabel(captions[i], fontsize=7, rotation=0, ha="right", va="center")
        for j, name in enumerate(names, start=2):
            heat = np.clip(np.asarray(maps[name][i], dtype=float), 0, None)
            axes[i][j].imshow(heat / (heat.max() or 1.0), cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
            if mask.any():
                axes[i][j].contour(mask, levels=[0.5], colors="cyan", linewidths=0.6)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
    for j, label in enumerate(["image", "true concepts", *names]):
        axes[0][j].set_title(label, fontsize=8)
    if title:
        fig.suptitle(title, fontweight="bold", fontsize=11)
    return fig


METHOD_LABELS = {"dka": "built-in\ndecomposition", "grad_cam": "Grad-CAM\n(Captum)",
                 "integrated_gradients": "Integrated Gradients\n(Captum)"}


def localisation_bars(table: pd.DataFrame, title: str = "Where the explanations put the evidence") -> Figure:
    """Share of positive attribution inside the true concept masks per method and model (± sd over images).

    `table` is `dka.posthoc.localisation_table`'s; the dotted line is the mean mask area, the share a
    uniform map would get.
    """
    models = list(dict.fromkeys(table["model"]))
    methods = list(dict.fromkeys(table["method"]))
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(methods), 3.8), layout="constrained")
    width = 0.8 / len(models)
    for m, model in enumerate(models):
        rows = table[table["model"] == model].set_index("method").reindex(methods)
        x = np.arange(len(methods)) + (m - (len(models) - 1) / 2) * width
        bars = ax.bar(x, 100 * rows["share"], width, yerr=100 * rows["share_sd"].fillna(0), capsize=3,
                      color=model_color(model), label=model)
        ax.bar_label(bars, labels=[("" if np.isnan(v) else f"{100 * v:.0f}") for v in rows["share"]],
                     label_type="center", fontsize=9, color="white", fontweight="bold")
    chance = 100 * float(table["mask_area"].mean())
    ax.axhline(chance, color="0.3", ls=":", lw=1.2, label=f"mask area ({chance:.0f} %): chance")
    ax.set_xticks(np.arange(len(methods)), [METHOD_LABELS.get(m, m) for m in methods])
    ax.set_ylabel("positive attribution inside\nthe true concept masks (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="model")
    return fig
