"""Scratch folders of the generator, named after their owner so that a later run can clean up after a kill.

An export is written into a sibling folder (same filesystem, so the finished export is renamed into
place atomically); a folder left by a killed run holds thousands of files. Its name carries the owner's
host, process id and process start time: a later run for the same output removes it only when that
process provably no longer exists (same host, and the pid is gone or now belongs to a process started at
another time). Folders named by older versions (`.<name>.tmp-<pid>-<hash>`, `.<name>.old-<pid>`) carry
only the pid: they are removed when no process with that pid runs on this host. Pool workers are tied to
their parent so that none outlives a killed generator.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import signal
import socket
import sys
from pathlib import Path

__all__ = ["scratch_dir", "remove_stale", "owner_alive", "die_with_parent"]

_KINDS = ("tmp", "old")
_UNKNOWN = "x"  # start time where /proc is not available
_LEGACY = {"tmp": re.compile(r"(\d+)-[0-9a-f]{16}"), "old": re.compile(r"(\d+)")}  # after ".<name>.<kind>-"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), or _UNKNOWN."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return _UNKNOWN
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 (state) onwards
    return fields[19] if len(fields) > 19 else _UNKNOWN


def scratch_dir(out: Path, kind: str) -> Path:
    """`.<name>.<kind>-<host>-<pid>-<start>` beside `out`, owned by this process."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    pid = os.getpid()
    return out.parent / f".{out.name}.{kind}-{_host()}-{pid}-{_start_time(pid)}"


def owner_alive(host: str, pid: int, start: str) -> bool:
    """False only when the owner provably no longer runs; True when it does or this cannot be told."""
    if host != _host():
        return True  # another machine sharing the filesystem: nothing can be proved from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    now = _start_time(pid)
    return start == _UNKNOWN or now == _UNKNOWN or now == start


def remove_stale(out: Path) -> list[Path]:
    """Remove the scratch folders of `out` whose owner process is dead; the removed paths."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in _KINDS:
        prefix = f".{out.name}.{kind}-"
        for path in out.parent.glob(f"{glob.escape(prefix)}*"):
            if not path.is_dir():
                continue
            rest = path.name[len(prefix):]
            legacy = _LEGACY[kind].fullmatch(rest)
            parts = rest.rsplit("-", 2)
            if legacy is not None:  # an older dka's folder: its pid is all there is to go by
                owner = (_host(), int(legacy.group(1)), _UNKNOWN)
            elif len(parts) == 3 and parts[1].isdigit():
                owner = (parts[0], int(parts[1]), parts[2])
            else:
                continue  # not ours
            if not owner_alive(*owner):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def die_with_parent(parent_pid: int) -> None:
    """In a worker process: be killed when the parent dies (Linux), and exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            pass
    if os.getppid() != parent_pid:
        os._exit(1)
