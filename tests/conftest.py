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
