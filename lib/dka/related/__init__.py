"""Checks of the related interpretable-by-design methods, each against its own paper's claims.

- `dka.related.filters`: Interpretable CNNs (Zhang et al. 2018) — filter categories, category
  specificity, location instability, peaks inside the true concept masks (concept scenes).
- `dka.related.paths`: Interpretable network decoupling (Li et al. 2020) — gate sparsity, per-class
  calculation paths with Network Dissection labels, executed FLOPs.
- `dka.related.adversarial`: FGSM and detection of adversarial inputs from their paths (ROC AUC).

The models themselves are `dka.models.icnn` and `dka.models.decouple`; the benchmark that trains them
and writes `results/related/` is `bench/related_methods.py`.
"""

from dka.related import adversarial, filters, paths

__all__ = ["filters", "paths", "adversarial"]
