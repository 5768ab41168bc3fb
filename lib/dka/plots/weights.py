"""Weight matrices as images: the paper's Fig. 4(b) heatmaps (and the supplement's Fig. 1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from dka.plots.style import _new_axes

__all__ = ["weight_heatmap", "weight_heatmaps", "color_limit"]


def color_limit(weights, clip_quantile: float = 0.99) -> float:
    """The colour limit of one or several weight matrices: the `clip_quantile` of their pooled |w|."""
    pooled = np.concatenate([np.abs(np.asarray(w.detach().cpu() if hasattr(w, "detach") else w,
                                               dtype=np.float32)).ravel() for w in weights])
    limit = float(np.quantile(pooled, clip_quantile)) if pooled.size else 1.0
    return limit if limit > 0 else float(pooled.max(initial=0.0) or 1.0)


def weight_heatmap(weight, ax=None, title: str | None = None, class_names: Sequence[str] | None = None,
                   clip_quantile: float = 0.99, colorbar: bool = True, limit: float | None = None):
    """Fig. 4(b) style: the final layer as a features x classes image, diverging colours centred at 0.

    `weight` is (classes, features) as stored in nn.Linear; it is drawn transposed (features down,
    classes across) like the paper's 512 x 10 panels. The colour limit is `limit`, or the
    `clip_quantile` of |w| so one large weight does not wash out the rest; exact zeros stay white.
    """
    w = np.asarray(weight.detach().cpu() if hasattr(weight, "detach") else weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight_heatmap expects a 2-D (classes, features) matrix, got shape {w.shape}")
    fig, ax = _new_axes(ax, (3.2, 5.0))
    limit = color_limit([w], clip_quantile) if limit is None else float(limit)
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
                    title: str = "Final-layer weights (features x classes)", shared_scale: bool = True):
    """Fig. 4(b): the final layers of several models side by side.

    With `shared_scale` (the default) every panel uses one colour limit (the 99th percentile of all
    panels' |w|) and one colour bar, so a paler panel really holds smaller weights; give
    `shared_scale=False` only for matrices that are not compared with each other.
    """
    if not weights:
        raise ValueError("weight_heatmaps needs at least one model's weights")
    n = len(weights)
    limit = color_limit(list(weights.values())) if shared_scale else None
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n + 0.6, 5.0), layout="constrained", squeeze=False)
    for ax, (name, w) in zip(axes[0], weights.items()):
        sub = f"{name}\n{subtitles[name]}" if subtitles and name in subtitles else name
        weight_heatmap(w, ax=ax, title=sub, class_names=class_names, colorbar=not shared_scale, limit=limit)
        if ax is not axes[0][0]:
            ax.set_ylabel("")
    if shared_scale:
        fig.colorbar(axes[0][-1].images[0], ax=list(axes[0]), shrink=0.8, label="weight (one scale for all panels)")
    fig.suptitle(title, fontweight="bold")
    return fig
