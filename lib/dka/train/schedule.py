"""The learning-rate schedules: the paper's step schedule, cosine with warmup, constant."""

from __future__ import annotations

import math

__all__ = ["LrFactor"]


class LrFactor:
    """Multiplier of the base lr at optimiser step `step` (a callable object, so that LambdaLR's
    state_dict stores its parameters and a resumed scheduler is checked against them)."""

    def __init__(self, schedule: str, steps_per_epoch: int, epochs: int, milestones=(), gamma=0.1,
                 warmup_epochs: float = 0.0) -> None:
        self.schedule = schedule
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.warmup_steps = int(round(float(warmup_epochs) * steps_per_epoch))

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "step":
            epoch = step // self.steps_per_epoch
            return self.gamma ** sum(1 for m in self.milestones if epoch >= m)
        if self.schedule == "cosine":
            total = self.steps_per_epoch * self.epochs
            t = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        return 1.0
