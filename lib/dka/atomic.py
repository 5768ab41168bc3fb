"""Files are complete or absent: write beside the target, then `os.replace` onto it.

`os.replace` is atomic within one filesystem, so a reader (or a resumed run) sees the old file or
the new one, never a half-written checkpoint, tally, table, figure or report. Every writer in dka
goes through `atomic_write`. A writer killed mid-write (SIGKILL runs no cleanup) leaves its temp file;
`remove_stale_temps` deletes those at the next start of the command, which holds the directory's lock
(`dka.dirlock`), so no live writer's file is touched.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "write_text", "remove_stale_temps"]

# What `atomic_write` names its temp files: mkstemp(prefix=".<name>.", suffix=".tmp") adds 8 characters.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, fsync: bool = False, newline: str | None = None):
    """Open a temp file next to `path` for writing; on success it replaces `path`, on error it is removed.

    `mode` is "w" (UTF-8 text) or "wb"; `fsync=True` also flushes the data to disk before the rename
    (checkpoints, which must survive a power cut, not just a kill). The file gets the usual
    permissions (mkstemp's 0600 would surprise readers of committed results).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb'; got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    text = {"encoding": "utf-8", "newline": newline} if mode == "w" else {}
    try:
        with os.fdopen(fd, mode, **text) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically and return the path."""
    with atomic_write(path) as handle:
        handle.write(text)
    return Path(path)


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files `atomic_write` left in `directory` (not below it); returns what was deleted.

    Call it only while no other process writes there (hold `dka.dirlock.exclusive(directory)`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        if _TEMP_NAME.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
