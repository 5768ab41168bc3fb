"""The notebooks' training glue: torchrun command lines and section runs."""

from dka import train
from dka.experiments import final_sparsity, torchrun_argv, train_models


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
    assert [len(results[m].metrics) for m in ("res18", "res18-d2a")] == [2, 1]
    sparsity = final_sparsity(results["res18-d2a"])
    assert 0 <= sparsity["small"] <= 1 and 0 <= sparsity["never_routed"] <= 1
    assert final_sparsity(results["res18"])["never_routed"] != final_sparsity(results["res18"])["never_routed"]  # NaN
