"""The DVC pipeline, params.yaml and the notebooks agree with each other and with the library.

These checks catch the mistakes that otherwise surface only 20 minutes into `dvc repro`: a stage whose
notebook was renamed, a profile missing a setting a notebook reads, a K larger than the head's inputs at
that profile's width, a notebook committed with outputs or without smoke defaults.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

from dka import data, experiments, models, pipeline, profiles, train

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PROFILES = [k for k, v in PARAMS.items() if isinstance(v, dict)]
ALL_STAGES = DVC["stages"]
# one stage per notebook, plus `claims`, which gathers their claim records into results/<profile>/claims.md
STAGES = {name: stage for name, stage in ALL_STAGES.items() if name != "claims"}
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# What each notebook reads from its profile section (a missing key would fail only at run time).
SECTION_KEYS = {section: set(keys) - profiles.OPTIONAL.get(section, set()) for section, keys in profiles.SECTIONS.items()}
TRAINED = ("cifar", "places", "internal", "related")
# dvc.yaml's profile lists: `profiles` run 01-05 and claims, `related_profiles` run 06
LISTS = {name: value for entry in DVC["vars"] for name, value in entry.items()}
MEMBERS = profiles.stage_profiles(ROOT)  # stage -> the profiles it runs at


def _sections(profile: str) -> list[str]:
    return [s for s in TRAINED if s in PARAMS[profile]]


def _resolve(text: str, profile: str) -> str:
    return text.replace("${item}", profile)


def _stage_params(stage: dict) -> list[str]:
    return [p for p in stage["do"]["params"]]


def test_default_profile_is_demo_and_profiles_are_complete():
    assert PARAMS["profile"] == "demo"
    assert {"smoke", "demo", "paper"} <= set(PROFILES)
    for profile in PROFILES:
        assert set(PARAMS[profile]) == profiles.required_sections(ROOT, profile), profile
        for section, keys in SECTION_KEYS.items():
            if section not in PARAMS[profile]:
                continue
            missing = keys - set(PARAMS[profile][section])
            assert not missing, f"{profile}.{section} lacks {sorted(missing)}"
        runtime = PARAMS[profile]["runtime"]
        assert ("seed" in runtime) != ("seeds" in runtime), f"{profile}.runtime needs one of seed / seeds"


def test_every_stage_runs_its_notebook_at_every_profile():
    assert sorted(STAGES) == sorted(nb.stem for nb in NOTEBOOKS)
    assert set(LISTS) == {"profiles", "related_profiles"}
    assert sorted({p for names in LISTS.values() for p in names}) == sorted(PROFILES), \
        "dvc.yaml's profile lists must hold exactly params.yaml's profile sections"
    assert {"smoke", "paper", "paper-dryrun"} <= set(LISTS["profiles"]) & set(LISTS["related_profiles"])
    for name, stage in STAGES.items():
        assert stage["foreach"] == ("${related_profiles}" if name == "06_related_methods" else "${profiles}"), name
        do = stage["do"]
        notebook = f"notebooks/{name}.ipynb"
        assert (ROOT / notebook).is_file()
        assert do["cmd"] == f"python -m dka stage {name} --profile ${{item}}"
        assert notebook in do["deps"] and "lib/dka" in do["deps"]
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in do["outs"]]
        results = f"results/${{item}}/{name}"
        assert results in outs
        # committed results: not in DVC's cache, and not deleted by DVC before the stage runs
        assert {"cache": False, "persist": True} in [o[results] for o in do["outs"] if isinstance(o, dict) and results in o]
        for out in outs:
            assert out.startswith(("results/${item}/", "runs/${item}/")), out
    assert pipeline.notebook_command("02_places_sweep", "demo")[1:] == [
        "-m", "papermill", "--log-output", "--cwd", "notebooks", "notebooks/02_places_sweep.ipynb",
        "results/demo/02_places_sweep/02_places_sweep.ipynb", "-p", "profile", "demo"]
    assert pipeline.NOTEBOOK_ENV == {"DKA_WIDGETS": "0"}  # recorded notebooks carry no dead slider widgets


def test_params_yaml_passes_its_own_check():
    params, selected = profiles.check_params(ROOT / "params.yaml")
    assert selected == "demo" and profiles.profile_names(params) == PROFILES


def test_stage_params_exist_in_every_profile():
    for name, stage in STAGES.items():
        for key in _stage_params(stage):
            for profile in MEMBERS[name]:
                node = PARAMS
                for part in _resolve(key, profile).split("."):
                    assert isinstance(node, dict) and part in node, f"{name}: {_resolve(key, profile)} missing"
                    node = node[part]


def test_downstream_stages_depend_on_the_outputs_they_read():
    outs = {name: {next(iter(o)) if isinstance(o, dict) else o for o in stage["do"]["outs"]}
            for name, stage in STAGES.items()}
    for name, stage in STAGES.items():
        for dep in stage["do"]["deps"]:
            if dep.startswith(("runs/", "results/")):
                assert any(dep == o or dep.startswith(o + "/") for written in outs.values() for o in written), \
                    f"{name} depends on {dep}, which no stage writes"
    # 03/04 read 02's checkpoints; they depend on its manifest, which a fresh clone has (`dvc repro --dry`)
    for name in ("03_dissect", "04_instance_explain"):
        assert "results/${item}/02_places_sweep/checkpoints.json" in STAGES[name]["do"]["deps"]
        assert not [d for d in STAGES[name]["do"]["deps"] if d.startswith("runs/")]
    assert "results/${item}/03_dissect" in STAGES["04_instance_explain"]["do"]["deps"]


def test_metrics_and_plots_are_declared_for_dvc():
    main = [name for name in STAGES if MEMBERS[name] == LISTS["profiles"]]  # `${profile}` is one of `profiles`
    assert DVC["metrics"] == [f"results/${{profile}}/{name}/metrics.json" for name in main]
    for plot in DVC["plots"]:
        path = Path(plot if isinstance(plot, str) else next(iter(plot)))
        assert path.parts[:2] == ("results", "${profile}") and path.parts[2] in main and path.suffix == ".png"
        source = (ROOT / "notebooks" / f"{path.parts[2]}.ipynb").read_text()
        assert path.name in source or path.name.startswith("fig6_graph_"), f"no notebook writes {path}"


@pytest.mark.parametrize("profile", PROFILES)
def test_models_fit_their_profile(profile):
    """Every model name parses, every K fits the width, every train recipe resolves."""
    p = PARAMS[profile]
    for section in _sections(profile):
        cfg = p[section]
        assert cfg["dataset"] in data.DATASETS, f"{profile}.{section}.dataset"
        runs = experiments.run_specs(cfg)  # a models entry is a name or {run, model, <recipe changes>}
        for run in runs:
            spec = models.parse_name(run.model)
            fields = {**cfg["train"], **run.overrides}
            resolved = train.TrainConfig(model=run.model, data=cfg["dataset"], out="unused", **fields).resolved()
            with torch.device("meta"):  # shapes only: no memory, no time
                models.build(run.model, num_classes=10, width=resolved.width)  # raises when a K is out of range
            if section == "places":
                assert resolved.save_checkpoint_epochs, f"{profile}: 03_dissect needs checkpoints of {run.name}"
            assert spec.name == run.model
        assert set(cfg.get("overrides", {})) <= {run.name for run in runs}
    if "cifar" not in p:
        return
    ks = [models.parse_name(run.model).head_k for run in experiments.run_specs(p["cifar"])]
    assert p["cifar"]["slider_default"] in ks, "the 01 slider default must be a trained K"
    ks = [models.parse_name(n).head_k for n in p["places"]["models"]]
    assert p["places"]["slider_default"] in ks, "the 02 slider default must be a trained K"
    assert any(models.parse_name(n).internal_k for n in p["internal"]["models"])


@pytest.mark.parametrize("profile", LISTS["profiles"])
def test_downstream_model_lists_come_from_02(profile):
    p = PARAMS[profile]
    trained = set(p["places"]["models"])
    assert set(p["dissect"]["models"]) <= trained
    assert set(p["dissect"]["over_training"]) <= trained
    for name in p["dissect"]["over_training"]:  # Fig. 5(c) is a curve: several checkpoints, from the start
        fields = {**p["places"]["train"], **p["places"].get("overrides", {}).get(name, {})}
        epochs = train.TrainConfig(model=name, data=p["places"]["dataset"], out="unused", **fields).resolved()
        assert len(epochs.save_checkpoint_epochs) >= 3 and epochs.save_checkpoint_epochs[0] == 0, name
    assert set(p["explain"]["models"]) <= set(p["dissect"]["models"]), "04 reads the tallies 03 writes"
    assert 0 < p["dissect"]["weight_share"] <= 1 and 0 < p["internal"]["weight_share"] <= 1


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean_with_smoke_defaults_and_checks(notebook):
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{notebook.name} is stored with outputs"
        ast.parse(cell.source)  # every cell is valid Python (no magics)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], "the first code cell is the only `parameters` cell"
    defaults = {}
    exec(tagged[0].source, {}, defaults)  # plain assignments
    assert defaults == {"profile": "smoke", "params_file": "params.yaml"}
    checks = [c for c in code if "nbval-check" in c.metadata.get("tags", [])]
    assert checks and all("assert " in c.source for c in checks), "a deterministic `nbval-check` cell"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_dvc_ignores_bytecode_so_lib_hash_is_stable():
    ignored = (ROOT / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


@pytest.mark.skipif(shutil.which("dvc", path=str(Path(sys.executable).parent)) is None, reason="dvc not installed")
def test_dvc_resolves_the_templated_stages():
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent))
    out = subprocess.run([dvc, "stage", "list"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    assert names == [f"{stage}@{profile}" for stage in ALL_STAGES for profile in MEMBERS[stage]]
    for profile in PROFILES:  # what `make repro PROFILE=...` reproduces
        assert pipeline.stage_names(ROOT, profile) == [f"{stage}@{profile}" for stage in ALL_STAGES
                                                       if profile in MEMBERS[stage]]
    assert "06_related_methods@demo" not in names and "06_related_methods@demo-related" in names


def test_claims_stage_reads_every_notebook_that_records_claims():
    """`dvc repro` rewrites results/<profile>/claims.md whenever a notebook's claims.json changes."""
    stage = ALL_STAGES["claims"]["do"]
    recorded = sorted(nb.stem for nb in NOTEBOOKS if "claims.record(" in nb.read_text())
    assert recorded, "no notebook records a claim"
    assert sorted(d.split("/")[2] for d in stage["deps"] if d.endswith("/claims.json")) == recorded
    assert stage["cmd"] == "python -m dka claims --results results/${item}"
