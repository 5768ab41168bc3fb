"""The notebooks' training glue: torchrun command lines and section runs."""

import pytest

from dka import train
from dka.checkpoint import load_checkpoint
from dka.experiments import final_sparsity, run_specs, torchrun_argv, train_models


def test_torchrun_argv_parses_back_to_the_same_config():
    config = train.TrainConfig(model="res18-d5a", data="scenes-smoke", data_root="data/x", out="runs/x",
                               preset="smoke", epochs=3, save_checkpoint_epochs=(0, 1, 3), amp=False)
    argv = torchrun_argv(config, 2)
    assert argv[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert train.config_from_args(argv[argv.index("train") + 1:]).resolved() == config.resolved()


def test_train_models_runs_each_model_of_a_section(tmp_path):
    section = {"models": ["res18", "res18-d2a"], "dataset": "scenes-smoke", "root": "scenes",
               "train": {"preset": "smoke", "width": 4, "epochs": 1, "max_steps_per_epoch": 1},
               "overrides": {"res18": {"epochs": 2}}}
    runtime = {"device": "cpu", "workers": 0, "amp": False, "seed": 0, "fresh_runs": True, "nproc_per_node": 1}
    results = train_models(section, runtime, tmp_path / "runs", tmp_path)
    assert [len(results[m][0].metrics) for m in ("res18", "res18-d2a")] == [2, 1]
    sparsity = final_sparsity(results["res18-d2a"][0])
    assert 0 <= sparsity["small"] <= 1 and 0 <= sparsity["never_routed"] <= 1
    assert final_sparsity(results["res18"][0])["never_routed"] != final_sparsity(results["res18"][0])["never_routed"]


def test_runs_of_a_section_with_seeds_and_named_variants(tmp_path):
    section = {"models": ["res18-d2a", {"run": "res18-l1-x4", "model": "res18-l1", "l1": 8.0e-3}],
               "dataset": "scenes-smoke", "root": "scenes",
               "train": {"preset": "smoke", "width": 4, "epochs": 1, "max_steps_per_epoch": 1}}
    specs = run_specs(section)
    assert [(s.name, s.model, s.overrides) for s in specs] == [("res18-d2a", "res18-d2a", {}),
                                                                ("res18-l1-x4", "res18-l1", {"l1": 8.0e-3})]
    runtime = {"device": "cpu", "workers": 0, "amp": False, "seed": 0, "seeds": [0, 1], "fresh_runs": False,
               "nproc_per_node": 1}
    results = train_models(section, runtime, tmp_path / "runs", tmp_path)
    assert [r.out_dir.name for r in results["res18-l1-x4"]] == ["seed0", "seed1"]
    configs = [load_checkpoint(r.final_path)["config"] for r in results["res18-l1-x4"]]
    assert [(c["model"], c["l1"], c["seed"]) for c in configs] == [("res18-l1", 8.0e-3, 0), ("res18-l1", 8.0e-3, 1)]
    with pytest.raises(ValueError, match="appears twice"):
        run_specs({"models": ["res18", "res18"]})


def _project(tmp_path, monkeypatch, fresh_runs=False):
    """A minimal project: dvc.yaml, a params.yaml with one profile, 02's recorded notebook (9.5 min)."""
    import json

    import yaml

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    runtime = {"device": "cpu", "workers": 0, "amp": False, "seed": 0, "fresh_runs": fresh_runs}
    params = {"profile": "demo", "demo": {
        "runtime": runtime,
        "places": {"models": ["res18", "res18-d5a"], "train": {"preset": "demo"}, "dataset": "x", "root": "x"},
        "dissect": {"models": ["res18-d5a"]}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    recorded = tmp_path / "results" / "demo" / "02_places_sweep" / "02_places_sweep.ipynb"
    recorded.parent.mkdir(parents=True)
    recorded.write_text(json.dumps({"metadata": {"papermill": {"duration": 570.0}}, "cells": []}))
    monkeypatch.chdir(tmp_path)


def test_a_first_run_says_what_it_trains_and_how_long_it_took(tmp_path, monkeypatch, capsys):
    from dka import experiments

    _project(tmp_path, monkeypatch)
    stage = experiments.setup("demo", "02_places_sweep", "places")
    note = capsys.readouterr().out
    assert "2 of 2 models have no finished run under runs/demo/02_places_sweep (res18, res18-d5a)" in note
    assert "about 10 min at the demo profile" in note and "`dvc repro 02_places_sweep@demo`" in note
    (stage.runs / "res18" / "seed0").mkdir(parents=True)
    (stage.runs / "res18" / "seed0" / "final.pt").write_bytes(b"x")
    assert experiments.missing_runs(stage.runs, ["res18", "res18-d5a"], [0]) == ["res18-d5a"]
    assert experiments.missing_runs(stage.runs, ["res18"], [0, 1]) == ["res18"]  # seed 1 not trained
    assert experiments.checkpoint_manifest(stage.runs) == {
        "res18": {"seed0/final.pt": "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"}}


def test_a_notebook_reading_missing_runs_names_the_command(tmp_path, monkeypatch):
    import pytest

    from dka import experiments

    _project(tmp_path, monkeypatch)
    stage = experiments.setup("demo", "03_dissect", "dissect")
    with pytest.raises(FileNotFoundError, match=r"\['res18-d5a'\] have no finished run under "
                                                r"runs/demo/02_places_sweep: run 02_places_sweep first — "
                                                r"`dvc repro 02_places_sweep@demo` \(about 10 min"):
        experiments.require_runs(stage, "02_places_sweep", "places", ["res18-d5a"])
    with pytest.raises(FileNotFoundError, match=r"does not train: list in demo.dissect only models of demo.places"):
        experiments.require_runs(stage, "02_places_sweep", "places", ["res50"])
    final = stage.runs_of("02_places_sweep") / "res18-d5a" / "seed0" / "final.pt"
    final.parent.mkdir(parents=True)
    final.write_bytes(b"")
    assert experiments.require_runs(stage, "02_places_sweep", "places", ["res18-d5a"]) == final.parent.parent.parent
    assert experiments.recorded_duration(tmp_path, "demo", "01_cifar") is None  # never recorded
