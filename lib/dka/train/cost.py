"""What a set of training runs will cost, printed before it starts, and a refusal when the disk is short.

Why: the paper profile trains ~20 width-64 ResNets for 90-200 epochs each; a researcher should see the
images, epochs, GPU-hours and disk before renting hours of GPUs, and a run must not die at epoch 80 on a
full disk. GPU-hours come from a measured step: a few warm-up steps of each model at the per-process
batch on the device the runs use, times the steps the recipe takes, times the processes. Disk counts the
files a run writes (`checkpoint.pt` with the optimiser's momentum, `final.pt`, the per-epoch model and
head snapshots) plus, where given, the dissection feature store that does not fit in memory.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from dka import models
from dka.train.config import TrainConfig
from dka.train.objectives import training_loss

__all__ = ["RunCost", "CostEstimate", "InsufficientDiskError", "measure_step_seconds", "run_cost", "estimate",
           "require_disk", "free_bytes"]


class InsufficientDiskError(OSError):
    """The runs' folder (or the dissection's temporary folder) has less free space than the runs need."""


@dataclass(frozen=True)
class RunCost:
    """One run: its images per epoch (global), epochs, optimiser steps, measured step time, bytes on disk."""

    name: str
    images_per_epoch: int
    epochs: int
    steps: int
    step_seconds: float
    disk_bytes: int

    @property
    def hours(self) -> float:
        """Wall-clock hours of the training steps (evaluation not included)."""
        return self.steps * self.step_seconds / 3600


@dataclass
class CostEstimate:
    """The cost of a set of runs on `processes` devices each; `report()` is what is printed."""

    runs: list[RunCost]
    processes: int
    device: str
    folder: Path
    dissection_bytes: int = 0
    dissection_folder: Path | None = None
    free: dict[str, int] = field(default_factory=dict)

    @property
    def hours(self) -> float:
        return sum(r.hours for r in self.runs)

    @property
    def device_hours(self) -> float:
        """GPU-hours (device-hours): wall-clock hours times the devices each run occupies."""
        return self.hours * self.processes

    @property
    def disk_bytes(self) -> int:
        return sum(r.disk_bytes for r in self.runs)

    def report(self) -> str:
        kind = "GPU" if self.device.startswith("cuda") else "device"
        lines = [f"cost estimate ({len(self.runs)} runs on {self.processes} x {self.device}; step times measured "
                 f"here, training steps only):"]
        for r in self.runs:
            lines.append(f"  {r.name}: {r.images_per_epoch:,} images/epoch x {r.epochs} epochs = {r.steps:,} steps "
                         f"x {r.step_seconds * 1000:.0f} ms = {r.hours:.2f} h; disk {_size(r.disk_bytes)}")
        lines.append(f"  total: {self.hours:.2f} h wall-clock, {self.device_hours:.2f} {kind}-hours; checkpoints "
                     f"{_size(self.disk_bytes)} in {self.folder} (free {_size(self.free.get('runs', 0))})")
        if self.dissection_bytes:
            lines.append(f"  dissection features: {_size(self.dissection_bytes)} at a time in {self.dissection_folder} "
                         f"(free {_size(self.free.get('dissection', 0))})")
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(folder: str | Path) -> int:
    """Free bytes on the file system of `folder` (its nearest existing parent when it does not exist yet)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _batch(dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n training samples (wrapping around a smaller dataset), as one batch."""
    indices = [i % len(dataset) for i in range(n)]
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(indices)
    items = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


def measure_step_seconds(config: TrainConfig, bundle, processes: int = 1, warmup: int = 1, steps: int = 2) -> float:
    """Seconds of one training step of `config` at the per-process batch on its device (mean of `steps`,
    after `warmup` untimed steps). The model is a fresh one; nothing is written."""
    cfg = config.resolved()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = getattr(bundle.train, "dataset", bundle.train)
    images, labels = _batch(dataset, max(1, cfg.batch_size // processes))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    images, labels = images.to(device, memory_format=fmt), labels.to(device)
    model = models.build(cfg.model, num_classes=bundle.num_classes, stem=cfg.stem or bundle.stem, width=cfg.width,
                         **cfg.model_options).to(device=device, memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    timings = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            logits = model(images)
        loss = training_loss(model, logits, labels, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            timings.append(time.perf_counter() - started)
    return sum(timings) / len(timings)


def _state_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(bytes of the state dict, of the parameters, of the final layer), as checkpoints store them."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    head = sum(p.numel() * p.element_size() for p in model.head.parameters())
    return state, params, head


def run_cost(name: str, config: TrainConfig, train_images: int, num_classes: int, step_seconds: float,
             processes: int = 1) -> RunCost:
    """The cost of one run of `config` on a training set of `train_images` images."""
    cfg = config.resolved()
    per_rank = cfg.batch_size // processes
    steps_per_epoch = (train_images // processes) // per_rank if per_rank else 0  # drop_last, as the loop
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    with torch.device("meta"):  # shapes only
        model = models.build(cfg.model, num_classes=num_classes, width=cfg.width, **cfg.model_options)
    state, params, head = _state_bytes(model)
    # checkpoint.pt = weights + SGD momentum; final.pt; one file per model and per head snapshot
    disk = 2 * state + params + len(cfg.save_checkpoint_epochs) * state + len(cfg.save_head_epochs) * head
    return RunCost(name=name, images_per_epoch=steps_per_epoch * cfg.batch_size, epochs=cfg.epochs,
                   steps=steps_per_epoch * cfg.epochs, step_seconds=step_seconds, disk_bytes=int(disk))


def estimate(runs: Sequence[tuple[str, TrainConfig]], bundle, folder: str | Path, processes: int = 1,
             dissection_bytes: int = 0, dissection_folder: str | Path | None = None) -> CostEstimate:
    """Measure a step of each distinct model once and estimate every run; see `CostEstimate.report`."""
    measured: dict[tuple, float] = {}
    costs = []
    train_images = len(getattr(bundle.train, "dataset", bundle.train))
    for name, config in runs:
        cfg = config.resolved()
        key = (cfg.model, cfg.width, cfg.batch_size, cfg.amp, str(cfg.model_options))
        if key not in measured:
            measured[key] = measure_step_seconds(cfg, bundle, processes)
        costs.append(run_cost(name, cfg, train_images, bundle.num_classes, measured[key], processes))
    device = runs[0][1].resolved().device if runs else "cpu"
    result = CostEstimate(costs, processes, device or ("cuda" if torch.cuda.is_available() else "cpu"), Path(folder),
                          int(dissection_bytes), Path(dissection_folder) if dissection_folder else None)
    result.free["runs"] = free_bytes(folder)
    if dissection_bytes and dissection_folder:
        result.free["dissection"] = free_bytes(dissection_folder)
    return result


def require_disk(cost: CostEstimate, margin: float = 1.1) -> None:
    """Raise InsufficientDiskError when the runs (or the dissection features) would not fit with `margin`."""
    need = math.ceil(cost.disk_bytes * margin)
    if cost.free.get("runs", 0) < need:
        raise InsufficientDiskError(
            f"the runs need about {_size(need)} in {cost.folder} but only {_size(cost.free.get('runs', 0))} is free; "
            "free some space or point runs/ at a larger disk (a symlink), or save fewer checkpoints "
            "(save_checkpoint_epochs)")
    feats = math.ceil(cost.dissection_bytes * margin)
    if cost.dissection_folder is not None and cost.free.get("dissection", 0) < feats:
        raise InsufficientDiskError(
            f"Network Dissection stores {_size(feats)} of features in {cost.dissection_folder} but only "
            f"{_size(cost.free.get('dissection', 0))} is free; set TMPDIR to a folder on a larger disk")
