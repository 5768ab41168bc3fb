"""Atomic writes: the target is complete or untouched."""

import os

import pytest

from dka.atomic import atomic_write, write_text


def test_replaces_the_target_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    write_text(target, "one")
    write_text(target, "two")
    assert target.read_text() == "two"
    assert os.listdir(target.parent) == ["a.txt"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)


def test_an_error_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.bin"
    with atomic_write(target, "wb", fsync=True) as fh:
        fh.write(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "wb") as fh:
            fh.write(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(target, "a"):
            pass
