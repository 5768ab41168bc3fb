"""Downloading the real datasets for users online: verified, resumable-by-restart, never half-written.

Transfers go through torchvision's `download_url` (redirects, a user agent servers accept) into
`<name>.part`, which is checked against the archive's known checksum (`CHECKSUMS`; md5 through
torchvision's `calculate_md5`) and only then renamed; the sha256 of what arrived is printed so a user can
pin it. Extraction goes to a temporary directory that is renamed into place, refusing members that would
escape it. CIFAR-10 and Places365 in torchvision's layout use torchvision's own downloaders, which check
the md5s torchvision records. A transfer that fails (e.g. offline) raises `DownloadError`, which the
command line prints as one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import NamedTuple

__all__ = ["download_cifar10", "download_places365", "download_broden", "fetch", "extract", "verify",
           "file_digest", "Checksum", "CHECKSUMS", "ChecksumError", "DownloadError", "BRODEN_URL",
           "PLACES365_EASY_URL"]

BRODEN_URL = "http://netdissect.csail.mit.edu/data/broden1_224.zip"
PLACES365_EASY_URL = "http://data.csail.mit.edu/places/places365/places365standard_easyformat.tar"


class Checksum(NamedTuple):
    """An archive's expected digest and where the value comes from (shown when a download differs)."""

    algorithm: str  # "md5" or "sha256"
    digest: str
    source: str = ""


# What is known of each archive (None: nothing; the sha256 of a download is printed for pinning).
CHECKSUMS: dict[str, Checksum | tuple[str, str] | None] = {
    # Not published by Broden's authors (NetDissect's scripts check nothing); this md5 is the one a
    # third-party setup script checks for the same URL. Not verified here: no copy can be downloaded.
    BRODEN_URL: Checksum("md5", "be13c292eaef3300da03f8d0e48eab1c",
                         "a third-party setup script's value (Broden's authors publish none)"),
    # The Places365 site publishes no checksum for the easy-format archive (~24 GB).
    PLACES365_EASY_URL: None,
}


class ChecksumError(ValueError):
    """A downloaded file whose digest differs from the expected one."""


class DownloadError(OSError):
    """A transfer that failed (no network, unknown host, HTTP error); the message is one line."""


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks (md5 through torchvision's `calculate_md5`)."""
    if algorithm == "md5":
        from dka._compat import torchvision  # noqa: F401  (torchvision.datasets.utils needs the shim first)
        from torchvision.datasets.utils import calculate_md5

        return calculate_md5(path)
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str | os.PathLike, expected: Checksum | tuple[str, str] | None) -> str:
    """sha256 of `path`; raises ChecksumError naming the file when the `expected` digest differs."""
    if expected is not None:
        algorithm, digest = expected[0], expected[1]
        got = file_digest(path, algorithm)
        if got.lower() != digest.lower():
            source = f" (expected value: {expected[2]})" if len(expected) > 2 and expected[2] else ""
            raise ChecksumError(f"{path}: {algorithm} is {got}, expected {digest}{source}; the download is "
                                "corrupt or incomplete — delete it and download again")
        if algorithm == "sha256":
            return got
    return file_digest(path, "sha256")


def _transfer(url: str, part: Path, progress: bool) -> None:
    from dka._compat import torchvision  # noqa: F401
    from torchvision.datasets.utils import download_url

    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":  # a local mirror (torchvision's downloader handles network URLs only)
        try:
            shutil.copyfile(urllib.request.url2pathname(parsed.path), part)
        except OSError as err:
            raise DownloadError(f"cannot copy {url}: {err.strerror or err}") from err
        return
    quiet = contextlib.redirect_stderr(io.StringIO()) if not progress else contextlib.nullcontext()
    try:
        with quiet:  # torchvision's bar writes to stderr
            download_url(url, str(part.parent), part.name)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise DownloadError(f"cannot download {url}: {reason} (offline, or the server is unreachable)") from err


def fetch(url: str, dest: str | os.PathLike, expected: Checksum | tuple[str, str] | None = None,
          progress: bool = True) -> Path:
    """Download `url` to `dest` (skipped when `dest` exists and verifies); returns `dest`."""
    dest = Path(dest)
    if dest.is_file():
        verify(dest, expected)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)  # a killed run's leftover: torchvision would take it for a finished download
    try:
        _transfer(url, part, progress)
        sha256 = verify(part, expected)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    if expected is None:
        print(f"{dest.name}: no known checksum; sha256 {sha256}")
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


def download_broden(root: str | os.PathLike, url: str = BRODEN_URL, progress: bool = True, *,
                    checksum: bool = True) -> Path:
    """broden1_224 (~1 GB) into root/broden1_224 (`checksum=False`: accept it without `CHECKSUMS`' value)."""
    root = Path(root)
    if (root / "broden1_224" / "index.csv").is_file():
        return root / "broden1_224"
    archive = fetch(url, root / "broden1_224.zip", CHECKSUMS.get(url) if checksum else None, progress)
    extract(archive, root)
    if not (root / "broden1_224" / "index.csv").is_file():
        raise FileNotFoundError(f"{archive} did not contain broden1_224/index.csv")
    archive.unlink()
    return root / "broden1_224"


def download_places365(root: str | os.PathLike, fmt: str = "torchvision", url: str = PLACES365_EASY_URL,
                       progress: bool = True, *, checksum: bool = True) -> Path:
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
    archive = fetch(url, root / Path(url).name, CHECKSUMS.get(url) if checksum else None, progress)
    extract(archive, root)
    archive.unlink()
    return root / "places365_standard"


def download_cifar10(root: str | os.PathLike) -> Path:
    """torchvision's CIFAR-10 (md5-verified by torchvision) into root/cifar-10-batches-py."""
    from dka._compat import torchvision

    for train in (True, False):
        torchvision.datasets.CIFAR10(str(root), train=train, download=True)
    return Path(root)
