"""Figures for the notebooks: one style, one helper per kind of paper figure.

The five notebooks draw the same kinds of figures (accuracy curves, weight heatmaps, sparsity curves,
K-sweep bars, explanations) and must look alike at README size; keeping the drawing here keeps the
notebooks short and lets the helpers be tested. Writing them to `results/` is `dka.results`' job.

- `style`         use_style, model_color / model_palette (one colour per model in every figure)
- `training`      accuracy and sparsity curves, K-sweep bars, per-model lines, the K-slider view
- `weights`       Fig. 4(b) weight heatmaps
- `explanations`  Fig. 7 per-image explanations, Fig. 6 class -> unit -> concept graphs, localisation bars
"""

from dka.plots.explanations import concept_graph, display_rgb, explanation_figure, localisation_bars, method_maps
from dka.plots.style import SPARSITY_LABELS, model_color, model_palette, use_style
from dka.plots.training import (accuracy_curves, frontier, metric_panels, model_lines, paper_comparison_bars,
                                share_sweep, sparsity_curves, sweep_dashboard)
from dka.plots.weights import color_limit, weight_heatmap, weight_heatmaps

__all__ = ["use_style", "model_palette", "model_color", "SPARSITY_LABELS", "accuracy_curves", "sparsity_curves",
           "frontier", "share_sweep", "paper_comparison_bars", "model_lines", "sweep_dashboard", "weight_heatmap",
           "weight_heatmaps", "color_limit", "explanation_figure", "method_maps", "metric_panels", "concept_graph",
           "display_rgb", "localisation_bars"]
