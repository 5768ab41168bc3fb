"""Rebuilding a registry model from a checkpoint file.

Checkpoint I/O (`dka.checkpoint`) knows nothing about the registry: it reads files. This module joins
the two — the payload's ``build_kwargs`` go to `build`, its ``state_dict`` into the new network.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from dka.checkpoint import load_checkpoint, strip_wrapper_prefixes
from dka.models._registry import build

__all__ = ["load_model"]


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Rebuild a dka model from a checkpoint written by `python -m dka train` and load its weights.

    Args:
        path: ``final.pt``, ``checkpoint_epochEEE.pt`` or the resumable ``checkpoint.pt`` of a run.
        map_location: where the weights (and the returned model) go, e.g. "cpu" or "cuda".

    Returns:
        The model in eval mode.
    """
    payload = load_checkpoint(path, map_location=map_location)
    state = payload.get("state_dict") if isinstance(payload, Mapping) else None
    if state is None or "build_kwargs" not in payload:
        raise ValueError(
            f"{path} is not a dka model checkpoint (needs keys 'build_kwargs' and 'state_dict'); for the "
            "authors' released weights use dka.checkpoint.convert_authors_state_dict and model.load_state_dict"
        )
    model = build(**payload["build_kwargs"])
    model.load_state_dict(strip_wrapper_prefixes(state))
    if map_location is not None and not callable(map_location) and not isinstance(map_location, Mapping):
        model = model.to(map_location)
    return model.eval()
