"""The cost estimate printed before a paper recipe trains: its arithmetic against a real run, the refusal."""

from __future__ import annotations

import math
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from dka import train
from dka.experiments import train_models
from dka.train import cost

Usage = namedtuple("Usage", "total used free")


def _bundle(n_train=64, n_test=16, classes=4, size=8):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n_train + n_test,), generator=g)
    x = torch.randn(n_train + n_test, 3, size, size, generator=g) + y.view(-1, 1, 1, 1) * 0.3
    return SimpleNamespace(train=TensorDataset(x[:n_train], y[:n_train]), test=TensorDataset(x[n_train:], y[n_train:]),
                           num_classes=classes, stem="cifar")


def _config(tmp_path, **changes):
    fields = dict(model="res18-d2a", data="scenes-smoke", out=str(tmp_path / "run"), preset="paper-cifar", width=8,
                  epochs=3, batch_size=8, max_steps_per_epoch=None, max_eval_steps=1, device="cpu", amp=False,
                  workers=0, save_checkpoint_epochs="0,last", progress=False)
    return train.TrainConfig(**{**fields, **changes})


def test_run_cost_counts_steps_images_and_the_files_a_run_writes(tmp_path):
    bundle = _bundle()
    config = _config(tmp_path)
    estimate = cost.run_cost("res18-d2a", config, len(bundle.train), bundle.num_classes, step_seconds=0.5)
    assert (estimate.images_per_epoch, estimate.epochs, estimate.steps) == (64, 3, 24)  # 64 // 8 steps of 8
    assert math.isclose(estimate.hours, 24 * 0.5 / 3600)
    capped = cost.run_cost("x", _config(tmp_path, max_steps_per_epoch=2), 64, 4, 1.0, processes=2)
    assert (capped.images_per_epoch, capped.steps) == (16, 6)  # 2 steps of 8 (4 per process) per epoch
    train.run(config, bundle=bundle)
    written = sum(p.stat().st_size for p in (tmp_path / "run").glob("*.pt"))
    # the estimate counts tensor bytes; the files add pickle framing and the recipe: within 25 %
    assert 0.75 * written < estimate.disk_bytes < 1.25 * written, (estimate.disk_bytes, written)


def test_estimate_measures_each_model_once_and_reports(tmp_path):
    bundle = _bundle()
    runs = [("a/seed0", _config(tmp_path)), ("a/seed1", _config(tmp_path, seed=1)),
            ("b/seed0", _config(tmp_path, model="res18"))]
    result = cost.estimate(runs, bundle, tmp_path / "runs", processes=2)
    assert [r.name for r in result.runs] == ["a/seed0", "a/seed1", "b/seed0"]
    assert result.runs[0].step_seconds == result.runs[1].step_seconds > 0  # measured once per model
    assert math.isclose(result.device_hours, 2 * result.hours)
    text = result.report()
    assert text.startswith("cost estimate (3 runs on 2 x cpu") and "images/epoch x 3 epochs" in text
    assert "device-hours" in text and "free" in text


def test_short_disk_is_refused_with_the_fix(tmp_path, monkeypatch):
    bundle = _bundle()
    result = cost.estimate([("a", _config(tmp_path))], bundle, tmp_path / "runs")
    cost.require_disk(result)  # this disk has room for a width-4 net
    result.free["runs"] = result.disk_bytes // 2
    with pytest.raises(cost.InsufficientDiskError, match=r"need about .* but only .* is free; free some space"):
        cost.require_disk(result)
    big = cost.CostEstimate([], 1, "cuda", tmp_path, dissection_bytes=10 << 30, dissection_folder=tmp_path,
                            free={"runs": 1 << 40, "dissection": 1 << 30})
    with pytest.raises(cost.InsufficientDiskError, match="TMPDIR"):
        cost.require_disk(big)


def test_a_paper_recipe_prints_its_cost_and_refuses_a_short_disk_before_training(tmp_path, monkeypatch, capsys):
    section = {"models": ["res18-d2a"], "dataset": "scenes-smoke", "root": "scenes",
               "train": {"preset": "paper-cifar", "width": 4, "epochs": 1, "batch_size": 8, "max_steps_per_epoch": 1,
                         "max_eval_steps": 1, "save_checkpoint_epochs": "last", "progress": False}}
    runtime = {"device": "cpu", "workers": 0, "amp": False, "seed": 0, "fresh_runs": False, "nproc_per_node": 1}
    monkeypatch.setattr(cost.shutil, "disk_usage", lambda path: Usage(1 << 30, 1 << 30, 1000))
    with pytest.raises(cost.InsufficientDiskError):
        train_models(section, runtime, tmp_path / "runs", tmp_path, bundle=_bundle())
    assert "cost estimate (1 runs" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    monkeypatch.undo()
    results = train_models(section, runtime, tmp_path / "runs", tmp_path, bundle=_bundle())
    assert results["res18-d2a"][0].final_path.is_file() and "cost estimate" in capsys.readouterr().out
    train_models(section, runtime, tmp_path / "runs", tmp_path, bundle=_bundle())  # finished: nothing to estimate
    assert "cost estimate" not in capsys.readouterr().out
