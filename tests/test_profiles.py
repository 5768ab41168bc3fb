"""params.yaml is checked before anything runs, and a failing stage keeps the committed results (issue 15, 6-8)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from dka import pipeline, profiles, train
from dka.profiles import ParamsError, check_params, load_params

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "params.yaml").read_text()


def _params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def _edited(tmp_path: Path, edit) -> Path:
    params = yaml.safe_load(TEXT)
    edit(params)
    return _params(tmp_path, yaml.safe_dump(params, sort_keys=False))


def test_unknown_keys_wrong_types_and_bad_models_are_all_named(tmp_path):
    def edit(p):
        p["demo"]["cifar"]["train"]["lrr"] = 0.1            # a typo of a TrainConfig field
        p["demo"]["runtime"]["workers"] = "two"              # a wrong type
        p["demo"]["places"]["models"].append("res18-d5x")    # not a registry name
        p["smoke"]["dissect"]["iou_treshold"] = p["smoke"]["dissect"].pop("iou_threshold")
        p["paper"]["explain"]["models"] = ["res50"]          # 04 explains a model 03 did not dissect
    with pytest.raises(ParamsError) as info:
        check_params(_edited(tmp_path, edit))
    text = str(info.value)
    assert "nothing was run" in text
    assert "demo.cifar.train.lrr: unknown key; did you mean 'lr'?" in text
    assert "demo.runtime.workers: expected an integer, got str 'two'" in text
    bad = len(load_params(ROOT / "params.yaml")["demo"]["places"]["models"])  # the appended entry's index
    assert f"demo.places.models[{bad}] 'res18-d5x':" in text
    assert "smoke.dissect.iou_treshold: unknown key; did you mean 'iou_threshold'?" in text
    assert "smoke.dissect: missing" not in text  # the "did you mean" already says what is missing
    assert "paper.explain.models: 'res50' is not in paper.dissect.models" in text


def test_yaml_exponent_without_a_dot_names_the_field_and_the_fix(tmp_path):
    text = TEXT.replace("train: {preset: demo, width: 16, epochs: 5, save_checkpoint_epochs: last}   # 128",
                        "train: {preset: demo, width: 16, epochs: 5, lr: 1e-2, save_checkpoint_epochs: last}   # 128", 1)
    assert text != TEXT
    with pytest.raises(ParamsError, match=r"demo\.cifar\.train\.lr: expected a number, got str '1e-2'.*write 1\.0e-2"):
        check_params(_params(tmp_path, text))
    # the same check guards the Python API: the TypeError names the field instead of failing in the optimiser
    with pytest.raises(TypeError, match=r"^lr: .*write 1\.0e-2"):
        train.TrainConfig(model="res18", data="cifar10", out="x", lr="1e-2").resolved()
    with pytest.raises(TypeError, match=r"^epochs: expected an integer, got str '5': write the number without quotes"):
        train.TrainConfig(model="res18", data="cifar10", out="x", epochs="5").resolved()


def test_a_K_too_large_for_the_width_and_a_missing_layer_fail_the_check(tmp_path):
    def edit(p):
        p["smoke"]["places"]["models"].append("res18-d100a")  # width 8: 64 final features < K = 100
        p["demo"]["dissect"]["layer"] = "layer5"
    with pytest.raises(ParamsError) as info:
        check_params(_edited(tmp_path, edit))
    text = str(info.value)
    assert "smoke.places.models[4] 'res18-d100a':" in text and "100" in text
    assert "demo.dissect.layer: 'res18' has no layer 'layer5'" in text and "layer4" in text


def test_profile_choice_is_exact(tmp_path):
    path = _params(tmp_path, TEXT)
    assert check_params(path)[1] == "demo" and check_params(path, "smoke")[1] == "smoke"
    for wrong in ("profile", "dem", "runtime"):
        with pytest.raises(ParamsError, match=f"no profile '{wrong}'"):
            check_params(path, wrong)
    with pytest.raises(ParamsError, match="profile: 'demo2' is not a profile section"):
        check_params(_params(tmp_path, TEXT.replace("profile: demo", "profile: demo2", 1)))


def test_params_cli_prints_the_stage_names_or_every_problem(tmp_path, capsys):
    from dka.cli import main

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    path = _params(tmp_path, TEXT)
    assert main(["params", "--file", str(path), "--stages", "--profile", "smoke"]) == 0
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert capsys.readouterr().out.split() == [f"{stage}@smoke" for stage in stages]
    bad = _params(tmp_path, TEXT.replace("    seed: 0\n", "    seed: zero\n", 1))
    assert main(["params", "--file", str(bad), "--stages"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "smoke.runtime.seed: expected an integer, got str 'zero'" in captured.err


# ------------------------------------------------------------------------------ a failing stage


def _project(tmp_path: Path) -> Path:
    """A project with params.yaml, a notebook and committed results of 01_cifar@demo."""
    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    (root / "notebooks" / "01_cifar.ipynb").write_text("{}")
    (root / "params.yaml").write_text(TEXT)
    results = pipeline.results_dir(root, "01_cifar", "demo")
    results.mkdir(parents=True)
    for name in ("table1_cifar.csv", "fig4a_accuracy.png", "metrics.json"):
        (results / name).write_text(f"committed {name}\n")
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failing_stage_leaves_the_committed_results_as_they_were(tmp_path, capsys):
    root = _project(tmp_path)
    results = pipeline.results_dir(root, "01_cifar", "demo")
    before = _snapshot(results)

    def fails_halfway(argv, cwd):
        assert Path(cwd) == root and argv[-3:] == ["-p", "profile", "demo"]
        (results / "table1_cifar.csv").write_text("half-written\n")
        (results / "01_cifar.ipynb").write_text("{'error': 'TypeError'}")
        return 1

    assert pipeline.run_stage(root, "01_cifar", "demo", execute=fails_halfway) == 1
    assert _snapshot(results) == before
    failed = pipeline.failed_dir(root, "01_cifar", "demo")
    assert _snapshot(failed) == {"table1_cifar.csv": b"half-written\n", "01_cifar.ipynb": b"{'error': 'TypeError'}"}
    assert not pipeline.set_aside_dir(root, "01_cifar", "demo").exists()
    assert "kept as it was before the run" in capsys.readouterr().err

    def succeeds(argv, cwd):
        assert sorted(p.name for p in results.iterdir()) == []  # a fresh folder: no stale figure survives
        (results / "table1_cifar.csv").write_text("new\n")
        return 0

    assert pipeline.run_stage(root, "01_cifar", "demo", execute=succeeds) == 0
    assert _snapshot(results) == {"table1_cifar.csv": b"new\n"}
    assert sorted(p.name for p in results.parent.iterdir()) == ["01_cifar"]


def test_a_params_typo_stops_the_stage_before_its_results_are_touched(tmp_path):
    root = _project(tmp_path)
    (root / "params.yaml").write_text(TEXT.replace("    amp: false", "    ampp: false", 1))
    results = pipeline.results_dir(root, "01_cifar", "demo")
    before = _snapshot(results)

    def never(argv, cwd):
        raise AssertionError("the notebook ran although params.yaml is invalid")

    with pytest.raises(ParamsError, match=r"smoke\.runtime\.ampp: unknown key; did you mean 'amp'"):
        pipeline.run_stage(root, "01_cifar", "demo", execute=never)
    assert _snapshot(results) == before and sorted(p.name for p in results.parent.iterdir()) == ["01_cifar"]


def test_a_stage_the_profile_does_not_run_is_refused_before_anything_moves(tmp_path):
    """06 runs at `related_profiles` only: `python -m dka stage 06_related_methods --profile demo` must not
    execute a notebook whose params section the demo does not have."""
    root = _project(tmp_path)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "notebooks" / "06_related_methods.ipynb").write_text("{}")
    before = _snapshot(root)

    def never(argv, cwd):
        raise AssertionError("the notebook ran at a profile without its stage")

    with pytest.raises(ValueError, match=r"profile 'demo' has no stage '06_related_methods' in dvc\.yaml"):
        pipeline.run_stage(root, "06_related_methods", "demo", execute=never)
    assert _snapshot(root) == before
    assert "06_related_methods@demo-related" in pipeline.stage_names(root, "demo-related")


def test_profiles_module_lists_what_the_notebooks_read():
    import re

    read = {m for nb in (ROOT / "notebooks").glob("*.ipynb")
            for m in re.findall(r'experiments\.setup\(profile, \\"\w+\\", \\"(\w+)\\"', nb.read_text())}
    assert read == {"cifar", "places", "dissect", "explain", "internal", "related"}  # one section per notebook
    assert set(profiles.SECTIONS) == {"runtime"} | read
    assert "lr" not in profiles.RUNTIME_FIELDS and "seed" in profiles.RUNTIME_FIELDS


def test_runtime_takes_exactly_one_of_seed_and_seeds(tmp_path):
    def edit(p):
        assert p["cifar-cpu"]["runtime"]["seeds"] == [0, 1, 2]   # one run per seed: valid as it is
        p["demo"]["runtime"]["seeds"] = [0, 1]                   # both seed and seeds
        del p["smoke"]["runtime"]["seed"]                        # neither
        p["paper"]["runtime"]["seeds"] = [0, "1e0"]
        del p["paper"]["runtime"]["seed"]
    with pytest.raises(ParamsError) as info:
        check_params(_edited(tmp_path, edit))
    text = str(info.value)
    assert "demo.runtime: set exactly one of `seed: 0`" in text and "smoke.runtime: set exactly one" in text
    assert "paper.runtime.seeds: expected a non-empty list of integer seeds" in text
    assert "cifar-cpu" not in text


def test_the_profile_list_lives_in_dvc_yaml_and_must_match_the_sections(tmp_path):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    assert sorted(profiles.declared_profiles(tmp_path)) == sorted(profiles.profile_names(yaml.safe_load(TEXT)))
    path = _params(tmp_path, TEXT + "\npaper-copy:\n" + TEXT.split("\npaper:\n", 1)[1])
    with pytest.raises(ParamsError, match=r"paper-copy: no stages in dvc\.yaml; add `- paper-copy` to one of its "
                                          r"`vars:` lists \(profiles, related_profiles\)"):
        check_params(path)
    dvc = (tmp_path / "dvc.yaml").read_text()
    (tmp_path / "dvc.yaml").write_text(dvc.replace("      - smoke\n", "      - smoke\n      - paper-copy\n", 1))
    with pytest.raises(ParamsError, match=r"paper-copy\.related: no stage of this profile reads it; add "
                                          r"`- paper-copy` to dvc\.yaml's `related_profiles` list"):
        check_params(path)  # in `profiles` only: its `related` section would never run
    (tmp_path / "dvc.yaml").write_text(dvc.replace("      - smoke\n", "      - smoke\n      - paper-copy\n"))
    assert check_params(path)[0]["paper-copy"]["runtime"]["device"] == "cuda"  # in both lists: valid
    assert pipeline.stage_names(tmp_path, "paper-copy")[0] == "01_cifar@paper-copy"
    assert "06_related_methods@paper-copy" in pipeline.stage_names(tmp_path, "paper-copy")
    (tmp_path / "dvc.yaml").write_text(dvc.replace("      - smoke\n", "      - smoke\n      - smok\n", 1))
    with pytest.raises(ParamsError, match="dvc.yaml lists profile 'smok' but .* has no `smok:` section"):
        check_params(_params(tmp_path, TEXT))
