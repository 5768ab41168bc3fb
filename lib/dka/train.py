"""Training engine: the paper's recipes, metrics every epoch, atomic checkpoints, exact resume, DDP.

WHY it looks like this:
- The paper's two recipes (CIFAR: SGD 0.1 / momentum 0.9 / wd 5e-4 / batch 256 / 200 epochs / x0.1
  every 70; Places365: wd 1e-4 / 90 epochs / x0.1 every 30) are named presets, plus the scaled-down
  `demo` and `smoke` presets the CPU profiles use. Every preset field can be overridden.
- Resume must reproduce an uninterrupted run bit for bit (on CPU in deterministic mode): the data
  order is a function of (seed, epoch) only (a seeded `DistributedSampler`, also with one process, and
  a per-epoch DataLoader generator), and `checkpoint.pt` carries model, optimiser, scheduler, all RNG
  states and the metrics history; `metrics.jsonl` is regenerated from it, so a kill between the two
  writes cannot duplicate or lose a line.
- Under `torchrun` the global batch is split over ranks, BatchNorm statistics are pooled across ranks
  (`nn.SyncBatchNorm` on GPU, an all-reduce BatchNorm on CPU/gloo), so N processes compute the same
  step as one process with the same global batch; rank 0 alone writes files.

`never_routed` (per dynamic layer, share of weights (c, i) never selected by any sample during the
epoch's training steps) is recorded by the layers themselves: each ORs the (c, i) pairs it selects
into a mask (`routing_mask`, see `dka.layers.dynamic_k_linear`), exact and nearly free. Under
torch.compile that in-place bookkeeping would force recompilations, so there forward hooks outside
the graph repeat the selection instead (`dka.layers.routed_indices`, same dtype and tie-breaking; for
the internal 1x1 layers on a rotating subsample of at most `_ROUTING_BUDGET` products per step, a
close upper estimate).

Fault injection for the resume test: with DKA_TRAIN_KILL_AFTER_STEPS=N in the environment the process
SIGKILLs itself after N optimiser steps (counted in this process), i.e. it dies exactly like `kill -9`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from dka.progress import tqdm

from dka.atomic import atomic_write
from dka.checkpoint import load_checkpoint, model_payload, save_atomic, unwrap_model

__all__ = ["PRESETS", "TrainConfig", "RunResult", "run", "main", "resolve_preset", "bf16_is_fast"]

# ----------------------------------------------------------------------------------------------
# Presets

# Epoch lists accept ints and the token "last" (= the final epoch); "all" and "none" as strings.
PRESETS: dict[str, dict[str, Any]] = {
    # The authors' CIFAR recipe (paper, Sec. 4): 200 epochs, lr x0.1 at epochs 70 and 140.
    "paper-cifar": dict(
        epochs=200, lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=256, schedule="step",
        milestones=(70, 140), gamma=0.1, warmup_epochs=0, l1=5e-4, width=64,
        save_head_epochs="all", save_checkpoint_epochs="0,1,5,10,25,50,100,150,last",
    ),
    # The authors' Places365 script: 90 epochs, lr x0.1 every 30, weight decay 1e-4.
    "paper-places": dict(
        epochs=90, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=256, schedule="step",
        milestones=(30, 60), gamma=0.1, warmup_epochs=0, l1=1e-4, width=64,
        save_head_epochs="all", save_checkpoint_epochs="0,1,2,5,10,20,30,45,60,last",
    ),
    # CPU demo profile: 12 epochs of one-epoch linear warmup + cosine decay. A step schedule needs
    # ~3 phases of several epochs each to converge; cosine anneals smoothly to 0 within any budget,
    # so the last epochs already see a small lr and the curve ends converged (the prototype's 85-90%
    # at 32 px in 12 epochs). Warmup protects BatchNorm nets from lr 0.1 on a fresh init. L1 2e-3:
    # strong enough to sparsify a head within ~1k steps (the prototype's value).
    "demo": dict(
        epochs=12, lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128, schedule="cosine",
        milestones=(), gamma=0.1, warmup_epochs=1, l1=2e-3, width=16,
        save_head_epochs="all", save_checkpoint_epochs="0,1,2,4,8,last",
    ),
    # CI smoke profile: a couple of epochs of a few steps each.
    "smoke": dict(
        epochs=2, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=32, schedule="cosine",
        milestones=(), gamma=0.1, warmup_epochs=0, l1=2e-3, width=8, max_steps_per_epoch=4,
        max_eval_steps=4, save_head_epochs="all", save_checkpoint_epochs="0,last",
    ),
}
SCHEDULES = ("step", "cosine", "constant")

# Config fields that do not change what is computed: a resume may change them freely.
_NOT_FINGERPRINTED = frozenset({
    "out", "data_root", "workers", "device", "progress", "compile", "threads",
    "save_head_epochs", "save_checkpoint_epochs",
})
_NAN_CHECK_EVERY = 50  # optimiser steps between host-side checks for a non-finite loss
_ROUTING_BUDGET = 1 << 21  # products recomputed per internal layer per step for `never_routed` (~2 M)
_SPARSITY_THRESHOLD = 1e-3


def bf16_is_fast(device: str | None) -> bool:
    """Whether bf16 autocast speeds training up on `device` (None = CUDA if available, else CPU).

    On GPUs it does. On CPUs only with native bf16 instructions (AVX512-BF16 or AMX): elsewhere
    PyTorch emulates bf16 and a width-16 ResNet18 step measured ~3x slower than fp32 (2-core AVX512
    machine: 290 vs 880 img/s).
    """
    kind = (device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    if kind != "cpu":
        return True
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_preset(preset: str, data: str) -> str:
    """`paper` means the paper's recipe for the dataset: Places365's for places365, CIFAR's otherwise."""
    if preset == "paper":
        return "paper-places" if data.startswith("places") else "paper-cifar"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: paper, {', '.join(PRESETS)}")
    return preset


def _parse_epochs(spec, epochs: int, clip: bool = False) -> tuple[int, ...]:
    """"all" | "none" | "0,1,5,last" | iterable of ints -> sorted tuple within [0, epochs]."""
    if spec is None or spec == "none" or spec == "":
        return ()
    if spec == "all":
        return tuple(range(epochs + 1))
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for item in items:
        item = str(item).strip()
        value = epochs if item == "last" else int(item)
        if clip and value > epochs:
            continue
        if not 0 <= value <= epochs:
            raise ValueError(f"epoch {value} in {spec!r} is outside [0, {epochs}] (0 = before training)")
        out.add(value)
    return tuple(sorted(out))


def _parse_ints(spec) -> tuple[int, ...]:
    if spec is None or spec == "" or spec == "none":
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return tuple(int(str(x).strip()) for x in items)


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """One training run. Fields left as None take the preset's value (see `PRESETS`).

    Accuracies in metrics are percentages (0-100, as in the paper's tables); `sparsity` and
    `never_routed` are shares (0-1). `batch_size` is the global batch (split over DDP ranks).
    """

    model: str
    data: str
    out: str
    data_root: str | None = None
    preset: str = "demo"
    width: int | None = None
    stem: str | None = None  # None: the dataset's recommended stem
    epochs: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    schedule: str | None = None  # step | cosine | constant
    milestones: tuple[int, ...] | str | None = None
    gamma: float | None = None
    warmup_epochs: float | None = None
    l1: float | None = None  # strength of the L1 penalty on the head (only for *-l1 models)
    amp: bool | None = None  # bf16 autocast (default: where bf16 is fast, see `bf16_is_fast`)
    channels_last: bool | None = None  # default: on
    compile: bool = False
    workers: int | None = None
    seed: int = 0
    deterministic: bool = False
    device: str | None = None
    save_head_epochs: Any = None
    save_checkpoint_epochs: Any = None
    max_steps_per_epoch: int | None = None
    max_eval_steps: int | None = None
    augment: bool = True
    sync_bn: bool = True
    threads: int | None = None
    progress: bool = True

    def resolved(self) -> TrainConfig:
        """A copy with every preset-driven field filled in and validated."""
        preset_name = resolve_preset(self.preset, self.data)
        preset = PRESETS[preset_name]
        values = dataclasses.asdict(self)
        values["preset"] = preset_name
        from_preset = set()
        for key, value in preset.items():
            if values.get(key) is None:
                values[key] = value
                from_preset.add(key)
        values["amp"] = bf16_is_fast(values["device"]) if values["amp"] is None else bool(values["amp"])
        values["channels_last"] = True if values["channels_last"] is None else bool(values["channels_last"])
        values["milestones"] = _parse_ints(values["milestones"])
        epochs = int(values["epochs"])
        for key in ("save_head_epochs", "save_checkpoint_epochs"):
            # a preset's list is cut to a shortened run; a list the user gave must fit it
            values[key] = _parse_epochs(values[key], epochs, clip=key in from_preset)
        cfg = TrainConfig(**values)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1 or None; got {self.max_steps_per_epoch}")
        if self.l1 < 0:
            raise ValueError(f"l1 strength must be >= 0; got {self.l1}")

    def fingerprint_fields(self) -> dict:
        return {k: v for k, v in _plain(dataclasses.asdict(self)).items() if k not in _NOT_FINGERPRINTED}

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_fields(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _plain(obj):
    """Tuples -> lists recursively, so configs compare equal after a JSON/pickle round trip."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


@dataclass
class RunResult:
    out_dir: Path
    metrics: list[dict] = field(default_factory=list)
    final_path: Path | None = None


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule


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


# ----------------------------------------------------------------------------------------------
# Distributed helpers


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_pref: str | None) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device_pref is None or device_pref.startswith("cuda"))
    initialized_here = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        initialized_here = True
    return _Dist(world=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank,
                 initialized_here=initialized_here)


def _all_reduce(tensor: torch.Tensor, dist_ctx: _Dist, op: str = "sum") -> torch.Tensor:
    if dist_ctx.world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def _raise_if_diverged(first_bad_step: torch.Tensor, dist_ctx: _Dist, epoch: int, steps_per_epoch: int, bar,
                       ckpt_path: Path | None, good_epoch: int) -> None:
    """FloatingPointError naming the epoch and first step whose loss was not finite (on any rank)."""
    diverged = _all_reduce((first_bad_step >= 0).to(torch.float32).reshape(1), dist_ctx, op="max")
    if diverged.item() == 0:
        return
    bar.close()
    step = int(first_bad_step.item())
    where = f"step {step}/{steps_per_epoch}" if step >= 0 else "a step on another rank"
    kept = (f"the last good checkpoint ({ckpt_path}, epoch {good_epoch}) is kept" if ckpt_path is not None
            else "no checkpoint had been written yet")
    raise FloatingPointError(
        f"non-finite training loss at epoch {epoch} {where}; {kept} — lower --lr or check the input data")


def _barrier(dist_ctx: _Dist) -> None:
    if dist_ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is again a sum over ranks (each rank's statistics feed every
    rank's loss), so gradients through pooled BatchNorm statistics are exact."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are pooled over all ranks by a differentiable all-reduce.

    `nn.SyncBatchNorm` refuses CPU tensors; this is its CPU/gloo counterpart (sum, sum of squares and
    count reduced in one call), so DDP on CPU computes exactly the global-batch step.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        xf = x.float()
        count = xf.new_full((1,), xf.numel() / channels)
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)) * m)
        shape = (1, channels, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _convert_allreduce_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, AllReduceBatchNorm2d):
        new = AllReduceBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        new.load_state_dict(module.state_dict())
        return new.to(module.weight.device if module.affine else module.running_mean.device)
    for name, child in module.named_children():
        setattr(module, name, _convert_allreduce_bn(child))
    return module


# ----------------------------------------------------------------------------------------------
# RNG state (stored as tensors and plain types: weights_only loads accept them)


def _rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    npd = state["numpy"]
    np.random.set_state({
        "bit_generator": npd["bit_generator"],
        "state": {"key": npd["key"].numpy().astype(np.uint32), "pos": npd["pos"]},
        "has_gauss": npd["has_gauss"], "gauss": npd["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(obj):
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Metrics helpers


class RoutingTracker:
    """Per dynamic layer, a boolean (out, in) mask of the weights selected at least once this epoch.

    Eager mode: the layers fill the masks themselves (`routing_mask`). Compiled: forward hooks
    repeat the selection (see the module docstring).
    """

    def __init__(self, layers: dict[str, nn.Module], compiled: bool = False) -> None:
        from dka.layers import routed_indices

        self._routed_indices = routed_indices
        self.layers = layers
        self.used: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._compiled = compiled
        self._handles = (
            [module.register_forward_hook(self._hook(name)) for name, module in layers.items()] if compiled else []
        )
        self.reset()

    def reset(self) -> None:
        for name, module in self.layers.items():
            out_features, in_features = module.weight.shape[0], module.weight.shape[1]
            self.used[name] = torch.zeros(out_features, in_features, dtype=torch.bool, device=module.weight.device)
            self._calls[name] = 0
            if not self._compiled:
                module.routing_mask = self.used[name]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not module.training or not torch.is_grad_enabled():
                return
            self._record(name, module, inputs[0].detach())

        # Kept out of torch.compile graphs: the bookkeeping (a Python step counter, in-place scatter
        # into a mask owned here) would otherwise force a recompilation at every step. Only then:
        # importing the compiler costs seconds.
        return torch.compiler.disable(hook) if self._compiled else hook

    def _record(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        weight = module.weight.detach()
        out_features, in_features = weight.shape[0], weight.shape[1]
        weight = weight.reshape(out_features, in_features)
        if x.dim() == 4:  # DynamicKConv2d: every output position is a row; subsample to the budget
            stride = getattr(module, "stride", 1)
            stride = stride[0] if isinstance(stride, tuple) else stride
            rows = x[:, :, ::stride, ::stride].permute(0, 2, 3, 1).reshape(-1, in_features)
            every = max(1, math.ceil(rows.shape[0] * out_features * in_features / _ROUTING_BUDGET))
            if every > 1:
                rows = rows[self._calls[name] % every::every]
        else:
            rows = x
        self._calls[name] += 1
        device_type = rows.device.type
        if torch.is_autocast_enabled(device_type):  # select in the same dtype as the layer does
            dtype = torch.get_autocast_dtype(device_type)
            rows, weight = rows.to(dtype), weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            idx = self._routed_indices(rows.contiguous(), weight.contiguous(), module.k)  # (N, out, k)
        self.used[name].scatter_(1, idx.transpose(0, 1).reshape(out_features, -1), True)

    def never_routed(self, dist_ctx: _Dist) -> dict[str, float]:
        out = {}
        for name, used in self.used.items():
            used_u8 = _all_reduce(used.to(torch.uint8), dist_ctx, op="max")
            out[name] = 1.0 - used_u8.float().mean().item()
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self.layers.values():
            module.routing_mask = None


def _sparsity(model: nn.Module) -> dict[str, float]:
    """Share of |w| < 1e-3 for the head and every dynamic layer (the paper's sparsity measure)."""
    layers = {"head": model.head}
    layers.update(model.dynamic_layers())
    return {name: (m.weight.detach().abs() < _SPARSITY_THRESHOLD).float().mean().item()
            for name, m in layers.items()}


# ----------------------------------------------------------------------------------------------
# Data


def _dataset_of(obj):
    return obj.dataset if isinstance(obj, torch.utils.data.DataLoader) else obj


def _make_loaders(bundle, cfg: TrainConfig, dist_ctx: _Dist, device: torch.device, per_rank_batch: int):
    from torch.utils.data import DataLoader, Subset
    from torch.utils.data.distributed import DistributedSampler

    train_ds, test_ds = _dataset_of(bundle.train), _dataset_of(bundle.test)
    extra = {}
    for key in ("collate_fn", "worker_init_fn"):
        value = getattr(bundle.train, key, None) if isinstance(bundle.train, DataLoader) else None
        if value is not None:
            extra[key] = value
    workers = cfg.workers if cfg.workers is not None else (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    common = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False, **extra)
    # A seeded sampler also with one process: the data order is a function of (seed, epoch) only.
    sampler = DistributedSampler(train_ds, num_replicas=dist_ctx.world, rank=dist_ctx.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    train = DataLoader(train_ds, batch_size=per_rank_batch, sampler=sampler, drop_last=True, **common)
    test_part = Subset(test_ds, range(dist_ctx.rank, len(test_ds), dist_ctx.world))
    test = DataLoader(test_part, batch_size=max(per_rank_batch, 64), shuffle=False, **common)
    return train, sampler, test


# ----------------------------------------------------------------------------------------------
# The run


def _device_for(cfg: TrainConfig, dist_ctx: _Dist) -> torch.device:
    if cfg.device is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        name = cfg.device
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        return torch.device("cuda", dist_ctx.local_rank) if dist_ctx.world > 1 else torch.device(name)
    return torch.device(name)


def _check_fingerprint(state: dict, cfg: TrainConfig, path: Path) -> None:
    if state.get("fingerprint") == cfg.fingerprint():
        return
    stored = state.get("config", {})
    mine = cfg.fingerprint_fields()
    diff = {k: (stored.get(k), mine[k]) for k in mine if _plain(stored.get(k)) != mine[k]}
    raise ValueError(
        f"{path} belongs to a run with a different configuration (stored vs requested: {diff}); "
        "re-run with the original settings to resume it, or choose another --out directory"
    )


def _write_metrics(path: Path, metrics: list[dict]) -> None:
    with atomic_write(path, fsync=True) as handle:
        for row in metrics:
            handle.write(json.dumps(row) + "\n")


def _head_payload(model: nn.Module, epoch: int) -> dict:
    head = unwrap_model(model).head
    return {
        "epoch": epoch, "layer": "head",
        "weight": head.weight.detach().cpu().clone(),
        "bias": None if head.bias is None else head.bias.detach().cpu().clone(),
    }


def _save_snapshots(model, cfg: TrainConfig, out: Path, epoch: int) -> None:
    if epoch in cfg.save_head_epochs:
        save_atomic(_head_payload(model, epoch), out / f"head_epoch{epoch:03d}.pt")
    if epoch in cfg.save_checkpoint_epochs:
        save_atomic(model_payload(model, epoch), out / f"checkpoint_epoch{epoch:03d}.pt")


def _finish(out: Path, state: dict, dist_ctx: _Dist) -> RunResult:
    final = out / "final.pt"
    if dist_ctx.main and not final.exists():
        save_atomic({"build_kwargs": state["build_kwargs"], "state_dict": state["model"],
                     "epoch": state["epoch"]}, final)
    if dist_ctx.main:
        _write_metrics(out / "metrics.jsonl", state["metrics"])
    _barrier(dist_ctx)
    return RunResult(out_dir=out, metrics=list(state["metrics"]), final_path=final)


def run(config: TrainConfig, bundle=None) -> RunResult:
    """Train (or resume, or return the finished result of) the run described by `config`.

    `bundle`: a `dka.data.DataBundle`-like object (train, test, num_classes, stem) to use instead of
    `dka.data.build_loaders(config.data, config.data_root, ...)` — tests pass in-memory datasets.
    """
    cfg = config.resolved()
    dist_ctx = _init_distributed(cfg.device)
    # Process-wide switches this run changes, restored afterwards (callers may be notebooks or tests).
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    try:
        return _run(cfg, bundle, dist_ctx)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[3], saved[4]
        if dist_ctx.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(cfg: TrainConfig, bundle, dist_ctx: _Dist) -> RunResult:
    from dka import models

    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    state = None
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        _check_fingerprint(state, cfg, ckpt_path)
        if state["epoch"] >= cfg.epochs:
            return _finish(out, state, dist_ctx)
    if dist_ctx.main:
        out.mkdir(parents=True, exist_ok=True)

    device = _device_for(cfg, dist_ctx)
    if cfg.batch_size % dist_ctx.world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {dist_ctx.world} processes; "
                         "choose a global batch that is a multiple of --nproc_per_node")
    per_rank_batch = cfg.batch_size // dist_ctx.world
    if device.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist_ctx.world))
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // max(1, local_world)))
    else:
        torch.backends.cudnn.benchmark = not cfg.deterministic
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    _seed_everything(cfg.seed)

    if bundle is None:
        from dka import data

        bundle = data.build_loaders(cfg.data, cfg.data_root, batch_size=per_rank_batch,
                                    workers=0,  # only the datasets are used: _make_loaders builds the loaders
                                    device=device.type, augment=cfg.augment, seed=cfg.seed)
    train_loader, sampler, test_loader = _make_loaders(bundle, cfg, dist_ctx, device, per_rank_batch)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(sampler)} images per process, fewer than one batch of "
                         f"{per_rank_batch}; lower --batch-size")
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)

    stem = cfg.stem or getattr(bundle, "stem", None) or "cifar"
    model = models.build(cfg.model, num_classes=bundle.num_classes, stem=stem, width=cfg.width)
    use_l1 = bool(model.spec.l1) and cfg.l1 > 0
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    if dist_ctx.world > 1 and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else _convert_allreduce_bn(model)
    bare = model
    tracker = RoutingTracker(bare.dynamic_layers(), compiled=cfg.compile)
    optimizer = torch.optim.SGD(bare.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    lr_factor = LrFactor(cfg.schedule, steps_per_epoch, cfg.epochs, cfg.milestones, cfg.gamma, cfg.warmup_epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    metrics: list[dict] = []
    start_epoch = 0
    if state is not None:
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        if len(rngs) != dist_ctx.world:
            warnings.warn(f"checkpoint was written by {len(rngs)} processes, resuming with {dist_ctx.world}: "
                          "the run continues but will not be bit-identical to an uninterrupted one", stacklevel=2)
        _set_rng_state(rngs[dist_ctx.rank % len(rngs)])
        start_epoch = int(state["epoch"])
        metrics = list(state["metrics"])
    elif dist_ctx.world > 1:
        # Same init everywhere (DDP also broadcasts it); different augmentation streams per rank.
        _seed_everything(cfg.seed * 1000 + dist_ctx.rank)

    train_model: nn.Module = bare
    if dist_ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(bare, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    if state is None and dist_ctx.main:
        _save_snapshots(bare, cfg, out, 0)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp)
    kill_after = int(os.environ.get("DKA_TRAIN_KILL_AFTER_STEPS", "0") or 0)
    steps_here = 0
    non_blocking = device.type == "cuda"

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        train_loader.generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        tracker.reset()
        train_model.train()
        lr_now = optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # kept on device: no sync per step
        seen = 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (dist_ctx.main and cfg.progress), mininterval=0.5 if sys.stderr.isatty() else 30.0)
        # islice: a capped epoch must not fetch (and consume RNG for) one batch beyond the cap
        for step, (images, labels) in enumerate(itertools.islice(train_loader, steps_per_epoch), start=1):
            images = images.to(device, non_blocking=non_blocking, memory_format=memory_format)
            labels = labels.to(device, non_blocking=non_blocking)
            with torch.autocast(**autocast):
                logits = train_model(images)
            loss = F.cross_entropy(logits.float(), labels)
            total = loss + cfg.l1 * bare.head.weight.abs().sum() if use_l1 else loss
            # A non-finite loss is recorded on the device and looked at every _NAN_CHECK_EVERY steps (and at
            # the epoch's end): reading it every step would stall the GPU pipeline once per step. Nothing
            # is saved before the check, so the last good checkpoint stays either way.
            bad = ~torch.isfinite(total.detach())
            first_bad_step = torch.where(bad & (first_bad_step < 0), step, first_bad_step)
            if step % _NAN_CHECK_EVERY == 0 or step == steps_per_epoch:
                _raise_if_diverged(first_bad_step, dist_ctx, epoch, steps_per_epoch, bar,
                                   ckpt_path if state is not None else None, start_epoch)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().double() * labels.shape[0]
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += labels.shape[0]
            bar.update(1)
            steps_here += 1
            if kill_after and steps_here >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        train_totals = _all_reduce(torch.stack([loss_sum, correct.double(),
                                                torch.tensor(float(seen), dtype=torch.float64, device=device)]),
                                   dist_ctx)
        never_routed = tracker.never_routed(dist_ctx)
        test = _evaluate(train_model, test_loader, device, autocast, memory_format, cfg.max_eval_steps, dist_ctx)
        row = {
            "epoch": epoch,
            "lr": lr_now,
            "train_loss": train_totals[0].item() / train_totals[2].item(),
            "train_top1": 100.0 * train_totals[1].item() / train_totals[2].item(),
            "test_loss": test["loss"],
            "test_top1": test["top1"],
            "test_top5": test["top5"],
            "sparsity": _sparsity(bare),
            "never_routed": never_routed,
            "seconds": time.perf_counter() - started,
        }
        metrics.append(row)
        rngs = [_rng_state()]
        if dist_ctx.world > 1:
            import torch.distributed as dist

            gathered = [None] * dist_ctx.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        state = {
            "epoch": epoch,
            "fingerprint": cfg.fingerprint(),
            "config": _plain(dataclasses.asdict(cfg)),
            "build_kwargs": dict(bare.build_kwargs),
            "model": {k: v.detach().cpu().clone() for k, v in bare.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rngs,
            "metrics": metrics,
        }
        if dist_ctx.main:
            _save_snapshots(bare, cfg, out, epoch)
            save_atomic(state, ckpt_path)
            _write_metrics(out / "metrics.jsonl", metrics)
            print(f"[{cfg.model}] epoch {epoch}/{cfg.epochs} lr {lr_now:.4g} train loss {row['train_loss']:.4f} "
                  f"top1 {row['train_top1']:.2f} | test loss {row['test_loss']:.4f} top1 {row['test_top1']:.2f} "
                  f"top5 {row['test_top5']:.2f} | {row['seconds']:.1f}s", flush=True)
        _barrier(dist_ctx)
        start_epoch = epoch
    tracker.remove()
    return _finish(out, state, dist_ctx)


@torch.no_grad()
def _evaluate(model, loader, device, autocast, memory_format, max_steps, dist_ctx) -> dict:
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for images, labels in itertools.islice(loader, max_steps or None):
        images = images.to(device, non_blocking=device.type == "cuda", memory_format=memory_format)
        labels = labels.to(device, non_blocking=device.type == "cuda")
        with torch.autocast(**autocast):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        sums += torch.stack([
            F.cross_entropy(logits, labels, reduction="sum").double(),
            hit[:, 0].sum().double(), hit.any(1).sum().double(),
            torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=device),
        ])
    sums = _all_reduce(sums, dist_ctx)
    count = max(1.0, sums[3].item())
    return {"loss": sums[0].item() / count, "top1": 100.0 * sums[1].item() / count,
            "top5": 100.0 * sums[2].item() / count}


# ----------------------------------------------------------------------------------------------
# CLI


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dka train",
        description="Train a dka registry model (res18, res18-l1, res18-d5a, res18-d[32,32,5]a, res50, ...). "
                    "Re-running the same command resumes an interrupted run; a finished run is left as is. "
                    "Multi-GPU: torchrun --nproc_per_node=N -m dka train ...",
    )
    p.add_argument("--model", required=True, help="registry name, e.g. res18-d5a")
    p.add_argument("--data", required=True, help="cifar10 | places365 | scenes-smoke | scenes-demo32 | scenes-demo64")
    p.add_argument("--data-root", help="dataset directory (concept scenes are generated there when missing)")
    p.add_argument("--out", required=True, help="run directory (metrics.jsonl, checkpoint.pt, final.pt, ...)")
    p.add_argument("--preset", default="demo",
                   help="paper (= paper-cifar or paper-places by dataset) | " + " | ".join(PRESETS))
    p.add_argument("--width", type=int, help="ResNet base width (64 = the paper's network)")
    p.add_argument("--stem", choices=("cifar", "imagenet", "imagenet-small"), help="default: the dataset's recommended stem")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", "--wd", dest="weight_decay", type=float)
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, help="global batch size")
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--milestones", help="epochs where lr is multiplied by --gamma (step schedule), e.g. 70,140")
    p.add_argument("--gamma", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--l1", type=float, help="L1 strength on the head weights (res18-l1/res50-l1 models)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile")
    p.add_argument("--workers", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--save-head-epochs", help='"all", "none" or a list like 0,1,5,last')
    p.add_argument("--save-checkpoint-epochs", help='"all", "none" or a list like 0,10,last')
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--max-eval-steps", type=int)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="pool BatchNorm statistics across DDP processes (exact global-batch equivalence)")
    p.add_argument("--threads", type=int, help="CPU threads (default: cores / local processes)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def config_from_args(argv: list[str]) -> TrainConfig:
    args = vars(_build_parser().parse_args(argv))
    return TrainConfig(**args)


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(list(sys.argv[1:] if argv is None else argv))
    result = run(config)
    if int(os.environ.get("RANK", "0")) == 0:
        last = result.metrics[-1] if result.metrics else {}
        print(json.dumps({"out_dir": str(result.out_dir), "final": str(result.final_path),
                          "epochs": len(result.metrics), "test_top1": last.get("test_top1"),
                          "test_top5": last.get("test_top5")}))
    return 0
