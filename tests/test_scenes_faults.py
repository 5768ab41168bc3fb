"""Concept-scenes exports under faults: damaged files are never used as they are (issue 15, item 5), and a
killed generation leaves nothing behind after the next run (item 9)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dka.cli.data import main as data_main
from dka.data import build_loaders
from dka.data import scenes
from dka.data.loaders import ensure_scenes, scenes_datasets
from dka.data.scenes import scratch

LIB = Path(scenes.__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An undisturbed smoke export to compare against."""
    return scenes.generate("smoke", tmp_path_factory.mktemp("ref") / "smoke", seed=0, processes=1, progress=False)


@pytest.fixture
def copy(reference, tmp_path) -> Path:
    return Path(shutil.copytree(reference, tmp_path / "smoke"))


def _files(root: Path) -> dict[str, bytes]:
    """Every file of an export (no decode cache), the parameters without the generation time."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(".dka_cache"):
            data = path.read_bytes()
            if rel == scenes.PARAMS_FILE:
                params = json.loads(data)
                params.pop("generation_seconds")
                data = json.dumps(params, sort_keys=True).encode()
            out[rel] = data
    return out


def _assert_same_export(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    assert [name for name in fa if fa[name] != fb[name]] == []


def _image_files(root: Path) -> tuple[Path, Path]:
    """A JPEG and a label PNG of the export."""
    return root / "images/train/000001.jpg", next((root / "images/test").glob("*_object.png"))


# --- item 5: a damaged export is repaired or refused, never used -----------------------------------------
def test_truncated_and_missing_files_are_detected_and_written_again(copy, reference):
    jpeg, png = _image_files(copy)
    jpeg.write_bytes(jpeg.read_bytes()[:100])
    png.unlink()
    with pytest.warns(RuntimeWarning, match="is damaged: 2 of 1138 files") as warned:
        assert scenes.generate("smoke", copy, seed=0, processes=1, progress=False) == copy.resolve()
    message = str(warned[0].message)
    assert "000001.jpg has 100 bytes" in message and f"{png.name} is missing" in message
    _assert_same_export(copy, reference)
    assert scenes.check_export(copy, full=True).ok


def test_edited_metadata_is_detected_on_every_use(copy, reference):
    index = copy / "index.csv"
    text = index.read_text()
    index.write_text(text.replace("train/000001.jpg", "train/000002.jpg", 1))  # same size, other content
    with pytest.warns(RuntimeWarning, match="1 of 1138 files .*: index.csv has another sha256"):
        scenes.generate("smoke", copy, seed=0, processes=1, progress=False)
    _assert_same_export(copy, reference)


def test_loaders_refuse_a_damaged_export_with_advice_for_generated_data(copy):
    jpeg, _ = _image_files(copy)
    jpeg.write_bytes(jpeg.read_bytes()[:-10])
    with pytest.raises(scenes.DamagedExportError) as err:
        scenes_datasets(copy)
    message = str(err.value)
    assert "000001.jpg" in message and "generated data" in message and "download" not in message
    assert f"python -m dka data scenes --preset smoke --seed 0 --out {copy} --force" in message


def test_loaders_name_an_image_changed_in_place_and_give_the_same_advice(copy):
    jpeg, _ = _image_files(copy)
    jpeg.write_bytes(b"\0" * jpeg.stat().st_size)  # same size: only the decoder (then the hashes) can tell
    with pytest.raises(scenes.DamagedExportError, match="000001.jpg has another sha256.*generated data") as err:
        scenes_datasets(copy)
    assert "download" not in str(err.value) and "skip_corrupt" not in str(err.value)


def test_training_data_is_repaired_before_use(copy):
    jpeg, png = _image_files(copy)
    jpeg.write_bytes(jpeg.read_bytes()[:50])
    png.unlink()
    with pytest.warns(RuntimeWarning, match="damaged"):
        bundle = build_loaders("scenes-smoke", copy, batch_size=64, workers=0)
    assert len(bundle.train.dataset) == 240 and scenes.check_export(copy, full=True).ok


def test_verify_hashes_every_file_and_force_rewrites(copy, reference, capsys):
    jpeg, _ = _image_files(copy)
    data = bytearray(jpeg.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: the check on every use (sizes) cannot see it, --verify can
    jpeg.write_bytes(bytes(data))
    assert scenes.check_export(copy).ok and not scenes.check_export(copy, full=True).ok
    assert data_main(["scenes", "--preset", "smoke", "--out", str(copy), "--processes", "1", "--verify"]) == 0
    assert "000001.jpg has another sha256" in capsys.readouterr().out
    _assert_same_export(copy, reference)
    assert data_main(["scenes", "--preset", "smoke", "--out", str(copy), "--processes", "1", "--verify"]) == 0
    assert "all 1138 files match scenes_manifest.json (sha256 of every file)" in capsys.readouterr().out
    before = (copy / scenes.PARAMS_FILE).stat().st_mtime_ns
    assert data_main(["scenes", "--preset", "smoke", "--out", str(copy), "--processes", "1", "--force"]) == 0
    assert (copy / scenes.PARAMS_FILE).stat().st_mtime_ns != before
    _assert_same_export(copy, reference)


def test_an_export_without_manifest_is_written_again(copy, reference):
    (copy / scenes.MANIFEST_FILE).unlink()  # as written by an older dka
    with pytest.warns(RuntimeWarning, match="scenes_manifest.json is missing"):
        scenes.generate("smoke", copy, seed=0, processes=1, progress=False)
    _assert_same_export(copy, reference)


def test_unreadable_parameters(copy, reference):
    (copy / scenes.PARAMS_FILE).write_text('{"seed": 0, "pre')
    with pytest.raises(scenes.DamagedExportError, match=r"scenes_params.json is missing or unreadable.*--force"):
        ensure_scenes("scenes-smoke", copy)  # the seed it was written with is unknown: refused
    with pytest.warns(RuntimeWarning, match="missing or unreadable"):
        scenes.generate("smoke", copy, seed=0, processes=1, progress=False)  # the caller names the seed
    _assert_same_export(copy, reference)


# --- item 9: scratch folders after a kill ---------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_mid_generation(out: Path) -> tuple[list[int], Path]:
    """Run `generate` in a child, SIGKILL it once its scratch folder holds some files: (worker pids, folder)."""
    code = f"from dka.data.scenes import generate; generate('smoke', {str(out)!r}, processes=2, progress=False)"
    env = {**os.environ, "PYTHONPATH": str(LIB), "OMP_NUM_THREADS": "1"}
    for _attempt in range(5):
        child = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            tmp = next(out.parent.glob(f".{out.name}.tmp-*"), None)
            if tmp is not None and sum(1 for _ in tmp.glob("images/*/*")) >= 40:
                workers = [int(p) for p in Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()]
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
                return workers, tmp
            time.sleep(0.002)
        child.kill()
        child.wait()
        shutil.rmtree(out, ignore_errors=True)  # it finished before it could be killed: try again
    pytest.fail("could not catch the generator mid-way in 5 attempts")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc (Linux)")
def test_sigkill_mid_generation_then_rerun_gives_the_same_export_and_no_leftovers(tmp_path, reference):
    out = tmp_path / "smoke"
    workers, tmp = _kill_mid_generation(out)
    assert tmp.is_dir() and not out.exists()  # the kill left a half-written scratch folder, no export
    time.sleep(0.5)
    assert [pid for pid in workers if _alive(pid)] == []  # the pool workers died with their parent
    assert scenes.generate("smoke", out, seed=0, processes=2, progress=False) == out.resolve()
    _assert_same_export(out, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke"]


def test_only_scratch_folders_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "smoke"
    mine = scratch.scratch_dir(out, "tmp")  # this (live) process's own folder
    prefix, host, pid, start = mine.name.rsplit("-", 3)
    assert int(pid) == os.getpid()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    folders = {
        "live": mine,
        "dead": tmp_path / f"{prefix}-{host}-{ended.pid}-{start}",
        "reused pid": tmp_path / f"{prefix}-{host}-{pid}-{int(start) + 1 if start.isdigit() else 'y'}",
        "old of dead": tmp_path / f".smoke.old-{host}-{ended.pid}-{start}",
        "other host": tmp_path / f"{prefix}-{host}x-{ended.pid}-{start}",
        "not ours": tmp_path / ".smoke.tmp-backup",
        "older dka, dead": tmp_path / f".smoke.tmp-{ended.pid}-0123456789abcdef",  # named by dka before the manifest
        "older dka, old of dead": tmp_path / f".smoke.old-{ended.pid}",
        "older dka, live": tmp_path / f".smoke.tmp-{os.getpid()}-0123456789abcdef",
        "other export": tmp_path / f".smoke2.tmp-{host}-{ended.pid}-{start}",
    }
    for folder in folders.values():
        (folder / "images").mkdir(parents=True)
    removed = scratch.remove_stale(out)
    gone = {"dead", "old of dead", "older dka, dead", "older dka, old of dead"} | ({"reused pid"} if start.isdigit() else set())
    assert sorted(removed) == sorted(folders[k] for k in gone)
    assert {k for k, f in folders.items() if f.exists()} == set(folders) - gone


def test_dissection_and_ground_truth_refuse_a_damaged_export(copy):
    from dka.dissection import _open_dataset, get_rules
    from dka.metrics import ConceptTruth

    _, png = _image_files(copy)
    png.write_bytes(png.read_bytes()[:-1])
    for open_it in (lambda: _open_dataset(copy, ("object",), False, get_rules("dka")), lambda: ConceptTruth(copy)):
        with pytest.raises(scenes.DamagedExportError, match=f"{png.name} has .* bytes.*generated data") as err:
            open_it()
        assert "download" not in str(err.value).lower()
