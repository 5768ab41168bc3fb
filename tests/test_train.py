"""dka.train: presets, schedules, metrics, snapshots, exact resume after SIGKILL, NaN stop, DDP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from dka import models, train
from dka.cli.train import main as train_main
from dka.checkpoint import load_checkpoint
from dka.models import load_model
from dka.layers import routed_indices

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5",
               "sparsity", "never_routed", "seconds"}


def tiny_bundle(n_train=96, n_test=32, classes=4, size=8, seed=0):
    """In-memory stand-in for dka.data.DataBundle: learnable (class-dependent mean) 8x8 images."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n_train + n_test,), generator=g)
    x = torch.randn(n_train + n_test, 3, size, size, generator=g) * 0.5 + y.view(-1, 1, 1, 1) * 0.3
    return SimpleNamespace(train=TensorDataset(x[:n_train], y[:n_train]), test=TensorDataset(x[n_train:], y[n_train:]),
                           num_classes=classes, stem="cifar")


class RandomFlip(Dataset):
    """Augmentation drawing from the global torch RNG (as torchvision transforms do with workers=0),
    so exact resume also depends on the restored RNG state."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y


def tiny_config(out, **overrides):
    base = dict(model="res18-d3a", data="tiny", out=str(out), preset="smoke", width=4, batch_size=16,
                workers=0, amp=False, channels_last=False, progress=False, threads=1, deterministic=True)
    base.update(overrides)
    return train.TrainConfig(**base)


# ------------------------------------------------------------------------------------------ presets


def test_paper_preset_follows_the_dataset():
    cifar = train.TrainConfig(model="res18", data="cifar10", out="x", preset="paper").resolved()
    places = train.TrainConfig(model="res18", data="places365", out="x", preset="paper").resolved()
    assert (cifar.preset, cifar.epochs, cifar.weight_decay, cifar.milestones) == ("paper-cifar", 200, 5e-4, (70, 140))
    assert (places.preset, places.epochs, places.weight_decay, places.milestones) == ("paper-places", 90, 1e-4, (30, 60))
    for cfg in (cifar, places):
        assert (cfg.lr, cfg.momentum, cfg.batch_size, cfg.schedule) == (0.1, 0.9, 256, "step")
        assert cfg.save_head_epochs == tuple(range(cfg.epochs + 1))


def test_every_preset_field_can_be_overridden_from_the_cli():
    cfg = train.config_from_args([
        "--model", "res18-l1", "--data", "cifar10", "--out", "o", "--preset", "paper", "--epochs", "9",
        "--lr", "0.2", "--batch-size", "64", "--wd", "1e-5", "--milestones", "3,6", "--l1", "0.01",
        "--no-amp", "--no-channels-last", "--save-head-epochs", "0,last", "--save-checkpoint-epochs", "none",
        "--max-steps-per-epoch", "5", "--seed", "3", "--deterministic", "--device", "cpu", "--workers", "0",
    ]).resolved()
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.weight_decay, cfg.milestones, cfg.l1) == (9, 0.2, 64, 1e-5, (3, 6), 0.01)
    assert (cfg.amp, cfg.channels_last, cfg.deterministic, cfg.seed, cfg.device) == (False, False, True, 3, "cpu")
    assert cfg.save_head_epochs == (0, 9) and cfg.save_checkpoint_epochs == ()
    assert cfg.max_steps_per_epoch == 5


def test_bad_settings_name_the_valid_choices():
    with pytest.raises(ValueError, match="valid presets"):
        train.TrainConfig(model="res18", data="cifar10", out="x", preset="fast").resolved()
    with pytest.raises(ValueError, match=r"outside \[0, 12\]"):
        train.TrainConfig(model="res18", data="x", out="x", save_head_epochs="0,13").resolved()


def test_preset_snapshot_epochs_follow_a_shortened_run():
    cfg = train.TrainConfig(model="res18", data="x", out="x", preset="demo", epochs=3).resolved()
    assert cfg.save_checkpoint_epochs == (0, 1, 2, 3) and cfg.save_head_epochs == (0, 1, 2, 3)


def test_step_schedule_matches_the_paper():
    f = train.LrFactor("step", steps_per_epoch=10, epochs=200, milestones=(70, 140), gamma=0.1)
    assert f(0) == 1.0 and f(699) == 1.0
    assert f(700) == pytest.approx(0.1) and f(1399) == pytest.approx(0.1)
    assert f(1400) == pytest.approx(0.01) and f(1999) == pytest.approx(0.01)


def test_cosine_schedule_warms_up_then_anneals_to_zero():
    f = train.LrFactor("cosine", steps_per_epoch=10, epochs=12, warmup_epochs=1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(65) == pytest.approx(0.5)
    assert f(119) < 1e-3
    values = [f(s) for s in range(10, 120)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ------------------------------------------------------------------------------------------ a run


def test_run_writes_the_documented_layout(tmp_path):
    torch.manual_seed(0)
    result = train.run(tiny_config(tmp_path / "run", model="res18-d[2,2,3]a", save_checkpoint_epochs="0,1"),
                       bundle=tiny_bundle())
    out = tmp_path / "run"
    assert result.out_dir == out and result.final_path == out / "final.pt"
    names = sorted(os.listdir(out))
    assert names == ["checkpoint.pt", "checkpoint_epoch000.pt", "checkpoint_epoch001.pt", "final.pt",
                     "head_epoch000.pt", "head_epoch001.pt", "head_epoch002.pt", "metrics.jsonl"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.metrics and [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert set(m) == METRIC_KEYS
        assert 0 <= m["test_top1"] <= m["test_top5"] <= 100
        assert set(m["sparsity"]) == {"head", "layer3.0.conv1", "layer4.0.conv1"}
        assert set(m["never_routed"]) == {"head", "layer3.0.conv1", "layer4.0.conv1"}
        assert all(0 <= v <= 1 for v in m["never_routed"].values())
    assert lines[0]["lr"] == pytest.approx(0.05) and lines[1]["lr"] < lines[0]["lr"]
    # the init head (epoch 0) is the checkpoint_epoch000 head, and final.pt rebuilds the trained net
    head0 = load_checkpoint(out / "head_epoch000.pt")
    init = load_checkpoint(out / "checkpoint_epoch000.pt")
    assert torch.equal(head0["weight"], init["state_dict"]["head.weight"])
    final = load_model(out / "final.pt")
    head2 = load_checkpoint(out / "head_epoch002.pt")
    assert torch.equal(final.head.weight, head2["weight"])
    assert not torch.equal(head0["weight"], head2["weight"])


def test_finished_run_returns_stored_result_without_data(tmp_path):
    first = train.run(tiny_config(tmp_path / "run", model="res18"), bundle=tiny_bundle())
    assert set(first.metrics[0]["never_routed"]) == set()  # dense model: no dynamic layers
    assert set(first.metrics[0]["sparsity"]) == {"head"}
    before = (tmp_path / "run" / "final.pt").stat().st_mtime_ns
    # data "tiny" does not exist: any attempt to train would fail while loading it
    again = train.run(tiny_config(tmp_path / "run", model="res18"))
    assert again.metrics == first.metrics
    assert (tmp_path / "run" / "final.pt").stat().st_mtime_ns == before


def test_changed_configuration_is_refused(tmp_path):
    train.run(tiny_config(tmp_path / "run", model="res18", epochs=1), bundle=tiny_bundle())
    with pytest.raises(ValueError, match="different configuration.*lr"):
        train.run(tiny_config(tmp_path / "run", model="res18", epochs=1, lr=0.3), bundle=tiny_bundle())


# Fingerprints of runs made before the optional fields optimizer / loss existed, measured with main at
# 5fb4f3e (`TrainConfig(**fields).resolved().fingerprint()`); amp is fixed so the hash is the same on any CPU.
_EARLIER_FINGERPRINTS = [
    (dict(model="res18-d5a", data="scenes-demo32", preset="demo", amp=False), "378faedf7f4d5821"),
    (dict(model="res18", data="cifar10", preset="paper-cifar", seed=3, amp=False), "0dfc56cf748d8951"),
    (dict(model="res18-l1", data="scenes-smoke", preset="smoke", head_weight_decay=0.0, amp=True),
     "b45848d14a883b3c"),
    (dict(model="res18-d5a", data="scenes-demo32", preset="demo", model_options={"a": 1}, amp=False, epochs=5),
     "84e12d034c7e4385"),
]


@pytest.mark.parametrize("fields,fingerprint", _EARLIER_FINGERPRINTS)
def test_optional_fields_at_their_neutral_value_keep_earlier_fingerprints(fields, fingerprint):
    """A new optional field at its neutral value is absent from the fingerprint, so earlier runs resume."""
    cfg = train.TrainConfig(out="x", **fields)
    # matches_fingerprint: runs recorded before float fields were coerced hashed a preset's `1` as an int
    assert cfg.resolved().matches_fingerprint(fingerprint)
    # stating a neutral value explicitly is the same run ...
    explicit = dict(optimizer="sgd", loss="cross-entropy")
    if "model_options" not in fields:
        explicit["model_options"] = {}
    if "head_weight_decay" not in fields:
        explicit["head_weight_decay"] = None
    assert train.TrainConfig(out="y", **fields, **explicit).resolved().matches_fingerprint(fingerprint)
    names = cfg.resolved().fingerprint_fields()
    assert "optimizer" not in names and "loss" not in names
    # ... and a non-neutral value is another run
    for change in (dict(optimizer="adam"), dict(loss="bce")):
        other = train.TrainConfig(out="x", **fields, **change).resolved()
        assert not other.matches_fingerprint(fingerprint) and set(change) <= set(other.fingerprint_fields())
    if "head_weight_decay" not in fields:  # 0.0 is a setting, not the neutral None
        assert not train.TrainConfig(out="x", head_weight_decay=0.0, **fields).resolved().matches_fingerprint(fingerprint)


def test_l1_penalty_shrinks_the_head(tmp_path):
    runs = {}
    for l1 in (0.0, 0.5):
        torch.manual_seed(0)
        train.run(tiny_config(tmp_path / f"l1_{l1}", model="res18-l1", l1=l1, epochs=1), bundle=tiny_bundle())
        runs[l1] = load_model(tmp_path / f"l1_{l1}" / "final.pt").head.weight.abs().sum().item()
    assert runs[0.5] < 0.8 * runs[0.0]


class _PoisonedAfter(Dataset):
    """Returns NaN images once more than `clean` items were fetched: a divergence in epoch 2."""

    def __init__(self, base, clean):
        self.base, self.clean, self.fetched = base, clean, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.fetched += 1
        x, y = self.base[i]
        return (torch.full_like(x, float("nan")) if self.fetched > self.clean else x), y


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(tmp_path):
    bundle = tiny_bundle()
    bundle.train = _PoisonedAfter(bundle.train, clean=4 * 16 + 16)  # epoch 1 = 4 steps of 16; NaN at epoch 2 step 2
    with pytest.raises(FloatingPointError, match=r"epoch 2 step 2/4"):
        train.run(tiny_config(tmp_path / "run"), bundle=bundle)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 1 and len(state["metrics"]) == 1
    assert not (tmp_path / "run" / "final.pt").exists()


def test_routing_tracker_marks_exactly_the_selected_weights():
    torch.manual_seed(0)
    model = models.build("res18-d2a", 5, stem="cifar", width=4).train()
    tracker = train.RoutingTracker(model.dynamic_layers())
    captured = {}
    model.head.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0].detach()))
    model(torch.randn(6, 3, 8, 8))
    idx = routed_indices(captured["x"], model.head.weight.detach(), 2)  # (6, 5, 2)
    expected = torch.zeros(5, model.head.weight.shape[1], dtype=torch.bool)
    for b in range(6):
        for c in range(5):
            expected[c, idx[b, c]] = True
    assert torch.equal(tracker.used["head"], expected)
    assert tracker.never_routed(train.DistContext())["head"] == pytest.approx(
        1 - expected.float().mean().item())


# ------------------------------------------------------------------------------------------ resume

_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_train import tiny_bundle, tiny_config
    from dka import train
    from test_train import RandomFlip
    overrides = json.loads(sys.argv[2])
    kill_after = int(sys.argv[3])
    bundle = tiny_bundle(n_train=128, seed=3)
    bundle.train = RandomFlip(bundle.train)

    def on_step(steps):  # dies exactly like `kill -9` after `kill_after` optimiser steps
        if kill_after and steps >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    train.run(tiny_config(sys.argv[1], **overrides), bundle=bundle, on_step=on_step)
""")


def _run_script(tmp_path, out, overrides, kill_after=None):
    script = tmp_path / "train_script.py"
    script.write_text(_SCRIPT.format(tests=str(ROOT / "tests")))
    return subprocess.run([sys.executable, str(script), str(out), json.dumps(overrides), str(kill_after or 0)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights_and_metrics(tmp_path):
    overrides = dict(model="res18-d[2,2,3]a", epochs=3, max_steps_per_epoch=None, batch_size=32,
                     augment=False, schedule="cosine", warmup_epochs=0.5)
    reference = _run_script(tmp_path, tmp_path / "reference", overrides)
    assert reference.returncode == 0, reference.stderr
    # 4 steps per epoch: SIGKILL after 6 steps = in the middle of epoch 2, after checkpoint 1
    killed = _run_script(tmp_path, tmp_path / "resumed", overrides, kill_after=6)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "resumed" / "final.pt").exists()
    resumed = _run_script(tmp_path, tmp_path / "resumed", overrides)
    assert resumed.returncode == 0, resumed.stderr

    ref_final = load_checkpoint(tmp_path / "reference" / "final.pt")["state_dict"]
    res_final = load_checkpoint(tmp_path / "resumed" / "final.pt")["state_dict"]
    assert ref_final.keys() == res_final.keys()
    for key in ref_final:
        assert torch.equal(ref_final[key], res_final[key]), key

    def without_seconds(path):
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    ref_metrics = without_seconds(tmp_path / "reference" / "metrics.jsonl")
    assert len(ref_metrics) == 3
    assert without_seconds(tmp_path / "resumed" / "metrics.jsonl") == ref_metrics


# ------------------------------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, overrides):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train.run(tiny_config(out, **overrides), bundle=tiny_bundle(n_train=128, seed=5))


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    """BatchNorm statistics are pooled over ranks (AllReduceBatchNorm2d on gloo), the sampler gives
    each rank an interleaved half of the same global batch and DDP averages the gradients: so the two
    processes take the same steps as one process, up to float summation order."""
    overrides = dict(model="res18-d[2,2,3]a", epochs=2, batch_size=32, augment=False, max_steps_per_epoch=3)
    single = train.run(tiny_config(tmp_path / "single", **overrides), bundle=tiny_bundle(n_train=128, seed=5))
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), overrides), nprocs=2)
    a = load_checkpoint(tmp_path / "single" / "final.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "ddp" / "final.pt")["state_dict"]
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key
    ddp_metrics = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    for m_single, m_ddp in zip(single.metrics, ddp_metrics, strict=True):
        for key in ("train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "lr"):
            assert m_ddp[key] == pytest.approx(m_single[key], rel=1e-4, abs=1e-4), key
        assert m_ddp["never_routed"]["head"] == pytest.approx(m_single["never_routed"]["head"], abs=0.02)


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.slow
def test_cli_trains_on_generated_scenes_smoke(tmp_path):
    """The documented command end to end on the built-in dataset (generated on first use)."""
    out = tmp_path / "run"
    argv = ["--model", "res18-d5a", "--data", "scenes-smoke", "--data-root", str(tmp_path / "scenes"),
            "--preset", "smoke", "--width", "4", "--out", str(out), "--no-progress", "--threads", "1"]
    assert train_main(argv) == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert set(metrics[-1]["never_routed"]) == {"head"}
    model = load_model(out / "final.pt")
    assert model.build_kwargs["name"] == "res18-d5a" and model.head.k == 5
    assert train_main(argv) == 0  # finished: returns the stored result
    assert [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] == metrics


# ------------------------------------------------------------------------------------------ reliability (issue 15)


def test_final_pt_is_written_from_the_run_just_finished(tmp_path):
    """Deleting checkpoint.pt and retraining with another lr used to keep the old final.pt."""
    out = tmp_path / "run"
    train.run(tiny_config(out, model="res18", epochs=1), bundle=tiny_bundle())
    (out / "checkpoint.pt").unlink()
    train.run(tiny_config(out, model="res18", epochs=1, lr=0.3), bundle=tiny_bundle())
    final = load_checkpoint(out / "final.pt")
    assert final["config"]["lr"] == 0.3
    assert final["fingerprint"] == load_checkpoint(out / "checkpoint.pt")["fingerprint"]
    assert torch.equal(final["state_dict"]["head.weight"], load_checkpoint(out / "checkpoint.pt")["state_dict"]["head.weight"])


def test_a_second_process_on_the_run_directory_fails_naming_the_holder(tmp_path):
    from dka.dirlock import LOCK_NAME, DirectoryBusy, exclusive

    out = tmp_path / "run"
    with exclusive(out):  # another open file description: conflicts like another process would
        with pytest.raises(DirectoryBusy, match=rf"process {os.getpid()} holds its lock.*choose another output"):
            train.run(tiny_config(out, model="res18", epochs=1), bundle=tiny_bundle())
        assert sorted(os.listdir(out)) == [LOCK_NAME]  # nothing was written by the refused run
    result = train.run(tiny_config(out, model="res18", epochs=1), bundle=tiny_bundle())
    assert result.final_path.is_file() and LOCK_NAME not in os.listdir(out)  # released, file removed


def test_resume_on_other_data_names_what_differs(tmp_path):
    out = tmp_path / "run"

    def stop_in_epoch_2(steps):
        if steps == 5:  # 4 steps per epoch: checkpoint 1 is written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.run(tiny_config(out, model="res18"), bundle=tiny_bundle(), on_step=stop_in_epoch_2)
    assert load_checkpoint(out / "checkpoint.pt")["dataset"]["train_size"] == 96
    with pytest.raises(ValueError, match=r"trained on other data.*train_digest: \w+ \(stored\) vs \w+ \(now\)"):
        train.run(tiny_config(out, model="res18"), bundle=tiny_bundle(seed=1))  # same sizes, other images
    with pytest.raises(ValueError, match=r"train_size: 96 \(stored\) vs 80 \(now\)"):
        train.run(tiny_config(out, model="res18"), bundle=tiny_bundle(n_train=80))
    result = train.run(tiny_config(out, model="res18"), bundle=tiny_bundle())  # the original data resumes
    assert [m["epoch"] for m in result.metrics] == [1, 2]
    assert load_checkpoint(out / "final.pt")["dataset"]["num_classes"] == 4


def test_temp_files_of_a_killed_run_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".checkpoint.pt.k3x9_a2b.tmp", out / ".metrics.jsonl.zz0000aa.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1024)  # what SIGKILL during save_atomic leaves
    (out / "notes.tmp").write_text("not ours")
    train.run(tiny_config(out, model="res18", epochs=1), bundle=tiny_bundle())
    assert not any(p.exists() for p in stale)
    assert (out / "notes.tmp").exists()


def test_bad_arguments_fail_before_data_or_disk_are_touched(tmp_path, monkeypatch, capsys):
    import dka.train.loop as loop

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the arguments were checked")

    monkeypatch.setattr(loop, "build_loaders", no_data)
    out = tmp_path / "new" / "run"
    base = ["--data", "scenes-smoke", "--data-root", str(tmp_path / "scenes"), "--out", str(out), "--no-progress"]
    cases = [
        (["--model", "res18-d5x", *base], "res18-d5x"),                                  # bad model name
        (["--model", "res18-d999a", "--width", "4", *base], "999"),                      # K larger than the head
        (["--model", "res18", "--data", "cifar10", "--out", str(out)], "--data-root"),   # missing data root
        (["--model", "res18", "--data", "cifar10", "--data-root", str(tmp_path / "none"), "--out", str(out)],
         "does not exist"),
        (["--model", "res18", "--data", "imagenet", "--data-root", str(tmp_path), "--out", str(out)], "valid names"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            train_main(argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "new").exists(), argv  # no empty folder left behind
    monkeypatch.setattr(loop, "build_loaders", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("decode failed")))
    with pytest.raises(RuntimeError, match="decode failed"):
        train.run(tiny_config(out, data="scenes-smoke", data_root=str(tmp_path / "scenes")))
    assert not (tmp_path / "new").exists()  # a run that failed before writing anything removes its folders


def _read_only(path: Path, script: str) -> subprocess.CompletedProcess:
    """Run `script` (Python) with `path` read-only: a private read-only bind mount for root, chmod otherwise."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib") + os.pathsep + str(ROOT / "tests")}
    if os.geteuid() == 0:
        import shutil

        if shutil.which("unshare") is None:
            pytest.skip("root without unshare: cannot make a read-only view")
        argv = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$1" -c "$2"', str(path),
                sys.executable, script]
        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip("cannot create a mount namespace here")
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    for p in [path, *path.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)


def test_finished_run_returns_in_a_read_only_folder(tmp_path):
    out = tmp_path / "run"
    first = train.run(tiny_config(out, model="res18", epochs=1), bundle=tiny_bundle())
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    script = textwrap.dedent(f"""
        import json
        from test_train import tiny_config
        from dka import train
        result = train.run(tiny_config({str(out)!r}, model="res18", epochs=1))
        print(json.dumps(result.metrics))
    """)
    done = _read_only(out, script)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == first.metrics
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


def test_resumed_run_with_skip_corrupt_gets_past_a_corrupt_jpeg(tmp_path):
    """A corrupt Places365 JPEG crashed the same epoch on every resume; --skip-corrupt may be added on resume."""
    from PIL import Image

    root = tmp_path / "places365_standard"
    rng = torch.Generator().manual_seed(0)
    for split, count in (("train", 4), ("val", 2)):
        for folder in ("airfield", "alley", "arena-hockey"):
            (root / split / folder).mkdir(parents=True)
            for k in range(count):
                pixels = torch.randint(0, 256, (24, 24, 3), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / folder / f"{k:08d}.jpg")
    cfg = dict(model="res18", data="places365", data_root=str(tmp_path), batch_size=4, width=4, epochs=2,
               max_steps_per_epoch=None, max_eval_steps=None)
    out = tmp_path / "run"

    def stop_in_epoch_2(steps):
        if steps == 4:  # 12 training images, batch 4: 3 steps per epoch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.run(tiny_config(out, **cfg), on_step=stop_in_epoch_2)
    bad = root / "train" / "alley" / "00000001.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(Exception, match=r"00000001\.jpg.*--skip-corrupt"):
        train.run(tiny_config(out, **cfg))
    with pytest.warns(RuntimeWarning, match="skipped: cannot decode"):
        result = train.run(tiny_config(out, **cfg, skip_corrupt=True))
    assert [m["epoch"] for m in result.metrics] == [1, 2]
    assert "skipped_images" not in result.metrics[0]  # epoch 1 ran before the file broke, without the flag
    assert result.metrics[1]["skipped_images"] == 1


def test_skip_corrupt_on_the_cli_is_counted_in_log_and_metrics(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "cifar"
    rng = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for k in range(12):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=rng, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{k:04d}.png")
    bad = root / "train" / "cat" / "0003.png"
    bad.write_bytes(bad.read_bytes()[:50])
    def argv(out, *extra):
        return ["--model", "res18", "--data", "cifar10", "--data-root", str(root), "--preset", "smoke", "--width", "4",
                "--batch-size", "8", "--out", str(out), "--no-progress", "--threads", "1", "--no-amp", *extra]

    with pytest.raises(Exception, match=r"0003\.png.*--skip-corrupt"):
        train_main(argv(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    for attempt in range(2):  # the second run reuses the decode cache: the warning and the count stay
        out = tmp_path / f"run{attempt}"
        with pytest.warns(RuntimeWarning, match=r"skipped 1 corrupt image\(s\) of 24.*0003\.png"):
            assert train_main(argv(out, "--skip-corrupt")) == 0
        log = capsys.readouterr().out
        assert "--skip-corrupt: 1 image(s) could not be decoded and are left out" in log and "0003.png" in log
        assert "| skipped 1 undecodable" in log
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["skipped_images"] for m in metrics] == [1, 1]


def _cifar_cpu_recipe(**changes) -> train.TrainConfig:
    """The cifar-cpu profile's res18-d5a recipe (params.yaml), resolved."""
    fields = dict(model="res18-d5a", data="cifar10", out="unused", preset="demo", width=16, epochs=12, lr=0.1,
                  warmup_epochs=1.0, head_weight_decay=3.25e-3)
    return train.TrainConfig(**{**fields, **changes}).resolved()


def test_integer_and_float_spellings_of_a_recipe_have_one_fingerprint():
    # YAML reads `warmup_epochs: 1` as an int and `1.0` as a float: one recipe, one fingerprint (a finished
    # run must not be retrained because a profile spelled a number differently)
    as_int, as_float = _cifar_cpu_recipe(warmup_epochs=1), _cifar_cpu_recipe(warmup_epochs=1.0)
    assert as_int.warmup_epochs == 1.0 and isinstance(as_int.warmup_epochs, float)
    assert as_int.fingerprint() == as_float.fingerprint()
    assert isinstance(train.TrainConfig(model="res18", data="cifar10", out="x", lr=1).lr, float)
    # every float-annotated field is coerced, nothing else
    assert train.config._FLOAT_FIELDS == ("lr", "momentum", "weight_decay", "head_weight_decay", "gamma",
                                          "warmup_epochs", "l1")
    with pytest.raises(TypeError, match="epochs: expected an integer"):
        train.TrainConfig(model="res18", data="cifar10", out="x", epochs=5.5).resolved()


def test_recorded_fingerprints_stay_valid():
    # measured with the code before the coercion (main at 1209c32): a run recorded with warmup_epochs 1.0
    # keeps its fingerprint; one recorded with the integer 1 is still recognised as the same recipe
    float_recorded, int_recorded = "c20d9e0455e60e00", "2103c1897f180c11"
    cfg = _cifar_cpu_recipe(warmup_epochs=1)
    assert cfg.fingerprint() == float_recorded
    assert cfg.matches_fingerprint(float_recorded) and cfg.matches_fingerprint(int_recorded)
    assert not _cifar_cpu_recipe(warmup_epochs=2).matches_fingerprint(int_recorded)
    assert not cfg.matches_fingerprint(None)


def test_a_run_recorded_with_an_integer_float_field_resumes_without_retraining(tmp_path):
    cfg = tiny_config(tmp_path / "run", epochs=1)
    train.run(cfg, bundle=tiny_bundle())
    ckpt = tmp_path / "run" / "checkpoint.pt"
    resolved = cfg.resolved()
    # the stored fingerprints as the old code computed them from the integer spelling `warmup_epochs: 0`
    legacy = train.config._digest({**resolved.fingerprint_fields(), "warmup_epochs": 0})
    assert legacy != resolved.fingerprint()
    for path in (ckpt, tmp_path / "run" / "final.pt"):
        payload = load_checkpoint(path)
        torch.save({**payload, "fingerprint": legacy}, path)
    state = load_checkpoint(ckpt)
    before = (tmp_path / "run" / "final.pt").stat().st_mtime_ns
    result = train.run(cfg)  # data "tiny" does not exist: retraining would fail while loading it
    assert result.metrics == state["metrics"]
    assert (tmp_path / "run" / "final.pt").stat().st_mtime_ns == before  # the finished run was reused
