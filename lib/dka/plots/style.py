"""The one look of every dka figure: seaborn style, one colour per model across every figure."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import matplotlib
import matplotlib.colors
import matplotlib.ticker
import matplotlib.pyplot as plt
import seaborn as sns

from dka.results import DEFAULT_DPI

__all__ = ["use_style", "model_palette", "model_color", "SPARSITY_LABELS"]

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


# Fixed colours of the families every figure shows; Dynamic-K heads are coloured by K instead (below).
_FAMILY_COLORS = (
    (re.compile(r"^res18(-s\d+)?$"), "#222222"),
    (re.compile(r"^res50$"), "#7f7f7f"),
    (re.compile(r"^res18-l1"), "#e69f00"),
    (re.compile(r"^res50-l1"), "#f0c060"),
    (re.compile(r"^res18-d\["), "#7b3294"),
    (re.compile(r"^res18-1x1"), "#c2a5cf"),
    (re.compile(r"pruned"), "#17becf"),
    (re.compile(r"^coda"), "#d62728"),
    (re.compile(r"icnn"), "#8c564b"),
    (re.compile(r"decouple"), "#e377c2"),
    (re.compile(r"integrated|gradients|ig\b"), "#bcbd22"),
    (re.compile(r"grad-?cam"), "#9edae5"),
)
_K = re.compile(r"^res(18|50)-d(\d+)a")
_K_RANGE = (1, 128)  # K = 1 ... 128 spans the colour map (beyond: its end)


def model_color(name: str) -> tuple:
    """The colour of a model in every figure: fixed per family, and by K (log scale) for Dynamic-K heads.

    Keyed by the name alone, so a model keeps its colour whatever else a figure shows.
    """
    match = _K.match(name)
    if match:
        k = min(max(int(match.group(2)), _K_RANGE[0]), _K_RANGE[1])
        t = math.log(k / _K_RANGE[0]) / math.log(_K_RANGE[1] / _K_RANGE[0])
        return tuple(float(c) for c in matplotlib.colormaps["viridis"](0.1 + 0.8 * t)[:3])
    for pattern, color in _FAMILY_COLORS:
        if pattern.search(name):
            return tuple(matplotlib.colors.to_rgb(color))
    index = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 20
    return tuple(float(c) for c in matplotlib.colormaps["tab20"](index)[:3])


def model_palette(names: Sequence[str]) -> dict[str, tuple]:
    """{name: `model_color(name)`} for a figure's models."""
    return {name: model_color(name) for name in names}


def _integer_ticks(ax) -> None:
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def _new_axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax
