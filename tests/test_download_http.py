"""`python -m dka data download ...` end to end against an HTTP server on 127.0.0.1 serving small archives
of the real layouts: progress bar, resume of a cut transfer, checksum mismatch, extraction, a no-op rerun."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

import paper_formats
from dka.cli.data import main as data_main
from dka.data import cifar, download, places
from dka.data.broden import BrodenDataset


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET of a file under `server.folder`, with Range requests; `server.cut` bytes into the first full
    transfer of a file the connection is dropped (a cut download)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        path = server.folder / self.path.lstrip("/")
        server.log.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if server.cut and start == 0 and path.name not in server.cut_done:
            server.cut_done.add(path.name)
            self.wfile.write(body[:server.cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(tmp_path):
    folder = tmp_path / "www"
    folder.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.folder, httpd.log, httpd.cut, httpd.cut_done = folder, [], 0, set()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_download_resumes_verifies_extracts_and_is_a_noop_after(tmp_path, server, monkeypatch, capsys):
    src = paper_formats.write_cifar10(tmp_path / "src", per_batch=30, test=30)
    archive = paper_formats.archive(src / "cifar-10-batches-py", server.folder / "cifar-10-python.tar.gz")
    url = server.url + archive.name
    monkeypatch.setattr(download, "CIFAR10_URL", url)
    monkeypatch.setitem(download.CHECKSUMS, url, download.Checksum("md5", _md5(archive), "test"))
    monkeypatch.setattr(download.download_cifar10, "__defaults__", (url, True))
    server.cut = archive.stat().st_size // 3
    root = tmp_path / "data" / "cifar10"
    # the first transfer is cut: one line, the part kept for the next call
    assert data_main(["download", "cifar10", "--root", str(root)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: the error, one line
    assert last.startswith("python -m dka data download cifar10: the transfer of http://127.0.0.1:")
    assert "was cut after" in last and last.endswith("run the same command again to resume it")
    part = root / "cifar-10-python.tar.gz.part"
    assert 0 < part.stat().st_size < archive.stat().st_size
    have = part.stat().st_size
    assert data_main(["download", "cifar10", "--root", str(root)]) == 0
    captured = capsys.readouterr()
    assert server.log[-1] == ("/cifar-10-python.tar.gz", f"bytes={have}-")  # resumed, not restarted
    assert "cifar-10-python.tar.gz" in captured.err and "100%" in captured.err  # the progress bar
    assert captured.out.strip() == str(root)
    assert not part.exists() and not (root / "cifar-10-python.tar.gz").exists()  # archive removed after extraction
    images, labels, classes, skipped = cifar.load_split(root, "train")
    assert skipped == []  # pickled batches hold arrays: nothing to skip
    assert images.shape == (150, 32, 32, 3) and classes[0] == "airplane"
    requests = len(server.log)
    assert data_main(["download", "cifar10", "--root", str(root)]) == 0  # in place: nothing is requested
    assert len(server.log) == requests


def test_a_checksum_mismatch_is_one_clear_line_and_leaves_nothing(tmp_path, server, monkeypatch, capsys):
    src = paper_formats.write_cifar10(tmp_path / "src", per_batch=2, test=2)
    archive = paper_formats.archive(src / "cifar-10-batches-py", server.folder / "cifar-10-python.tar.gz")
    url = server.url + archive.name
    monkeypatch.setitem(download.CHECKSUMS, download.CIFAR10_URL, download.Checksum("md5", "0" * 32, "test"))
    monkeypatch.setattr(download.download_cifar10, "__defaults__", (url, True))
    root = tmp_path / "cifar10"
    assert data_main(["download", "cifar10", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]
    assert err.startswith("python -m dka data download cifar10: ") and f"md5 is {_md5(archive)}, expected {'0' * 32}" in err and "--no-checksum" in err
    assert not list(root.rglob("*"))  # the part is removed, nothing extracted
    assert data_main(["download", "cifar10", "--root", str(root), "--no-checksum"]) == 0
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()


def test_places365_torchvision_layout_from_its_three_archives(tmp_path, server, monkeypatch, capsys):
    src = paper_formats.write_places365_torchvision(tmp_path / "src", classes=3, train=2, val=1)
    lists = tmp_path / "lists"
    lists.mkdir()
    for name in ("categories_places365.txt", "places365_train_standard.txt", "places365_val.txt"):
        (lists / name).write_bytes((src / name).read_bytes())
    made = {"filelist_places365-standard.tar": paper_formats.archive(lists, server.folder / "filelist_places365-standard.tar", ""),
            "train_256_places365standard.tar": paper_formats.archive(src / "data_256", server.folder / "train_256_places365standard.tar"),
            "val_256.tar": paper_formats.archive(src / "val_256", server.folder / "val_256.tar")}
    for name, path in made.items():
        monkeypatch.setitem(download.CHECKSUMS, download.PLACES365_URL + name, download.Checksum("md5", _md5(path), "test"))
    real = download.download_places365
    monkeypatch.setattr(download, "download_places365", lambda root, **kw: real(root, base_url=server.url, **kw))
    root = tmp_path / "places365"
    assert data_main(["download", "places365", "--root", str(root)]) == 0
    assert places.find_layout(root) == ("torchvision", root)
    assert sorted(p.name for p in root.iterdir()) == ["categories_places365.txt", "data_256",
                                                      "places365_train_standard.txt", "places365_val.txt", "val_256"]
    for line in (root / "places365_train_standard.txt").read_text().split():
        if line.endswith(".jpg"):
            assert (root / "data_256" / line.lstrip("/")).is_file()
    requests = len(server.log)
    assert data_main(["download", "places365", "--root", str(root)]) == 0 and len(server.log) == requests


@pytest.mark.shared
def test_broden_download_extracts_a_readable_broden1_224(shared_data, tmp_path, server, monkeypatch, capsys):
    src = paper_formats.write_broden(tmp_path / "src" / "broden1_224", shared_data / "broden1_224_meta", images=4)
    archive = paper_formats.archive(src, server.folder / "broden1_224.zip")
    url = server.url + archive.name
    monkeypatch.setitem(download.CHECKSUMS, url, download.Checksum("md5", _md5(archive), "test"))
    real = download.download_broden
    monkeypatch.setattr(download, "download_broden", lambda root, **kw: real(root, url=url, **kw))
    assert data_main(["download", "broden", "--root", str(tmp_path / "data")]) == 0
    assert len(BrodenDataset(tmp_path / "data" / "broden1_224")) == 4
    requests = len(server.log)
    assert data_main(["download", "broden", "--root", str(tmp_path / "data")]) == 0 and len(server.log) == requests
