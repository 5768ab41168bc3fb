"""Adversarial inputs and their detection from calculation paths (the decoupling paper's third application).

- `fgsm`: the fast gradient sign attack, ``x + eps * sign(grad_x CE)`` in pixel space [0, 1], on
  normalised images.
- `roc_auc`: area under the ROC curve of a score separating adversarial (positive) from clean inputs.
- `path_surprise`: how unlike its predicted class's usual path an input's path is: the mean over
  filters of the Bernoulli negative log-likelihood of its gates under the class's open rates (clean
  training images). An adversarial input is pushed to a class whose path it does not run.
- `probe_auc`: a logistic-regression detector on the concatenated gates, cross-fitted on two halves.
- `confidence_score`: 1 - max softmax, the baseline any classifier has.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["fgsm", "roc_auc", "path_surprise", "probe_auc", "confidence_score"]


def fgsm(model: nn.Module, images: Tensor, labels: Tensor, epsilon: float, mean: Sequence[float],
         std: Sequence[float]) -> Tensor:
    """FGSM images (normalised like `images`): one signed-gradient step of size `epsilon` in [0, 1] pixels.

    The model runs in eval mode; its train/eval state is restored after.
    """
    device = next(model.parameters()).device
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    x = images.to(device).detach().requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        loss = F.cross_entropy(model(x).float(), labels.to(device))
        (grad,) = torch.autograd.grad(loss, x)
    finally:
        model.train(was_training)
    pixels = (x.detach() * s + m + epsilon * grad.sign()).clamp(0, 1)  # sign(d/dpixel) = sign(d/dx): std > 0
    return ((pixels - m) / s).cpu()


def roc_auc(negative: Tensor, positive: Tensor) -> float:
    """P(score of a positive > score of a negative), ties counting one half (the Mann-Whitney U / n m)."""
    neg, pos = torch.as_tensor(negative, dtype=torch.float64), torch.as_tensor(positive, dtype=torch.float64)
    if neg.numel() == 0 or pos.numel() == 0:
        raise ValueError("roc_auc needs at least one negative and one positive score")
    values, inverse, counts = torch.unique(torch.cat([neg, pos]), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # average rank of tied scores
    u = ranks[neg.numel():].sum() - pos.numel() * (pos.numel() + 1) / 2
    return float(u / (neg.numel() * pos.numel()))


def path_surprise(gates: Mapping[str, Tensor], predicted: Tensor, class_rates: Mapping[str, Tensor],
                  floor: float = 1e-3) -> Tensor:
    """(N,) mean over all filters of ``-log p(gate | predicted class)`` under independent Bernoulli gates
    with the class's open rates (clipped to [floor, 1 - floor])."""
    total, count = torch.zeros(predicted.shape[0], dtype=torch.float64), 0
    for name, g in gates.items():
        p = class_rates[name][predicted].double().clamp(floor, 1 - floor)
        g = g.double()
        total -= (g * p.log() + (1 - g) * (1 - p).log()).sum(1)
        count += g.shape[1]
    return (total / count).float()


def confidence_score(logits: Tensor) -> Tensor:
    """(N,) 1 - max softmax probability (higher = less confident)."""
    return 1 - logits.float().softmax(1).amax(1)


def probe_auc(clean: Tensor, adversarial: Tensor, seed: int = 0, steps: int = 300, weight_decay: float = 1e-3) -> float:
    """ROC AUC of a logistic-regression detector on features (N, D) of clean vs adversarial inputs,
    cross-fitted: trained on one random half, scored on the other, and the other way round."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([clean, adversarial]).float()
    y = torch.cat([torch.zeros(clean.shape[0]), torch.ones(adversarial.shape[0])])
    fold = torch.randperm(x.shape[0], generator=g) % 2
    scores = torch.empty(x.shape[0])
    for k in (0, 1):
        train, test = fold != k, fold == k
        mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-3)
        z = (x - mu) / sd
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(z[train] @ w + b, y[train]) + weight_decay * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            scores[test] = z[test] @ w + b
    return roc_auc(scores[y == 0], scores[y == 1])

