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
