"""One writer per output directory: an exclusive lock that names its holder and leaves nothing behind.

Two processes training into one run directory both exit 0 and leave a mix (`final.pt` from one,
`checkpoint.pt` and `metrics.jsonl` from the other). `exclusive(directory)` takes an advisory `flock` on
`<directory>/.dka.lock`, so a second writer fails at once with the holder's PID and command. The kernel
drops the lock when its holder dies, even by SIGKILL, so a crashed run never blocks the next one, and
the lock file is removed on release. Holding the lock is also what makes it safe to delete a killed
writer's temp files at the next start (`dka.atomic.remove_stale_temps`).

A directory that cannot be written (a read-only mount of finished runs) is not locked: the caller is
told so and can still read; any write it tries fails on its own. Where `fcntl` is missing (Windows)
nothing is locked and a warning says so. A command that fails before writing anything leaves no empty
output folder behind.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dka.atomic import remove_stale_temps

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["exclusive", "Held", "DirectoryBusy", "LOCK_NAME"]

LOCK_NAME = ".dka.lock"
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class DirectoryBusy(RuntimeError):
    """Another process holds the directory's lock."""


def _holder(fd: int) -> str:
    """The holder's "PID command" line; it is written right after the lock is taken, so wait briefly."""
    for _ in range(20):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown (it has not written its PID yet)"


def _acquire(path: Path, purpose: str) -> int | None:
    """A locked descriptor of `path`, or None when the directory is read-only."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno in _READ_ONLY:
                return None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            pid = holder.split(" ", 1)[0]
            raise DirectoryBusy(
                f"{path.parent} is in use: process {pid} holds its lock ({holder}). Two {purpose}s writing one "
                f"directory would leave a mix of both; wait for process {pid} to finish (or stop it), or choose "
                "another output directory") from None
        # The previous holder unlinks the file on release: if it did so between our open and flock, we
        # hold a lock on a deleted file that a third process would not see. Start again in that case.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@dataclass(frozen=True)
class Held:
    """What `exclusive` yields: whether the lock is held and the temp files a killed writer left (removed)."""

    locked: bool
    removed: tuple[Path, ...] = ()


def _new_folders(path: Path) -> list[Path]:
    """The folders `path.mkdir(parents=True)` would create, innermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


@contextmanager
def exclusive(directory: str | os.PathLike, purpose: str = "run") -> Iterator[Held]:
    """Hold `directory`'s lock for the `with` block, creating the directory.

    Raises DirectoryBusy, naming the holder's PID, when another process holds it. Once held, the temp
    files of a killed writer (`dka.atomic.remove_stale_temps`) are deleted. If the block fails, the
    folders created here are removed again when still empty, so a command that stops on a bad argument
    leaves no empty output folder. A directory that cannot be written is not locked (`Held.locked` is
    False): nothing can be mixed up there, and any write fails on its own.
    """
    directory = Path(directory)
    created = _new_folders(directory)
    done = False
    try:
        with _locked(directory, purpose) as held:
            yield held
        done = True
    finally:
        if not done:
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break


@contextmanager
def _locked(directory: Path, purpose: str) -> Iterator[Held]:
    if fcntl is None:  # pragma: no cover - Windows
        warnings.warn(f"no fcntl on {sys.platform}: {directory} is not locked against a second writer",
                      RuntimeWarning, stacklevel=4)
        directory.mkdir(parents=True, exist_ok=True)
        yield Held(False)
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno not in _READ_ONLY or not directory.is_dir():
            raise
    path = directory / LOCK_NAME
    fd = _acquire(path, purpose)
    if fd is None:
        yield Held(False)
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {' '.join(sys.argv)[:300]}\n".encode())
        yield Held(True, tuple(remove_stale_temps(directory)))
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        os.close(fd)  # releases the flock
