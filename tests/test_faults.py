"""Fault injection (issue 15): kills, a concurrent writer, changed data and a params.yaml typo.

Each test does to dka what happens to research code on a shared machine — SIGKILL at a random point of
training or dissection, a second training started on the same run directory, a resume pointed at other
data, a typo in params.yaml before `make repro` — and checks that the result is either right or a clear
error: identical outputs after a rerun, nothing left behind, committed results intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from dka import pipeline, train
from dka.checkpoint import load_checkpoint, model_payload, save_atomic
from dka.dirlock import LOCK_NAME, DirectoryBusy

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), str(TESTS)]), "OMP_NUM_THREADS": "1"}

# A child process that trains the tiny run of test_train and dies like `kill -9` at a chosen point:
# after `steps` optimiser steps, or inside the `save`-th file write, after the data is written and
# before the rename (the worst moment for a checkpoint).
_TRAIN = textwrap.dedent("""
    import json, os, signal, sys, time
    import torch
    from test_train import RandomFlip, tiny_bundle, tiny_config
    from dka import train

    out, overrides, kill = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    saves = [0]
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        saves[0] += 1
        if kill.get("save") == saves[0]:
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save

    def on_step(steps):
        if kill.get("steps") == steps:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(kill.get("sleep", 0))

    bundle = tiny_bundle(n_train=128, seed=3)
    bundle.train = RandomFlip(bundle.train)
    train.run(tiny_config(out, **overrides), bundle=bundle, on_step=on_step)
""")
_OVERRIDES = dict(model="res18-d[2,2,3]a", epochs=3, max_steps_per_epoch=None, batch_size=32, augment=False)


def _train(tmp_path: Path, out: Path, kill: dict | None = None, overrides=None, wait: bool = True):
    script = tmp_path / "train_child.py"
    script.write_text(_TRAIN)
    argv = [sys.executable, str(script), str(out), json.dumps(overrides or _OVERRIDES), json.dumps(kill or {})]
    if not wait:
        return subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_at_random_points_of_training_then_rerun_gives_identical_outputs(tmp_path):
    reference = _train(tmp_path, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    rng = random.Random(15)
    # 3 epochs x 4 steps; per epoch up to 3 files are saved (head, snapshot, checkpoint.pt)
    kills = [{"steps": rng.randint(1, 4)}, {"save": rng.randint(1, 3)}, {"steps": rng.randint(2, 6)}]
    out = tmp_path / "killed"
    for kill in kills:
        died = _train(tmp_path, out, kill)
        assert died.returncode == -signal.SIGKILL, (kill, died.stderr)
    # the kill inside a write left its temp file (SIGKILL runs no cleanup); the next start removes it
    finished = _train(tmp_path, out)
    assert finished.returncode == 0, finished.stderr
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "reference"))  # no .tmp, no lock file
    assert _rows(out / "metrics.jsonl") == _rows(tmp_path / "reference" / "metrics.jsonl")
    for name in ("final.pt", "checkpoint.pt"):
        ref, got = (load_checkpoint(d / name)["state_dict"] for d in (tmp_path / "reference", out))
        assert all(torch.equal(ref[k], got[k]) for k in ref), name


def test_a_kill_inside_a_checkpoint_write_leaves_a_temp_file_that_the_next_start_removes(tmp_path):
    out = tmp_path / "run"
    # saves: head_epoch000, checkpoint_epoch000, head_epoch001, checkpoint_epoch001, then checkpoint.pt
    died = _train(tmp_path, out, {"save": 5}, overrides={**_OVERRIDES, "epochs": 1, "max_steps_per_epoch": 1,
                                                          "model": "res18"})
    assert died.returncode == -signal.SIGKILL
    temps = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].startswith(".checkpoint.pt.")
    done = _train(tmp_path, out, overrides={**_OVERRIDES, "epochs": 1, "max_steps_per_epoch": 1, "model": "res18"})
    assert done.returncode == 0 and "a temp file left by a killed run" in done.stdout
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name == LOCK_NAME]


@pytest.mark.slow
def test_two_concurrent_trainings_on_one_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    first = _train(tmp_path, out, {"sleep": 0.3}, overrides={**_OVERRIDES, "epochs": 2}, wait=False)
    lock = out / LOCK_NAME
    deadline = time.monotonic() + 60
    while not (lock.is_file() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.read_text().split()[0] == str(first.pid)
    # another configuration on the same directory, as Python call and as command: refused at once
    with pytest.raises(DirectoryBusy, match=f"process {first.pid} holds its lock"):
        train.run(train.TrainConfig(model="res18", data="scenes-smoke", data_root=str(tmp_path / "d"), out=str(out),
                                    preset="smoke", width=4, lr=0.3, progress=False))
    from dka.cli.train import main as train_main

    with pytest.raises(SystemExit) as info:
        train_main(["--model", "res18", "--data", "scenes-smoke", "--data-root", str(tmp_path / "d"), "--out", str(out),
                    "--preset", "smoke", "--width", "4", "--lr", "0.3"])
    assert info.value.code == 3 and f"process {first.pid} holds its lock" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # the refused runs touched no data
    assert first.wait(timeout=300) == 0, first.stderr.read()
    # everything in the directory belongs to the one run that trained there
    state, final = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(out / "final.pt")
    assert final["fingerprint"] == state["fingerprint"] and final["config"]["lr"] == state["config"]["lr"] == 0.05
    assert _rows(out / "metrics.jsonl") == [{k: v for k, v in r.items() if k != "seconds"} for r in state["metrics"]]
    assert not lock.exists()


def test_resume_on_a_regenerated_dataset_is_refused(tmp_path):
    from dka.cli.data import main as data_main

    first, other = tmp_path / "scenes-a", tmp_path / "scenes-b"
    assert data_main(["scenes", "--preset", "smoke", "--out", str(first), "--processes", "1"]) == 0
    assert data_main(["scenes", "--preset", "smoke", "--out", str(other), "--processes", "1", "--seed", "1"]) == 0
    out = tmp_path / "run"

    def config(root):
        return train.TrainConfig(model="res18", data="scenes-smoke", data_root=str(root), out=str(out), preset="smoke",
                                 width=4, batch_size=32, threads=1, progress=False, amp=False)

    def stop_in_epoch_2(steps):
        if steps == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.run(config(first), on_step=stop_in_epoch_2)
    with pytest.raises(ValueError, match=r"was trained on other data.*train_digest.*test_digest.*scenes-a"):
        train.run(config(other))
    moved = tmp_path / "moved" / "scenes"
    moved.parent.mkdir()
    shutil.copytree(first, moved)  # the same data elsewhere resumes
    assert [m["epoch"] for m in train.run(config(moved)).metrics] == [1, 2]


# ------------------------------------------------------------------------------ dissection

_DISSECT = textwrap.dedent("""
    import os, signal, sys
    import pandas as pd
    from dka import dissection
    from dka.cli.dissect import main

    kill_append, kill_write = int(sys.argv[1]), int(sys.argv[2])
    appends, writes = [0], [0]
    real_append, real_to_csv = dissection.FeatureStore.append, pd.DataFrame.to_csv

    def append(self, x):
        real_append(self, x)
        appends[0] += 1
        if appends[0] == kill_append:
            os.kill(os.getpid(), signal.SIGKILL)

    def to_csv(self, handle, **kwargs):
        real_to_csv(self, handle, **kwargs)
        writes[0] += 1
        if writes[0] == kill_write:
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    dissection.FeatureStore.append, pd.DataFrame.to_csv = append, to_csv
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.slow
def test_sigkill_during_dissection_then_rerun_gives_the_same_tally_and_no_leftovers(tmp_path):
    from dka.data.scenes import generate
    from dka.models import build

    data = generate("smoke", tmp_path / "scenes", processes=1, progress=False)
    torch.manual_seed(0)
    save_atomic(model_payload(build("res18-d2a", num_classes=4, stem="cifar", width=4)), tmp_path / "final.pt")
    script = tmp_path / "dissect_child.py"
    script.write_text(_DISSECT)
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    env = {**ENV, "TMPDIR": str(scratch)}

    def dissect(out: Path, kill_append=0, kill_write=0):
        argv = [sys.executable, str(script), str(kill_append), str(kill_write), "--checkpoint",
                str(tmp_path / "final.pt"), "--data", str(data), "--out", str(out), "--workers", "0", "--device",
                "cpu", "--batch-size", "16", "--memory-budget-gb", "1e-9"]  # features spill to the scratch file
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)

    assert dissect(tmp_path / "reference").returncode == 0
    rng = random.Random(9)
    out = tmp_path / "killed"
    for kill in ({"kill_append": rng.randint(1, 19)}, {"kill_write": rng.randint(1, 2)}):
        died = dissect(out, **kill)
        assert died.returncode == -signal.SIGKILL, (kill, died.stderr)
        left = sorted(p.name for p in out.iterdir())
        # no feature scratch: at most the (released) lock file, a finished tally.csv and the temp file of
        # the write it died in
        assert all(n in (LOCK_NAME, "tally.csv") or n.endswith(".tmp") for n in left), left
    assert list(scratch.iterdir()) == []  # no scratch in the temp folder either
    assert dissect(out).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["tally.csv", "thresholds.csv"]
    for name in ("tally.csv", "thresholds.csv"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


# ------------------------------------------------------------------------------ the pipeline


def _project(tmp_path: Path, params_text: str) -> Path:
    """A copy of the project's pipeline files and committed demo results, with a stand-in venv whose
    `dvc` only records how it was called (nothing is reproduced: the test checks what runs first)."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("Makefile", "dvc.yaml", "requirements.lock", "pyproject.toml"):
        shutil.copy(ROOT / name, root / name)
    (root / "params.yaml").write_text(params_text)
    shutil.copytree(ROOT / "results" / "demo", root / "results" / "demo")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "dvc").write_text(f'#!/bin/sh\necho "$@" >> {root / "dvc-calls"}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (root / ".venv" / ".dka-installed").touch()  # `make setup` is up to date
    return root


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_params_typo_stops_make_repro_before_anything_runs(tmp_path):
    good = (ROOT / "params.yaml").read_text()
    typo = good.replace("  cifar:\n    dataset: scenes-demo32", "  cifar:\n    datset: scenes-demo32", 1)
    assert typo != good
    root = _project(tmp_path, typo)
    committed = _tree(root / "results")

    def make(*args):
        return subprocess.run(["make", "-s", "repro", *args], cwd=root, env=ENV, capture_output=True, text=True,
                              timeout=120)

    done = make()
    assert done.returncode != 0
    assert "demo.cifar.datset: unknown key; did you mean 'dataset'?" in done.stderr
    assert not (root / "dvc-calls").exists()  # dvc never ran, so no stage could touch the results
    assert _tree(root / "results") == committed and (root / "params.yaml").read_text() == typo

    (root / "params.yaml").write_text(good)
    done = make("PROFILE=profile")  # the old check let this through (`profile:` is a line of params.yaml)
    assert done.returncode != 0 and "no profile 'profile'" in done.stderr
    assert not (root / "dvc-calls").exists()
    assert make("PROFILE=smoke").returncode == 0
    assert make().returncode == 0
    assert (root / "dvc-calls").read_text().splitlines() == [
        "repro " + " ".join(pipeline.stage_names(ROOT, profile)) for profile in ("smoke", "demo")]
    assert (root / "params.yaml").read_text() == good  # never edited, so a kill cannot leave it switched
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".params")) == []


_STAGE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from dka import pipeline

    root = Path(sys.argv[1])

    def dies_halfway(argv, cwd):
        out = pipeline.results_dir(root, "01_cifar", "demo")
        (out / "table1_cifar.csv").write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)

    pipeline.run_stage(root, "01_cifar", "demo", execute=dies_halfway)
""")


def test_a_stage_killed_halfway_gets_its_committed_results_back(tmp_path):
    root = _project(tmp_path, (ROOT / "params.yaml").read_text())
    (root / "notebooks").mkdir()
    (root / "notebooks" / "01_cifar.ipynb").write_text("{}")
    committed = _tree(root / "results")
    script = tmp_path / "stage_child.py"
    script.write_text(_STAGE)
    died = subprocess.run([sys.executable, str(script), str(root)], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert pipeline.set_aside_dir(root, "01_cifar", "demo").is_dir()  # the committed results, set aside

    def fails(argv, cwd):
        return 1

    assert pipeline.run_stage(root, "01_cifar", "demo", execute=fails) == 1
    assert _tree(root / "results") == committed
