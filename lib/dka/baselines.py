"""Controls for "is it only sparsity?": a dense head pruned after training to K weights per class.

Dynamic-K trains its head sparse and routes per image. The cheapest competitor with the same number of
weights per class is a dense network whose head is pruned after training and fine-tuned: keep, per
class, the K inputs with the largest expected contribution |W[c,i]| * mean(x_i) over the training set,
zero the rest, and re-fit the kept weights and the bias by cross-entropy on the (frozen) backbone's
pooled features. If this matches DKA's accuracy and concept recovery, DKA's gain is sparsity alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PrunedHead", "prune_head", "pruned_runs"]


@dataclass
class PrunedHead:
    """A head with K weights per class: `weight` (classes, U) with zeros outside `mask`, and `bias`."""

    weight: np.ndarray
    bias: np.ndarray
    mask: np.ndarray
    k: int

    def logits(self, pooled: np.ndarray) -> np.ndarray:
        return np.asarray(pooled, dtype=np.float64) @ self.weight.T + self.bias


def prune_head(weight: np.ndarray, bias: np.ndarray, train_pooled: np.ndarray, train_labels: np.ndarray, k: int,
               epochs: int = 30, lr: float = 0.05, weight_decay: float = 0.0, batch_size: int = 256,
               seed: int = 0) -> PrunedHead:
    """Prune a trained dense head to `k` inputs per class and fine-tune the kept weights (see module doc).

    Args:
        weight, bias: the trained dense head, (classes, U) and (classes,).
        train_pooled, train_labels: the frozen backbone's pooled features of the training set and labels.
        k: inputs kept per class.
        epochs, lr, weight_decay, batch_size, seed: the fine-tuning (SGD with momentum 0.9, cosine lr).
    """
    w = torch.as_tensor(np.asarray(weight), dtype=torch.float32)
    if not 1 <= k <= w.shape[1]:
        raise ValueError(f"k={k} is out of range: choose 1 <= k <= {w.shape[1]} (the head's inputs)")
    x = torch.as_tensor(np.asarray(train_pooled), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    if x.shape[0] != y.shape[0] or x.shape[1] != w.shape[1]:
        raise ValueError(f"train_pooled {tuple(x.shape)} and train_labels {tuple(y.shape)} do not fit the head "
                         f"{tuple(w.shape)}")
    importance = w.abs() * x.mean(0).abs()[None, :]
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(1, importance.topk(k, dim=1).indices, True)
    param_w = torch.nn.Parameter(w * keep)
    param_b = torch.nn.Parameter(torch.as_tensor(np.asarray(bias), dtype=torch.float32).clone())
    optimizer = torch.optim.SGD([param_w, param_b], lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * max(1, (len(y) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(batch_size):
            loss = F.cross_entropy(x[idx] @ (param_w * keep).T + param_b, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    final = (param_w * keep).detach().double().numpy()
    return PrunedHead(weight=final, bias=param_b.detach().double().numpy(), mask=keep.numpy(), k=k)


def pruned_runs(final_paths, test_passes, train_loader, k: int, device: str = "cpu") -> list:
    """Per seed, a dense run's head pruned to `k` weights per class (fitted on `train_loader`'s pooled features)
    and scored on that seed's test pass: a list of `dka.evaluation.Collected`."""
    from dka.checkpoint import load_checkpoint
    from dka.evaluation import Collected, collect
    from dka.models import load_model

    scored = []
    for path, test in zip(final_paths, test_passes, strict=True):
        model = load_model(path, map_location=device)
        config = load_checkpoint(path)["config"]
        seen = collect(model, train_loader, device, amp=bool(config["amp"]), channels_last=bool(config["channels_last"]))
        head = model.head
        pruned = prune_head(head.weight.detach().cpu().numpy(), head.bias.detach().cpu().numpy(), seen.pooled,
                            seen.labels, k=k, seed=int(config["seed"]))
        scored.append(Collected(test.pooled, pruned.logits(test.pooled), test.labels))
    return scored
