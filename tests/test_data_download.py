"""Download logic on local archives: checksum verification, atomic fetch, safe extraction, the CLI."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from dka.data import download
from dka.cli.data import main as data_main


def _broden_zip(path: Path, extra: dict | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("broden1_224/index.csv", "image,split,ih,iw,sh,sw,color,object,material,part,scene,texture\n")
        z.writestr("broden1_224/category.csv", "name,first,last,count,frequency\n")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


def test_verified_download_and_extraction(tmp_path, monkeypatch):
    archive = _broden_zip(tmp_path / "src.zip")
    url = archive.as_uri()
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(download.CHECKSUMS, url, ("sha256", "0" * 64))
    with pytest.raises(download.ChecksumError, match=r"broden1_224.zip.part: sha256 is .* expected 0000"):
        download.download_broden(tmp_path / "root", url=url, progress=False)
    assert not list((tmp_path / "root").glob("*.part")) and not (tmp_path / "root" / "broden1_224").exists()
    monkeypatch.setitem(download.CHECKSUMS, url, ("sha256", sha))
    out = download.download_broden(tmp_path / "root", url=url, progress=False)
    assert (out / "index.csv").is_file() and not (tmp_path / "root" / "broden1_224.zip").exists()
    assert download.download_broden(tmp_path / "root", url="file:///nonexistent") == out  # already there


def test_unsafe_archives_are_refused(tmp_path):
    archive = _broden_zip(tmp_path / "evil.zip", {"../escaped.txt": "x"})
    with pytest.raises(ValueError, match="outside"):
        download.extract(archive, tmp_path / "into")
    assert not (tmp_path / "escaped.txt").exists()
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        download.extract(tmp_path / "plain.txt", tmp_path / "into2")


def test_cli_generates_scenes(tmp_path, capsys):
    from dka.cli import main as dka_main

    assert dka_main(["data", "scenes", "--preset", "smoke", "--out", str(tmp_path / "s"), "--processes", "1"]) == 0
    assert (tmp_path / "s" / "class_concepts.csv").is_file()
    assert str(tmp_path / "s") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        data_main(["download", "mnist", "--root", str(tmp_path)])


def test_md5_checksums_and_a_stale_part_file(tmp_path, monkeypatch):
    archive = _broden_zip(tmp_path / "src.zip")
    url = archive.as_uri()
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    root = tmp_path / "root"
    root.mkdir()
    (root / "broden1_224.zip.part").write_bytes(b"left by a killed download")  # must not pass for the archive
    monkeypatch.setitem(download.CHECKSUMS, url, download.Checksum("md5", md5, "test"))
    assert (download.download_broden(root, url=url, progress=False) / "index.csv").is_file()
    assert not list(root.glob("*.part"))
    wrong = download.Checksum("md5", "0" * 32, "where the value was published")
    with pytest.raises(download.ChecksumError, match="expected value: where the value was published"):
        download.verify(archive, wrong)
    assert download.verify(archive, None) == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert download.CHECKSUMS[download.BRODEN_URL].algorithm == "md5"  # the known value is recorded


def test_offline_download_fails_in_one_line(tmp_path, monkeypatch, capsys):
    # nothing listens on the discard port of the loopback address: the connection is refused, as offline
    unreachable = "http://127.0.0.1:9/broden1_224.zip"
    real = download.download_broden
    monkeypatch.setattr(download, "download_broden",
                        lambda root, **kw: real(root, url=unreachable, progress=False, **kw))
    assert data_main(["download", "broden", "--root", str(tmp_path / "root")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("python -m dka data download broden: cannot download http://127.0.0.1:9/") and "refused" in err
    assert not list((tmp_path / "root").glob("*"))  # nothing half-written left behind
