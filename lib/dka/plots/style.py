"""The one look of every dka figure: seaborn style, colours per model, "ours" vs "paper" colours."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.ticker
import matplotlib.pyplot as plt
import seaborn as sns

from dka.results import DEFAULT_DPI

__all__ = ["use_style", "model_palette", "OURS_COLOR", "PAPER_COLOR", "SPARSITY_LABELS"]

# Colours: "ours" vs "paper" everywhere the paper's number is drawn beside ours.
OURS_COLOR = "#3b6fb6"
PAPER_COLOR = "#b0b0b0"
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


def _integer_ticks(ax) -> None:
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def _new_axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax
