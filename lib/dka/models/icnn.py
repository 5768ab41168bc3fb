"""Interpretable CNNs (Zhang, Wu & Zhu, CVPR 2018, arXiv 1710.00935) on dka's ResNet: `res18-icnn`.

The top convolutional layer (layer4's output, the maps the head pools) becomes the paper's
interpretable conv-layer, so that each filter fires for one category, at one place:

- **Templates.** For an n x n map, one positive template per position mu,
  ``t_mu[i, j] = tau * max(1 - beta * |[i, j] - mu|_1 / n, -1)``, and the negative template
  ``t_-[i, j] = -tau``; priors ``p(T_mu) = alpha / n^2`` and ``p(T_-) = 1 - alpha``. Paper values:
  ``tau = 0.5 / n^2``, ``beta = 4``, ``alpha = n^2 / (1 + n^2)``.
- **Filter loss** ``-MI(X; T)`` with ``p(x | T) = exp(tr(x . T)) / Z_T``, the feature maps X of the
  filter over a batch (the paper's estimate of Z_T over the data), and
  ``MI = sum_T p(T) sum_x p(x|T) log(p(x|T) / p(x))``. For learning the paper assigns each map to
  one template T^ (``p(T^ | x) ~ 1``): the template at the map's peak for an image of the
  filter's category, the negative template otherwise (the authors' code does the same). The
  loss keeps the terms of those pairs; `filter_mutual_information(..., target=None)` computes the
  full sum.
- **Mask layer** in the forward pass: each map times the template at its own peak, shaped as in
  the authors' code (peak value 1, no tau), ``x_masked = relu(x * m_mu^)``.
- **Filter -> category**: the category whose images activate the filter most,
  ``argmax_c mean_{I in c} sum_ij x_ij``, kept as a running mean over training batches (momentum
  0.9, as the authors' code keeps its per-category statistic) in the buffer `class_activation`.

Build options (``--model-option key=value``): ``filter_weight`` (lambda, weight of the mean over
filters of -MI), ``beta``, ``tau`` (None: 0.5 / n^2), ``alpha`` (None: n^2 / (1 + n^2)), ``momentum``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from dka.attribution import Attribution, decompose_linear_head, inference_mode
from dka.models._registry import ModelSpec, check_options, register_model
from dka.models.resnet import DKAResNet

__all__ = ["ICNNResNet", "LocatedAttribution", "TemplateMask", "position_templates", "template_log_prior",
           "template_mask", "filter_mutual_information", "peak_positions", "FORMS", "OPTIONS"]

FORMS = ("res18-icnn", "res50-icnn")
OPTIONS = ("filter_weight", "beta", "tau", "alpha", "momentum")
_PATTERN = r"res(?P<depth>18|50)-icnn"


def _parse(name: str, match: re.Match) -> ModelSpec:
    return ModelSpec(name=name, family="icnn", arch=f"res{match['depth']}")


def _distances(h: int, w: int, device=None) -> Tensor:
    """(h*w, h*w) L1 distance between every pair of positions, raster order."""
    ii, jj = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([ii.flatten(), jj.flatten()], 1).float()
    return torch.cdist(pos, pos, p=1)


def position_templates(h: int, w: int, beta: float = 4.0, tau: float | None = None, device=None) -> Tensor:
    """(h*w + 1, h*w) the templates of an h x w map, flattened in raster order: row mu is T_mu, the last
    row the negative template. ``n = max(h, w)``; ``tau`` None means the paper's 0.5 / n^2."""
    n = max(h, w)
    tau = 0.5 / n**2 if tau is None else float(tau)
    positive = tau * (1 - beta * _distances(h, w, device) / n).clamp_min(-1.0)
    negative = torch.full((1, h * w), -tau, device=device)
    return torch.cat([positive, negative])


def template_log_prior(positions: int, alpha: float | None = None, device=None) -> Tensor:
    """(positions + 1,) log p(T): alpha / n^2 for each positive template, 1 - alpha for the negative one."""
    alpha = positions / (1 + positions) if alpha is None else float(alpha)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha (the prior mass of the positive templates) must be in (0, 1); got {alpha}")
    prior = torch.full((positions + 1,), alpha / positions, device=device)
    prior[-1] = 1 - alpha
    return prior.log()


def filter_mutual_information(fmaps: Tensor, templates: Tensor, log_prior: Tensor,
                              target: Tensor | None = None) -> Tensor:
    """(U,) MI(X; T) of each filter between its maps over the batch and the templates.

    Args:
        fmaps: (B, U, h, w) or (B, U, h*w) maps of U filters for B images.
        templates: (T, h*w) from `position_templates`.
        log_prior: (T,) from `template_log_prior`.
        target: None for the full sum over (x, T); else (B, U) the template index T^ of each map,
            and only the pairs (x, T^(x)) count (the paper's learning approximation p(T^ | x) ~ 1).
    """
    x = fmaps.float().flatten(2)
    if x.shape[2] != templates.shape[1]:
        raise ValueError(f"maps of {x.shape[2]} positions do not fit templates of {templates.shape[1]}")
    scores = torch.einsum("bup,tp->but", x, templates.float())  # tr(x . T)
    log_lik = scores - scores.logsumexp(dim=0, keepdim=True)  # log p(x | T), Z_T over the batch
    log_joint = log_prior.float() + log_lik  # log p(T) p(x | T)
    log_px = log_joint.logsumexp(dim=2, keepdim=True)  # log p(x)
    terms = log_joint.exp() * (log_lik - log_px)
    if target is not None:
        terms = terms.gather(2, target[..., None])
    return terms.sum(dim=(0, 2))


def peak_positions(fmaps: Tensor) -> Tensor:
    """(B, U) raster index of each map's maximum (the first one on ties)."""
    return fmaps.flatten(2).argmax(dim=2)


def template_mask(fmaps: Tensor, beta: float = 4.0) -> Tensor:
    """The mask layer: each (h, w) map times ``max(1 - beta * |[i, j] - mu^|_1 / n, -1)`` centred at its
    own peak mu^, then ReLU. The peak is a constant of the forward pass: gradients reach the map through
    the product only."""
    b, u, h, w = fmaps.shape
    table = (1 - beta * _distances(h, w, fmaps.device) / max(h, w)).clamp_min(-1.0).to(fmaps.dtype)
    mask = table[peak_positions(fmaps.detach())].view(b, u, h, w)
    return torch.relu(fmaps * mask)


class TemplateMask(nn.Module):
    """`template_mask` as a module (the hook point `mask` for dissection of the masked maps)."""

    def __init__(self, beta: float = 4.0):
        super().__init__()
        self.beta = float(beta)

    def forward(self, fmaps: Tensor) -> Tensor:
        return template_mask(fmaps, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


@dataclass
class LocatedAttribution(Attribution):
    """An Attribution of the interpretable CNN, plus where each filter fired and which category it serves."""

    peaks: Tensor | None = None  # (B, U, 2) long: (row, col) of each filter's peak on its h x w map
    peak_values: Tensor | None = None  # (B, U) the maps' maxima
    filter_classes: Tensor | None = None  # (U,) long: each filter's category


class ICNNResNet(DKAResNet):
    """ResNet whose layer4 output carries the filter loss and the mask layer (see the module docstring)."""

    def __init__(self, spec: ModelSpec, num_classes: int, stem: str = "cifar", width: int = 64,
                 filter_weight: float = 1.0, beta: float = 4.0, tau: float | None = None,
                 alpha: float | None = None, momentum: float = 0.9):
        super().__init__(spec, num_classes=num_classes, stem=stem, width=width)
        if filter_weight < 0 or beta <= 0 or not 0 <= momentum < 1 or (tau is not None and tau <= 0):
            raise ValueError(f"res*-icnn options out of range: filter_weight={filter_weight} (>= 0), beta={beta} "
                             f"(> 0), tau={tau} (> 0 or None), momentum={momentum} (in [0, 1))")
        if alpha is not None and not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1) or None (the paper's n^2 / (1 + n^2)); got {alpha}")
        self.filter_weight, self.beta, self.tau, self.alpha, self.momentum = (
            float(filter_weight), float(beta), tau, alpha, float(momentum))
        self.build_kwargs.update(filter_weight=self.filter_weight, beta=self.beta, tau=tau, alpha=alpha,
                                 momentum=self.momentum)
        self.mask = TemplateMask(beta)
        self.register_buffer("class_activation", torch.zeros(self.num_features, num_classes))
        self.register_buffer("class_seen", torch.zeros(num_classes, dtype=torch.bool))
        self._train_fmaps: Tensor | None = None
        self._templates: dict = {}

    @property
    def filter_classes(self) -> Tensor:
        """(U,) each filter's category: the class with the largest running mean activation."""
        return self.class_activation.argmax(dim=1)

    def top_maps(self, x: Tensor) -> Tensor:
        """layer4's output before the mask: the maps the filter loss sees."""
        return DKAResNet.features(self, x)

    def features(self, x: Tensor) -> Tensor:
        """The masked maps of the top conv layer, (B, U, h, w): what the head pools."""
        fmaps = self.top_maps(x)
        if self.training:
            self._train_fmaps = fmaps
        return self.mask(fmaps)

    def templates(self, h: int, w: int, device) -> tuple[Tensor, Tensor]:
        key = (h, w, str(device))
        if key not in self._templates:
            self._templates[key] = (position_templates(h, w, self.beta, self.tau, device),
                                    template_log_prior(h * w, self.alpha, device))
        return self._templates[key]

    @torch.no_grad()
    def update_filter_classes(self, totals: Tensor, labels: Tensor) -> None:
        """Fold a batch's per-class mean of ``sum_ij x_ij`` (totals: (B, U)) into `class_activation`."""
        num_classes = self.class_activation.shape[1]
        counts = torch.bincount(labels, minlength=num_classes)
        sums = torch.zeros(num_classes, totals.shape[1], device=totals.device).index_add_(0, labels, totals.float())
        means = (sums / counts.clamp_min(1)[:, None]).T  # (U, classes)
        present = counts > 0
        fresh = present & ~self.class_seen
        old = present & self.class_seen
        self.class_activation[:, fresh] = means[:, fresh]
        self.class_activation[:, old] = self.momentum * self.class_activation[:, old] + (1 - self.momentum) * means[:, old]
        self.class_seen |= present

    def auxiliary_losses(self, labels: Tensor, recipe) -> dict[str, Tensor]:
        """The training engine's extension point (`dka.train.objectives`): ``filter_weight * mean_f -MI``.

        Uses the maps cached by the training forward pass just run; also updates the filter categories.
        """
        fmaps, self._train_fmaps = self._train_fmaps, None
        if fmaps is None:
            raise RuntimeError("auxiliary_losses needs the maps of a training forward pass: call model.train() "
                               "and model(images) first")
        x = fmaps.float().flatten(2)
        self.update_filter_classes(x.detach().sum(2), labels)
        if self.filter_weight == 0:
            return {}
        templates, log_prior = self.templates(fmaps.shape[2], fmaps.shape[3], x.device)
        negative = templates.shape[0] - 1
        own = labels[:, None] == self.filter_classes[None, :]
        target = torch.where(own, peak_positions(x.detach()), torch.full_like(own, negative, dtype=torch.long))
        mi = filter_mutual_information(x, templates, log_prior, target)
        return {"filter": -self.filter_weight * mi.mean()}

    def explain(self, x: Tensor, target=None) -> LocatedAttribution:
        """Unit contributions to the target class (as for the dense head) plus each filter's peak location."""
        with inference_mode(self):
            fmaps = self.features(x.to(next(self.parameters()).device))
            pooled = self.pool(fmaps)
            logits = self.head(pooled)
        base = decompose_linear_head(fmaps, pooled, logits, self.head, target)
        peak = peak_positions(fmaps).cpu()
        w = fmaps.shape[3]
        return LocatedAttribution(**{f.name: getattr(base, f.name) for f in fields(Attribution)},
                                  peaks=torch.stack([peak // w, peak % w], dim=2),
                                  peak_values=fmaps.flatten(2).amax(2).float().cpu(),
                                  filter_classes=self.filter_classes.cpu())


@register_model("icnn", FORMS, _PATTERN, _parse,
                "Interpretable CNN (Zhang et al. 2018): filter loss and mask layer on layer4's output")
def _build_icnn(spec: ModelSpec, num_classes: int, stem: str = "cifar", width: int = 64, **options) -> ICNNResNet:
    check_options(spec.name, options, OPTIONS)
    return ICNNResNet(spec, num_classes=num_classes, stem=stem, width=width, **options)
