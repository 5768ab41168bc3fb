"""What a run leaves on disk and reads back: checkpoints, snapshots, metrics, RNG states.

Resume must reproduce an uninterrupted run bit for bit (on CPU in deterministic mode): `checkpoint.pt`
carries model, optimiser, scheduler, all RNG states and the metrics history, written atomically;
`metrics.jsonl` is regenerated from it, so a kill between the two writes cannot duplicate or lose a
line. Every payload is built by `dka.checkpoint.model_payload` (one builder): `checkpoint.pt` adds the
training state to it, `final.pt` and the per-epoch snapshots keep the model part.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dka.atomic import atomic_write
from dka.checkpoint import model_only, model_payload, save_atomic, unwrap_model
from dka.train.config import TrainConfig, plain

__all__ = ["rng_state", "set_rng_state", "seed_everything", "check_fingerprint", "write_metrics",
           "save_snapshots", "training_payload", "final_payload"]


def rng_state() -> dict:
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


def set_rng_state(state: dict) -> None:
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def check_fingerprint(state: dict, cfg: TrainConfig, path: Path) -> None:
    if cfg.matches_fingerprint(state.get("fingerprint")):
        return
    stored = state.get("config", {})
    mine = cfg.fingerprint_fields()
    diff = {k: (stored.get(k), mine[k]) for k in mine if plain(stored.get(k)) != mine[k]}
    raise ValueError(
        f"{path} belongs to a run with a different configuration (stored vs requested: {diff}); "
        "re-run with the original settings to resume it, or choose another --out directory"
    )


def write_metrics(path: Path, metrics: list[dict]) -> None:
    """`metrics.jsonl`, one JSON line per epoch; left untouched when it already holds exactly this."""
    text = "".join(json.dumps(row) + "\n" for row in metrics)
    if path.is_file() and path.read_text() == text:
        return
    with atomic_write(path, fsync=True) as handle:
        handle.write(text)


def _head_payload(model: nn.Module, epoch: int) -> dict:
    head = unwrap_model(model).head
    return {
        "epoch": epoch, "layer": "head",
        "weight": head.weight.detach().cpu().clone(),
        "bias": None if head.bias is None else head.bias.detach().cpu().clone(),
    }


def save_snapshots(model, cfg: TrainConfig, out: Path, epoch: int) -> None:
    """The epoch's `head_epochEEE.pt` (models with a linear `head` only) and `checkpoint_epochEEE.pt`."""
    head = getattr(unwrap_model(model), "head", None)
    if epoch in cfg.save_head_epochs and isinstance(getattr(head, "weight", None), torch.Tensor):
        save_atomic(_head_payload(model, epoch), out / f"head_epoch{epoch:03d}.pt")
    if epoch in cfg.save_checkpoint_epochs:
        save_atomic(model_payload(model, epoch), out / f"checkpoint_epoch{epoch:03d}.pt")


def training_payload(model: nn.Module, cfg: TrainConfig, epoch: int, optimizer, scheduler, rngs: list,
                     metrics: list[dict], routed: dict[str, torch.Tensor], dataset: dict | None = None) -> dict:
    """`checkpoint.pt`: the model payload plus everything an exact resume needs, and the identity of the
    data it trains on (`dka.data.identity`), which a resume compares.

    `routed` (layer -> bool (out, in) mask of the weights selected during the epoch) is kept so analyses
    can use the weights that actually route (zeroing the others changes no logit of the training images).
    """
    return model_payload(model, epoch, fingerprint=cfg.fingerprint(), config=plain(vars(cfg)),
                         optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rngs,
                         metrics=metrics, routed=routed, dataset=dataset)


def final_payload(state: dict) -> dict:
    """`final.pt`: the model part of the last training state, the config and the data it was trained with,
    and the routing masks of its last epoch."""
    return {**model_only(state), "fingerprint": state["fingerprint"], "config": state["config"],
            "routed": state.get("routed", {}), "dataset": state.get("dataset")}
