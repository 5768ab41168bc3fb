"""Downloading the real datasets for users online: verified, resumable-by-restart, never half-written.

Every archive is fetched to `<name>.part`, checked against its published checksum where one exists (the
sha256 is printed either way, so a user can pin it) and only then renamed; extraction goes to a temporary
directory that is renamed into place, refusing members that would escape it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.request
import zipfile
from pathlib import Path

__all__ = ["download_cifar10", "download_places365", "download_broden", "fetch", "extract", "verify",
           "file_digest", "ChecksumError", "BRODEN_URL", "PLACES365_EASY_URL"]

BRODEN_URL = "http://netdissect.csail.mit.edu/data/broden1_224.zip"
PLACES365_EASY_URL = "http://data.csail.mit.edu/places/places365/places365standard_easyformat.tar"
# Published checksums (algorithm, hex digest); None where the source publishes none.
CHECKSUMS: dict[str, tuple[str, str] | None] = {BRODEN_URL: None, PLACES365_EASY_URL: None}


class ChecksumError(ValueError):
    """A downloaded file whose digest differs from the published one."""


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str | os.PathLike, expected: tuple[str, str] | None) -> str:
    """sha256 of `path`; raises ChecksumError naming the file when `expected` (algorithm, digest) differs."""
    if expected is not None:
        algorithm, digest = expected
        got = file_digest(path, algorithm)
        if got.lower() != digest.lower():
            raise ChecksumError(f"{path}: {algorithm} is {got}, expected {digest}; the download is corrupt or "
                                "incomplete — delete it and download again")
    return file_digest(path, "sha256")


def fetch(url: str, dest: str | os.PathLike, expected: tuple[str, str] | None = None, progress: bool = True) -> Path:
    """Download `url` to `dest` (skipped when `dest` exists and verifies)."""
    from dka.progress import tqdm

    dest = Path(dest)
    if dest.is_file():
        verify(dest, expected)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
        sha256 = verify(part, expected)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    if expected is None:
        print(f"{dest.name}: no published checksum; sha256 {sha256}")
    return dest


def _safe_members(names: list[str], target: Path) -> None:
    base = target.resolve()
    for name in names:
        resolved = (target / name).resolve()
        if resolved != base and base not in resolved.parents:
            raise ValueError(f"archive member {name!r} would be written outside {target}; refusing to extract")


def extract(archive: str | os.PathLike, into: str | os.PathLike) -> Path:
    """Extract a .zip or .tar(.gz) archive into `into` via a temporary sibling directory."""
    archive, into = Path(archive), Path(into)
    tmp = into.parent / f".{into.name}.extract-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                _safe_members(z.namelist(), tmp)
                z.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                members = t.getmembers()
                _safe_members([m.name for m in members], tmp)
                bad = [m.name for m in members if m.issym() or m.islnk()]
                if bad:
                    raise ValueError(f"archive {archive} holds links ({bad[:3]}); refusing to extract")
                t.extractall(tmp)
        else:
            raise ValueError(f"{archive} is neither a zip nor a tar archive")
        into.mkdir(parents=True, exist_ok=True)
        for entry in tmp.iterdir():
            target = into / entry.name
            if target.exists():
                raise FileExistsError(f"{target} already exists; remove it to extract {archive} again")
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return into


def download_broden(root: str | os.PathLike, url: str = BRODEN_URL, progress: bool = True) -> Path:
    """broden1_224 (~1 GB) into root/broden1_224."""
    root = Path(root)
    if (root / "broden1_224" / "index.csv").is_file():
        return root / "broden1_224"
    archive = fetch(url, root / "broden1_224.zip", CHECKSUMS.get(url), progress)
    extract(archive, root)
    if not (root / "broden1_224" / "index.csv").is_file():
        raise FileNotFoundError(f"{archive} did not contain broden1_224/index.csv")
    archive.unlink()
    return root / "broden1_224"


def download_places365(root: str | os.PathLike, fmt: str = "torchvision", url: str = PLACES365_EASY_URL,
                       progress: bool = True) -> Path:
    """Places365-standard 256 px images: torchvision's layout (md5-verified by torchvision) or the easy format."""
    root = Path(root)
    if fmt == "torchvision":
        from dka._compat import torchvision

        for split in ("train-standard", "val"):
            torchvision.datasets.Places365(str(root), split=split, small=True, download=True)
        return root
    if fmt != "easy":
        raise ValueError(f"Places365 format must be 'torchvision' or 'easy', got {fmt!r}")
    if (root / "places365_standard" / "train").is_dir():
        return root / "places365_standard"
    archive = fetch(url, root / Path(url).name, CHECKSUMS.get(url), progress)
    extract(archive, root)
    archive.unlink()
    return root / "places365_standard"


def download_cifar10(root: str | os.PathLike) -> Path:
    """torchvision's CIFAR-10 (md5-verified by torchvision) into root/cifar-10-batches-py."""
    from dka._compat import torchvision

    for train in (True, False):
        torchvision.datasets.CIFAR10(str(root), train=train, download=True)
    return Path(root)
