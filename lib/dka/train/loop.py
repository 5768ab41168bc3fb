"""The training loop: `run` sets a run up, `train_one_epoch` and `evaluate` do the work.

`run(config)` trains the run `config` describes, resumes it from `checkpoint.pt` after an interruption,
or returns the stored result of a finished run. The data order is a function of (seed, epoch) only (a
seeded `DistributedSampler`, also with one process, and a per-epoch DataLoader generator), so a resumed
run continues exactly where the interrupted one stopped. Models train on `objectives.training_loss`
(cross-entropy plus the model's own auxiliary losses: the extension point for other methods).

What makes a result trustworthy rather than merely produced: every argument is checked before data is
read or `--out` is created (`check`); one process at a time owns the run directory (`dka.dirlock`), so
`final.pt`, `checkpoint.pt` and `metrics.jsonl` always come from the same run; a resume must see the
same data as the run it continues (`dka.data.identity`); with `skip_corrupt`, the images left out are
counted per epoch (`skipped_images` in metrics.jsonl) instead of going unnoticed.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from dka import models
from dka.checkpoint import load_checkpoint, save_atomic
from dka.data.identity import dataset_identity, identity_differences
from dka.data.loaders import RECOMMENDED_STEMS, build_loaders, check_dataset
from dka.dirlock import exclusive
from dka.progress import tqdm
from dka.train import state as run_state
from dka.train.config import TrainConfig
from dka.train.distributed import (DistContext, all_gather_objects, all_reduce, barrier, convert_allreduce_bn,
                                   init_distributed)
from dka.train.objectives import classification_loss, training_loss
from dka.train.routing import RoutingTracker, layer_sparsity
from dka.train.schedule import LrFactor

__all__ = ["run", "check", "RunResult", "train_one_epoch", "evaluate", "Environment"]

_NAN_CHECK_EVERY = 50  # optimiser steps between host-side checks for a non-finite loss


@dataclass
class RunResult:
    out_dir: Path
    metrics: list[dict] = field(default_factory=list)
    final_path: Path | None = None


@dataclass(frozen=True)
class Environment:
    """Where and how tensors run: device, bf16 autocast, memory format, the process group."""

    device: torch.device
    amp: bool
    memory_format: torch.memory_format
    dist: DistContext

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        return (images.to(self.device, non_blocking=non_blocking, memory_format=self.memory_format),
                labels.to(self.device, non_blocking=non_blocking))


def run(config: TrainConfig, bundle=None, on_step: Callable[[int], None] | None = None) -> RunResult:
    """Train (or resume, or return the finished result of) the run described by `config`.

    Args:
        config: the run's settings (resolved here against its preset).
        bundle: a `dka.data.DataBundle`-like object (train, test, num_classes, stem) to use instead of
            `dka.data.build_loaders(config.data, config.data_root, ...)` — tests pass in-memory datasets.
        on_step: called after every optimiser step with the number of steps taken in this process
            (progress reporting, fault-injection tests).

    Returns:
        The run directory, its per-epoch metrics and the path of `final.pt`.
    """
    cfg = check(config, bundle)
    dist_ctx = init_distributed(cfg.device)
    # Process-wide switches this run changes, restored afterwards (callers may be notebooks or tests).
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    try:
        return _run(cfg, bundle, dist_ctx, on_step)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[3], saved[4]
        if dist_ctx.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def check(config: TrainConfig, bundle=None) -> TrainConfig:
    """The resolved config, after every check that needs no data read and no file written.

    Wrong types, a bad model name, K or model option fail here in milliseconds (the network is built on
    the meta device), not after minutes of decoding; a missing dataset fails before `--out` is created.
    `run` calls it first; the command line calls it to report bad arguments without a traceback.
    """
    cfg = config.resolved()
    if (cfg.device or "").startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {cfg.device!r} requested but CUDA is not available; use --device cpu")
    stem = cfg.stem or (getattr(bundle, "stem", None) if bundle is not None else RECOMMENDED_STEMS.get(cfg.data))
    with torch.device("meta"):
        models.build(cfg.model, num_classes=2, stem=stem or "cifar", width=cfg.width, **cfg.model_options)
    if bundle is None and not (Path(cfg.out) / "checkpoint.pt").exists():  # a finished run needs no data
        check_dataset(cfg.data, cfg.data_root)
    return cfg


@contextmanager
def _run_directory(out: Path, dist_ctx: DistContext):
    """The run directory, held exclusively by the main process while the run reads and writes it: a second
    process on it fails at once naming this one's PID, and temp files a killed run left are deleted."""
    if not dist_ctx.main:
        yield
        return
    with exclusive(out, "training run") as held:
        for path in held.removed:
            print(f"removed {path}, a temp file left by a killed run", flush=True)
        yield


def _run(cfg: TrainConfig, bundle, dist_ctx: DistContext, on_step) -> RunResult:
    out = Path(cfg.out)
    with _run_directory(out, dist_ctx):
        return _run_locked(cfg, bundle, dist_ctx, on_step, out)


def _run_locked(cfg: TrainConfig, bundle, dist_ctx: DistContext, on_step, out: Path) -> RunResult:
    ckpt_path = out / "checkpoint.pt"
    state = None
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        run_state.check_fingerprint(state, cfg, ckpt_path)
        if state["epoch"] >= cfg.epochs:
            return _finish(out, state, dist_ctx, just_trained=False)
    if dist_ctx.main:
        print(f"[{cfg.model}] recipe: {cfg.summary()}", flush=True)

    env = _environment(cfg, dist_ctx)
    if cfg.batch_size % dist_ctx.world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {dist_ctx.world} processes; "
                         "choose a global batch that is a multiple of --nproc_per_node")
    per_rank_batch = cfg.batch_size // dist_ctx.world
    if bundle is None:
        bundle = build_loaders(cfg.data, cfg.data_root, batch_size=per_rank_batch,
                               workers=0,  # only the datasets are used: make_loaders builds the loaders
                               device=env.device.type, augment=cfg.augment, seed=cfg.seed,
                               skip_corrupt=cfg.skip_corrupt)
    identity = dataset_identity(bundle, cfg.data_root)
    if state is not None and state.get("dataset") is not None:
        _check_same_data(state["dataset"], identity, cfg, ckpt_path)
    decode_skipped = _decode_skipped(bundle)
    if cfg.skip_corrupt and decode_skipped and dist_ctx.main:
        print(f"[{cfg.model}] --skip-corrupt: {len(decode_skipped)} image(s) could not be decoded and are left out: "
              f"{', '.join(decode_skipped[:5])}{', ...' if len(decode_skipped) > 5 else ''}", flush=True)
    train_loader, sampler, test_loader = make_loaders(bundle, cfg, env, per_rank_batch)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(sampler)} images per process, fewer than one batch of "
                         f"{per_rank_batch}; lower --batch-size")
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)

    stem = cfg.stem or getattr(bundle, "stem", None) or "cifar"
    bare = models.build(cfg.model, num_classes=bundle.num_classes, stem=stem, width=cfg.width,
                        **cfg.model_options)
    bare = bare.to(device=env.device, memory_format=env.memory_format)
    if dist_ctx.world > 1 and cfg.sync_bn:
        bare = nn.SyncBatchNorm.convert_sync_batchnorm(bare) if env.device.type == "cuda" else convert_allreduce_bn(bare)
    optimizer = _optimizer(bare, cfg)
    lr_factor = LrFactor(cfg.schedule, steps_per_epoch, cfg.epochs, cfg.milestones, cfg.gamma, cfg.warmup_epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    metrics: list[dict] = []
    start_epoch = 0
    if state is not None:
        bare.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        if len(rngs) != dist_ctx.world:
            warnings.warn(f"checkpoint was written by {len(rngs)} processes, resuming with {dist_ctx.world}: "
                          "the run continues but will not be bit-identical to an uninterrupted one", stacklevel=2)
        run_state.set_rng_state(rngs[dist_ctx.rank % len(rngs)])
        start_epoch = int(state["epoch"])
        metrics = list(state["metrics"])
    elif dist_ctx.world > 1:
        # Same init everywhere (DDP also broadcasts it); different augmentation streams per rank.
        run_state.seed_everything(cfg.seed * 1000 + dist_ctx.rank)

    model: nn.Module = bare
    if dist_ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(bare, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    tracker = RoutingTracker(bare.dynamic_layers(), compiled=cfg.compile)
    if state is None and dist_ctx.main:
        run_state.save_snapshots(bare, cfg, out, 0)
    steps_done = [0]  # optimiser steps taken in this process, for `on_step`

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        train_loader.generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        tracker.reset()
        lr_now = optimizer.param_groups[0]["lr"]
        trained = train_one_epoch(model, bare, train_loader, steps_per_epoch, optimizer, scheduler, cfg, env, epoch,
                                  ckpt_path if state is not None else None, start_epoch, steps_done, on_step)
        test = evaluate(model, test_loader, env, cfg.max_eval_steps, loss=cfg.loss)
        train_skipped = trained.pop("skipped")
        routed = tracker.routed_masks(dist_ctx)
        row = {"epoch": epoch, "lr": lr_now, **trained,
               "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
               "sparsity": layer_sparsity(bare), "never_routed": tracker.never_routed(dist_ctx, routed),
               "seconds": time.perf_counter() - started}
        if cfg.skip_corrupt:  # images of this epoch left out because they could not be decoded
            row["skipped_images"] = len(decode_skipped) + train_skipped + test["skipped"]
        metrics.append(row)
        rngs = all_gather_objects(run_state.rng_state(), dist_ctx)
        state = run_state.training_payload(bare, cfg, epoch, optimizer, scheduler, rngs, metrics, routed, identity)
        if dist_ctx.main:
            run_state.save_snapshots(bare, cfg, out, epoch)
            save_atomic(state, ckpt_path)
            run_state.write_metrics(out / "metrics.jsonl", metrics)
            _print_epoch(cfg, row)
        barrier(dist_ctx)
        start_epoch = epoch
    tracker.remove()
    return _finish(out, state, dist_ctx, just_trained=True)


def train_one_epoch(model: nn.Module, bare: nn.Module, loader: DataLoader, steps: int, optimizer, scheduler,
                    cfg: TrainConfig, env: Environment, epoch: int, ckpt_path: Path | None, good_epoch: int,
                    steps_done: list[int], on_step=None) -> dict:
    """One pass over `steps` training batches; returns train_loss (cross-entropy), train_top1 and, for
    models with auxiliary losses, their means (`aux_losses`)."""
    model.train()
    device = env.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    aux_sums: dict[str, torch.Tensor] = {}
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # kept on device: no sync per step
    seen = 0
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True,
               disable=not (env.dist.main and cfg.progress), mininterval=0.5 if sys.stderr.isatty() else 30.0)
    # islice: a capped epoch must not fetch (and consume RNG for) one batch beyond the cap
    for step, (images, labels) in enumerate(itertools.islice(loader, steps), start=1):
        if labels.shape[0] == 0:  # every image of the batch was undecodable and skipped
            bar.update(1)
            continue
        images, labels = env.batch(images, labels)
        with env.autocast():
            logits = model(images)
        loss = training_loss(bare, logits, labels, cfg)
        # A non-finite loss is recorded on the device and looked at every _NAN_CHECK_EVERY steps (and at
        # the epoch's end): reading it every step would stall the GPU pipeline once per step. Nothing
        # is saved before the check, so the last good checkpoint stays either way.
        bad = ~torch.isfinite(loss.total.detach())
        first_bad_step = torch.where(bad & (first_bad_step < 0), step, first_bad_step)
        if step % _NAN_CHECK_EVERY == 0:
            _raise_if_diverged(first_bad_step, env.dist, epoch, steps, bar, ckpt_path, good_epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.cross_entropy.detach().double() * labels.shape[0]
        for name, value in loss.auxiliary.items():
            aux_sums[name] = aux_sums.get(name, 0) + value.detach().double() * labels.shape[0]
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.shape[0]
        bar.update(1)
        steps_done[0] += 1
        if on_step is not None:
            on_step(steps_done[0])
    _raise_if_diverged(first_bad_step, env.dist, epoch, steps, bar, ckpt_path, good_epoch)
    bar.close()
    names = sorted(aux_sums)
    totals = all_reduce(torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64,
                                                                             device=device),
                                     *(aux_sums[n] for n in names)]), env.dist)
    count = max(1.0, totals[2].item())
    # drop_last=True: every step asks for a full batch, so what is missing was skipped as undecodable
    out = {"train_loss": totals[0].item() / count, "train_top1": 100.0 * totals[1].item() / count,
           "skipped": int(steps * (loader.batch_size or 0) * env.dist.world - totals[2].item())}
    if names:
        out["aux_losses"] = {n: totals[3 + i].item() / count for i, n in enumerate(names)}
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: Environment, max_steps: int | None = None,
             loss: str = "cross-entropy") -> dict:
    """The classification loss (`objectives.classification_loss` of kind `loss`), top-1 and top-5 (%) over the
    test loader (summed over DDP ranks), and the number of images `skipped` as undecodable."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, top1, top5, count
    batches = len(loader) if not max_steps else min(len(loader), max_steps)
    asked = min(len(loader.dataset), batches * (loader.batch_size or 1))  # images the batches ask for
    for images, labels in itertools.islice(loader, max_steps or None):
        if labels.shape[0] == 0:
            continue
        images, labels = env.batch(images, labels)
        with env.autocast():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hit = logits.topk(k, dim=1).indices == labels[:, None]
        sums += torch.stack([
            classification_loss(logits, labels, loss, reduction="sum").double(),
            hit[:, 0].sum().double(), hit.any(1).sum().double(),
            torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=env.device),
        ])
    asked = all_reduce(torch.tensor([float(asked)], dtype=torch.float64, device=env.device), env.dist).item()
    sums = all_reduce(sums, env.dist)
    count = max(1.0, sums[3].item())
    return {"loss": sums[0].item() / count, "top1": 100.0 * sums[1].item() / count,
            "top5": 100.0 * sums[2].item() / count, "skipped": int(asked - sums[3].item())}


# ----------------------------------------------------------------------------------------------
# Set-up helpers


def _environment(cfg: TrainConfig, dist_ctx: DistContext) -> Environment:
    """Pick the device, set threads and determinism, seed everything."""
    name = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):  # available: _check_before_start made sure
        device = torch.device("cuda", dist_ctx.local_rank) if dist_ctx.world > 1 else torch.device(name)
        torch.backends.cudnn.benchmark = not cfg.deterministic
    else:
        device = torch.device(name)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist_ctx.world))
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    run_state.seed_everything(cfg.seed)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return Environment(device=device, amp=cfg.amp, memory_format=memory_format, dist=dist_ctx)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser: SGD with momentum (the paper's) or Adam (CoDA-Nets'), coupled weight decay."""
    groups = _parameter_groups(model, cfg)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """All parameters at the recipe's weight decay, the final layer at `head_weight_decay` when set."""
    if cfg.head_weight_decay is None:
        return [{"params": list(model.parameters())}]
    if not isinstance(getattr(model, "head", None), nn.Module):
        raise ValueError(f"--head-weight-decay needs a model with a final linear layer `head`; "
                         f"{type(model).__name__} has none: leave it unset")
    head = {id(p) for p in model.head.parameters()}
    return [{"params": [p for p in model.parameters() if id(p) not in head]},
            {"params": list(model.head.parameters()), "weight_decay": cfg.head_weight_decay}]


def _dataset_of(obj):
    return obj.dataset if isinstance(obj, DataLoader) else obj


def make_loaders(bundle, cfg: TrainConfig, env: Environment, per_rank_batch: int):
    """(train loader, its sampler, test loader) for this rank, in a data order fixed by (seed, epoch)."""
    train_ds, test_ds = _dataset_of(bundle.train), _dataset_of(bundle.test)
    extra = {}
    for key in ("collate_fn", "worker_init_fn"):
        value = getattr(bundle.train, key, None) if isinstance(bundle.train, DataLoader) else None
        if value is not None:
            extra[key] = value
    cuda = env.device.type == "cuda"
    workers = cfg.workers if cfg.workers is not None else (min(8, os.cpu_count() or 1) if cuda else 0)
    common = dict(num_workers=workers, pin_memory=cuda, persistent_workers=False, **extra)
    # A seeded sampler also with one process: the data order is a function of (seed, epoch) only.
    sampler = DistributedSampler(train_ds, num_replicas=env.dist.world, rank=env.dist.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    train = DataLoader(train_ds, batch_size=per_rank_batch, sampler=sampler, drop_last=True, **common)
    test_part = Subset(test_ds, range(env.dist.rank, len(test_ds), env.dist.world))
    test = DataLoader(test_part, batch_size=max(per_rank_batch, 64), shuffle=False, **common)
    return train, sampler, test


def _raise_if_diverged(first_bad_step: torch.Tensor, dist_ctx: DistContext, epoch: int, steps_per_epoch: int, bar,
                       ckpt_path: Path | None, good_epoch: int) -> None:
    """FloatingPointError naming the epoch and first step whose loss was not finite (on any rank)."""
    diverged = all_reduce((first_bad_step >= 0).to(torch.float32).reshape(1), dist_ctx, op="max")
    if diverged.item() == 0:
        return
    bar.close()
    step = int(first_bad_step.item())
    where = f"step {step}/{steps_per_epoch}" if step >= 0 else "a step on another rank"
    kept = (f"the last good checkpoint ({ckpt_path}, epoch {good_epoch}) is kept" if ckpt_path is not None
            else "no checkpoint had been written yet")
    raise FloatingPointError(
        f"non-finite training loss at epoch {epoch} {where}; {kept} — lower --lr or check the input data")


def _print_epoch(cfg: TrainConfig, row: dict) -> None:
    skipped = f" | skipped {row['skipped_images']} undecodable" if row.get("skipped_images") else ""
    print(f"[{cfg.model}] epoch {row['epoch']}/{cfg.epochs} lr {row['lr']:.4g} train loss {row['train_loss']:.4f} "
          f"top1 {row['train_top1']:.2f} | test loss {row['test_loss']:.4f} top1 {row['test_top1']:.2f} "
          f"top5 {row['test_top5']:.2f} | {row['seconds']:.1f}s{skipped}", flush=True)


def _decode_skipped(bundle) -> list[str]:
    """Files the datasets left out when decoding (in-memory datasets built with skip_corrupt)."""
    return [path for part in (bundle.train, bundle.test) for path in getattr(_dataset_of(part), "skipped", [])]


def _check_same_data(stored: dict, now: dict, cfg: TrainConfig, ckpt_path: Path) -> None:
    """A resume must continue on the data the run started on: ValueError naming what differs."""
    differences = identity_differences(stored, now)
    if differences:
        raise ValueError(
            f"{ckpt_path} was trained on other data than {cfg.data} at {cfg.data_root} holds now — "
            f"{'; '.join(differences)} (the run started from {stored.get('root')}). Resume with the data it was "
            "trained on, or choose another --out to train on this data from scratch")


def _finish(out: Path, state: dict, dist_ctx: DistContext, just_trained: bool) -> RunResult:
    """Write `final.pt` from the state just finished (or check the stored one) and the metrics file.

    A finished run that is asked for again returns its stored result: `final.pt` is rewritten only when
    it is missing or belongs to another configuration, `metrics.jsonl` only when its content differs,
    so a finished run in a read-only folder still returns.
    """
    final = out / "final.pt"
    if dist_ctx.main:
        stale = just_trained or not final.exists()
        if not stale:
            stale = load_checkpoint(final).get("fingerprint") != state.get("fingerprint")
        if stale:
            save_atomic(run_state.final_payload(state), final)
        run_state.write_metrics(out / "metrics.jsonl", state["metrics"])
    barrier(dist_ctx)
    return RunResult(out_dir=out, metrics=list(state["metrics"]), final_path=final)
