"""Saving and loading checkpoints: atomic writes, `weights_only=True` loads, the authors' layout.

WHY a module of its own: every consumer (training, dissection, explanations, notebooks) loads the
same files, and two rules must hold everywhere — a file is either complete or absent (a kill during
`torch.save` must never leave a truncated `checkpoint.pt` behind), and nothing is unpickled beyond
tensors and plain containers (`weights_only=True`), so a checkpoint from elsewhere cannot run code.

File kinds written by `dka.train` (see the run-directory layout in the brief):
- model-only (`final.pt`, `checkpoint_epochEEE.pt`): ``{"build_kwargs": {...}, "state_dict": {...},
  "epoch": int}`` — `dka.models.load_model` rebuilds the network with `dka.models.build(**build_kwargs)`.
- full training state (`checkpoint.pt`): the same keys plus optimiser, scheduler, RNG states, metrics
  (so `load_model` reads it too).

This module reads and writes files only; it never imports the model registry (`dka.models` imports it).
- head snapshots (`head_epochEEE.pt`): ``{"epoch", "layer", "weight", "bias"}``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dka.atomic import atomic_write

__all__ = ["save_atomic", "load_checkpoint", "model_payload", "model_only", "unwrap_model", "strip_wrapper_prefixes",
           "convert_authors_state_dict", "MODEL_KEYS"]

MODEL_KEYS = ("build_kwargs", "state_dict", "epoch")

# Prefixes that wrappers add in front of every parameter name: nn.DataParallel / DDP (`module.`)
# and torch.compile (`_orig_mod.`). A state_dict meant for a bare DKAResNet has neither.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` to a temp file in the same directory, fsync, then `os.replace` onto `path`.

    `os.replace` is atomic on POSIX within one filesystem, so readers (and a resumed run) see the old
    file or the new one, never a partial write.
    """
    with atomic_write(path, "wb", fsync=True) as handle:
        torch.save(obj, handle)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load any dka checkpoint file with `weights_only=True` (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; train one with `python -m dka train ... --out DIR` "
            "(it writes DIR/final.pt) or pass the path of an existing .pt file"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        if _refused_object(err):
            raise RuntimeError(
                f"could not load {path} with weights_only=True ({err}); dka only reads checkpoints "
                "holding tensors and plain containers — re-save it as a state_dict"
            ) from err
        raise RuntimeError(
            f"{path} is truncated or is not a PyTorch checkpoint ({path.stat().st_size} bytes; "
            f"{type(err).__name__}: {_first_sentence(err)}). dka "
            "writes checkpoints atomically, so a cut file comes from a copy, a download or a full disk: copy it "
            "again, or delete it and re-run the command that wrote it (a training run without checkpoint.pt "
            "starts from scratch)"
        ) from err


def _first_sentence(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text.split(". ", 1)[0].rstrip(".") if text else "unexpected end of file"


def _refused_object(err: Exception) -> bool:
    """Whether torch.load refused a pickled object that is not a tensor or plain container."""
    text = str(err)
    return isinstance(err, pickle.UnpicklingError) and ("allowed global" in text or "Unsupported global" in text)


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


def model_payload(model: torch.nn.Module, epoch: int | None = None, **extra: Any) -> dict:
    """The one checkpoint payload: ``{"build_kwargs", "state_dict", "epoch", **extra}``.

    `model` is unwrapped from DDP / torch.compile first and its tensors copied to the CPU. Training adds
    its resumable state through `extra` (optimiser, scheduler, RNG states, metrics); `model_only` cuts a
    payload back to the part `dka.models.load_model` reads.
    """
    bare = unwrap_model(model)
    if not hasattr(bare, "build_kwargs"):
        raise TypeError("model_payload needs a dka.models network (it has no `build_kwargs` to rebuild it)")
    state = {k: v.detach().cpu().clone() for k, v in bare.state_dict().items()}
    return {"build_kwargs": dict(bare.build_kwargs), "state_dict": state, "epoch": epoch, **extra}


def model_only(payload: Mapping[str, Any]) -> dict:
    """The model part of a payload (what final.pt and checkpoint_epochEEE.pt hold)."""
    return {key: payload[key] for key in MODEL_KEYS}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def convert_authors_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Map the authors' checkpoint layout (sunyiyou/dynamic-k-activation) onto dka's DKAResNet names.

    Their training script wraps the model in nn.DataParallel and saves ``{"epoch", "best_prec1",
    "state_dict"}``; keys therefore start with ``module.``. The backbone uses torchvision's names
    (conv1, bn1, layer1..4, downsample.0/1), which dka keeps; the final layer is ``rfc`` (their
    `RouteFcMaxAct`, Places365 models) or ``fc`` (plain and CIFAR models) and becomes ``head``.
    Accepts either the bare state_dict or the whole saved dict (with a ``state_dict`` entry).

    Usage::

        raw = torch.load("resnet18_fc_ma_t5.pth", map_location="cpu", weights_only=True)
        model = dka.models.build("res18-d5a", 365, stem="imagenet")
        model.load_state_dict(convert_authors_state_dict(raw))
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    converted = {}
    for key, value in strip_wrapper_prefixes(state_dict).items():
        for old in ("rfc.", "fc."):
            if key.startswith(old):
                key = "head." + key[len(old):]
                break
        if key in converted:
            raise ValueError(f"two entries of the authors' state_dict map to {key!r}; is it a mixed checkpoint?")
        converted[key] = value
    return converted
