"""Downloading the real datasets for users online: verified, resumable, never half-written.

Every archive goes through `fetch`: an HTTP transfer into `<name>.part` with a progress bar, resumed with a
Range request when a previous transfer was cut (the part is kept for that), checked against the archive's
known checksum (`CHECKSUMS`: torchvision's recorded md5s for CIFAR-10 and Places365) and only then renamed;
a checksum mismatch removes the part. The sha256 of what arrived is printed when no checksum is known, so
a user can pin it. Extraction goes to a temporary directory that is renamed into place, refusing members
that would escape it. A call whose dataset is already in place does nothing. A transfer that fails (e.g.
offline) raises `DownloadError`, which the command line prints as one line.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import NamedTuple

__all__ = ["download_cifar10", "download_places365", "download_broden", "fetch", "extract", "verify",
           "file_digest", "Checksum", "CHECKSUMS", "ChecksumError", "DownloadError", "BRODEN_URL",
           "PLACES365_EASY_URL", "PLACES365_URL", "PLACES365_ARCHIVES", "CIFAR10_URL", "CIFAR10_FILES"]

BRODEN_URL = "http://netdissect.csail.mit.edu/data/broden1_224.zip"
PLACES365_URL = "http://data.csail.mit.edu/places/places365/"  # torchvision's base URL for the 256 px archives
PLACES365_EASY_URL = PLACES365_URL + "places365standard_easyformat.tar"
# torchvision's layout: archive -> what it unpacks (the marker that it is in place)
PLACES365_ARCHIVES = {"filelist_places365-standard.tar": "places365_train_standard.txt",
                      "train_256_places365standard.tar": "data_256", "val_256.tar": "val_256"}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FILES = ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
_TORCHVISION_MD5 = "the md5 torchvision records for this archive"


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
    CIFAR10_URL: Checksum("md5", "c58f30108f718f92721af3b95e74349a", _TORCHVISION_MD5),
    PLACES365_URL + "filelist_places365-standard.tar": Checksum("md5", "35a0585fee1fa656440f3ab298f8479c",
                                                                _TORCHVISION_MD5),
    PLACES365_URL + "train_256_places365standard.tar": Checksum("md5", "53ca1c756c3d1e7809517cc47c5561c5",
                                                                _TORCHVISION_MD5),
    PLACES365_URL + "val_256.tar": Checksum("md5", "e27b17d8d44f4af9a78502beb927f808", _TORCHVISION_MD5),
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
    """Append `url`'s bytes to `part`, resuming after the bytes it already holds (HTTP Range)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":  # a local mirror
        try:
            shutil.copyfile(urllib.request.url2pathname(parsed.path), part)
        except OSError as err:
            raise DownloadError(f"cannot copy {url}: {err.strerror or err}") from err
        return
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "dka-download/1",
                                                   **({"Range": f"bytes={have}-"} if have else {})})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing after the bytes we hold: the part is complete
            return
        raise DownloadError(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise DownloadError(f"cannot download {url}: {reason} (offline, or the server is unreachable)") from err
    from dka.progress import tqdm

    with response:
        resumed = response.status == 206
        if not resumed:
            have = 0  # the server sent the whole file: start the part again
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
                   disable=not progress, file=sys.stderr)
        try:
            with open(part, "ab" if resumed else "wb") as f:
                for block in iter(lambda: response.read(1 << 16), b""):
                    f.write(block)
                    bar.update(len(block))
        except (http.client.HTTPException, OSError) as err:
            raise DownloadError(f"the transfer of {url} was cut after {part.stat().st_size:,} bytes ({err}); "
                                f"run the same command again to resume it") from err
        finally:
            bar.close()
    if total is not None and part.stat().st_size < total:
        raise DownloadError(f"the transfer of {url} was cut after {part.stat().st_size:,} of {total:,} bytes; run "
                            "the same command again to resume it")


def fetch(url: str, dest: str | os.PathLike, expected: Checksum | tuple[str, str] | None = None,
          progress: bool = True) -> Path:
    """Download `url` to `dest` (skipped when `dest` exists and verifies); returns `dest`.

    A cut transfer leaves `<dest>.part`, which the next call resumes; a part whose checksum is wrong is
    removed (ChecksumError)."""
    dest = Path(dest)
    if dest.is_file():
        verify(dest, expected)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _transfer(url, part, progress)
    try:
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
                       progress: bool = True, *, checksum: bool = True, base_url: str = PLACES365_URL) -> Path:
    """Places365-standard 256 px images: torchvision's layout (file lists, data_256/, val_256/; md5s as
    torchvision records them) or the easy format (places365_standard/train/<class>/, val/<class>/)."""
    root = Path(root)
    if fmt == "torchvision":
        for name, marker in PLACES365_ARCHIVES.items():
            if (root / marker).exists():
                continue
            archive = fetch(base_url + name, root / name, CHECKSUMS.get(PLACES365_URL + name) if checksum else None,
                            progress)
            extract(archive, root)
            if not (root / marker).exists():
                raise FileNotFoundError(f"{archive} did not contain {marker}")
            archive.unlink()
        return root
    if fmt != "easy":
        raise ValueError(f"Places365 format must be 'torchvision' or 'easy', got {fmt!r}")
    if (root / "places365_standard" / "train").is_dir():
        return root / "places365_standard"
    archive = fetch(url, root / Path(url).name, CHECKSUMS.get(url) if checksum else None, progress)
    extract(archive, root)
    archive.unlink()
    return root / "places365_standard"


def download_cifar10(root: str | os.PathLike, url: str = CIFAR10_URL, progress: bool = True, *,
                     checksum: bool = True) -> Path:
    """torchvision's CIFAR-10 layout, root/cifar-10-batches-py (the archive md5-verified)."""
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    if all((folder / name).is_file() for name in CIFAR10_FILES):
        return root
    if folder.exists():
        raise FileExistsError(f"{folder} is incomplete (it lacks some of {', '.join(CIFAR10_FILES)}); remove it "
                              "and download again")
    archive = fetch(url, root / Path(urllib.parse.urlparse(url).path).name,
                    CHECKSUMS.get(CIFAR10_URL) if checksum else None, progress)
    extract(archive, root)
    missing = [name for name in CIFAR10_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{archive} did not contain cifar-10-batches-py/{missing[0]}")
    archive.unlink()
    return root
