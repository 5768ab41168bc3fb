"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $DKA_SHARED_DATA); tests that need it skip cleanly where it is absent."""
    path = Path(os.environ.get("DKA_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set DKA_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Two xdist workers share 2 cores: more intra-op threads only spin (convs measured 80x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
