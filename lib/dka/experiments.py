"""The notebook glue: set a notebook up from params.yaml, train a section's models, the K slider.

Each notebook is narrative plus a few calls into this module, so that what the notebooks compute is
library code under test:

- `setup(profile, stage, section)` finds the project root, reads the profile's settings and returns a
  `Stage` (settings, results folder, runs folder);
- `train_models(stage, bundle)` trains every run of the section (`models:`, see `RunSpec`) with its recipe
  (`train:` = `dka.train.TrainConfig` fields, optional per-run `overrides`) under the profile's `runtime`,
  once per seed (`runtime.seeds`); a paper recipe first prints its cost (GPU-hours, disk) and refuses a
  short disk;
  finished runs are reused and interrupted ones resume; with `runtime.nproc_per_node > 1` each model
  trains under torchrun (DDP) in child processes and the finished run is then read back;
- `checkpoints(run_dir)` lists a run's per-epoch checkpoints by the epoch their payload records;
- `broden_root(stage)` is the Broden-format data a section's models are dissected on;
- `shared_data()` finds the optional ../shared/data folder of real files;
- `require_runs(stage, source, ...)` checks that another notebook's runs exist, or says which command
  makes them and how long it took when last recorded (`setup` says the same of a notebook's own runs);
- `k_slider(...)` / `interactive_figure(...)` show a figure with controls that redraw it in place
  (`SliderView`) in any kernel with ipywidgets; the default view alone elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml

from dka import plots, train
from dka.train import cost
from dka.checkpoint import load_checkpoint
from dka.progress import widgets_available

__all__ = ["Stage", "setup", "project_root", "RunSpec", "run_specs", "seeds_of", "train_models", "torchrun_argv",
           "final_sparsity", "final_payloads", "evaluate_runs", "dataset_label", "checkpoints", "checkpoint_manifest",
           "broden_root", "shared_data", "recorded_duration", "missing_runs", "require_runs", "interactive_figure", "k_slider",
           "SliderView"]


@dataclass(frozen=True)
class Stage:
    """What one notebook of one profile works with.

    Attributes:
        profile: the params.yaml section (smoke, demo, paper, ...).
        name: the notebook / DVC stage, e.g. "01_cifar".
        root: the project root (the folder holding dvc.yaml).
        params: the whole profile section.
        config: this notebook's part of it (e.g. `params[profile]["cifar"]`).
        runtime: the profile's `runtime` settings (device, workers, amp, seed, ...).
        out: `results/<profile>/<stage>/` — figures, tables, metrics (kept in git).
        runs: `runs/<profile>/<stage>/` — checkpoints (DVC cache, ignored by git).
        section: the key of the profile `config` is (e.g. "cifar").
    """

    profile: str
    name: str
    root: Path
    params: dict
    config: dict
    runtime: dict
    out: Path
    runs: Path
    section: str = ""

    def path(self, relative: str | os.PathLike) -> Path:
        """A path of params.yaml (relative to the project root) made absolute."""
        return self.root / relative

    def runs_of(self, stage: str) -> Path:
        """`runs/<profile>/<stage>/` of another notebook of this profile (e.g. 03 reads 02's runs)."""
        return self.root / "runs" / self.profile / stage


def project_root(start: Path | None = None) -> Path:
    """The folder holding dvc.yaml, searched upwards from `start` (default: the working directory)."""
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise FileNotFoundError(f"no dvc.yaml in {start} or above: run the notebook from inside the dka project")


def setup(profile: str, stage: str, section: str, params_file: str = "params.yaml") -> Stage:
    """Read `<profile>.<section>` of params.yaml, create the results folder, apply the figure style.

    Args:
        profile: a section of params.yaml (the notebook's papermill parameter).
        stage: the notebook's name, e.g. "02_places_sweep".
        section: the key of the profile this notebook reads, e.g. "places".
        params_file: the settings file, relative to the project root.
    """
    root = project_root()
    params = yaml.safe_load((root / params_file).read_text())
    profiles = [k for k, v in params.items() if isinstance(v, dict)]
    if profile not in profiles:
        raise KeyError(f"profile {profile!r} is not a section of {params_file}; choose one of {profiles}")
    if section not in params[profile]:
        raise KeyError(f"{params_file} has no {profile}.{section} section (notebook {stage} reads it)")
    out = root / "results" / profile / stage
    out.mkdir(parents=True, exist_ok=True)
    plots.use_style()
    print(f"profile {profile}: results -> {out.relative_to(root)}")
    result = Stage(profile=profile, name=stage, root=root, params=params[profile], config=params[profile][section],
                   runtime=params[profile]["runtime"], out=out, runs=root / "runs" / profile / stage,
                   section=section)
    note = _training_note(result)
    if note:
        print(note)
    return result


def torchrun_argv(config: train.TrainConfig, nproc: int) -> list[str]:
    """The `torchrun -m dka train ...` command line that runs `config` on `nproc` processes."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "dka", "train",
            *train.config_to_argv(config)]


@dataclass(frozen=True)
class RunSpec:
    """One entry of a section's `models`: the run's name, its registry model, its recipe changes.

    An entry is a registry name (run name = model name) or a mapping ``{run: NAME, model: REGISTRY NAME,
    <TrainConfig fields>...}``, e.g. ``{run: res18-l1-x4, model: res18-l1, l1: 8.0e-3}`` for a λ sweep.
    """

    name: str
    model: str
    overrides: dict


def run_specs(section: Mapping[str, Any]) -> list[RunSpec]:
    """The section's runs in order, with `overrides[<run>]` merged into each entry's own settings."""
    specs, seen = [], set()
    for entry in section["models"]:
        if isinstance(entry, str):
            name, model, own = entry, entry, {}
        elif isinstance(entry, Mapping) and "run" in entry and "model" in entry:
            own = {k: v for k, v in entry.items() if k not in ("run", "model")}
            name, model = str(entry["run"]), str(entry["model"])
        else:
            raise ValueError(f"a `models` entry must be a model name or {{run: NAME, model: NAME, ...}}; got {entry!r}")
        if name in seen:
            raise ValueError(f"run {name!r} appears twice in `models`; give each entry its own `run` name")
        seen.add(name)
        specs.append(RunSpec(name, model, {**own, **section.get("overrides", {}).get(name, {})}))
    return specs


def seeds_of(runtime: Mapping[str, Any], section: Mapping[str, Any] | None = None) -> list[int]:
    """The seeds every run trains with: the section's own `seeds` (a notebook whose comparison needs more
    seeds than the profile's others, e.g. 06), else `runtime.seeds`, else `[runtime.seed]`."""
    if section is not None and section.get("seeds"):
        return [int(s) for s in section["seeds"]]
    seeds = runtime.get("seeds")
    return [int(s) for s in seeds] if seeds else [int(runtime["seed"])]


def train_models(section: Mapping[str, Any] | Stage, runtime: Mapping[str, Any] | None = None,
                 runs_dir: str | Path | None = None, root: str | Path | None = None,
                 bundle=None) -> dict[str, list[train.RunResult]]:
    """Train every run of a params.yaml section for every seed; returns run name -> [RunResult per seed].

    Call it as ``train_models(stage, bundle)`` from a notebook, or with the section's pieces
    (``section, runtime, runs_dir, root``). `runs_dir/<run>/seed<k>/` holds each run; `root` is the folder
    `section["root"]` is relative to; `bundle` (a dka.data.DataBundle) is shared by all runs. Finished
    runs are reused and interrupted ones resume. Before a paper recipe (`preset: paper*`) trains anything,
    the cost of the runs still to train is measured and printed (`dka.train.cost`), and nothing starts when
    the disk is short.
    """
    stage = None
    if isinstance(section, Stage):
        stage, bundle = section, runtime if bundle is None else bundle
        section, runtime, runs_dir, root = stage.config, stage.runtime, stage.runs, stage.root
    runs_dir = Path(runs_dir)
    if runtime.get("fresh_runs") and runs_dir.exists():
        shutil.rmtree(runs_dir)
    nproc = int(runtime.get("nproc_per_node", 1))
    planned = [(spec, seed, train.TrainConfig(
        model=spec.model, data=section["dataset"], data_root=str(Path(root) / section["root"]),
        out=str(runs_dir / spec.name / f"seed{seed}"), device=runtime["device"], workers=runtime["workers"],
        amp=runtime["amp"], seed=seed, **{**section["train"], **spec.overrides}))
        for spec in run_specs(section) for seed in seeds_of(runtime, section)]
    pending = [(f"{spec.name}/seed{seed}", config) for spec, seed, config in planned
               if not (Path(config.out) / "final.pt").is_file()]
    if pending and str(section["train"].get("preset", "")).startswith("paper"):
        if bundle is None:
            from dka import data

            bundle = data.build_loaders(section["dataset"], Path(root) / section["root"], batch_size=64, workers=0,
                                        device=runtime["device"])
        features, folder = _dissection_features(stage) if stage is not None else (0, None)
        estimate = cost.estimate(pending, bundle, runs_dir, nproc, features, folder)
        print(estimate.report(), flush=True)
        cost.require_disk(estimate)  # before the first step, not at epoch 80
    results: dict[str, list[train.RunResult]] = {}
    for spec, seed, config in planned:
        if nproc > 1:
            subprocess.run(torchrun_argv(config, nproc), check=True)
        results.setdefault(spec.name, []).append(train.run(config, bundle=bundle))
    return results


# Broden's size when it is not downloaded yet (broden1_224/index.csv rows with a label of the dissected categories).
BRODEN_IMAGES = 63_305


def _dissection_features(stage: Stage) -> tuple[int, Path | None]:
    """Bytes of the largest feature store 03_dissect keeps on disk (0 when it fits the memory budget) and
    the folder it goes to. Only the section 03 dissects (`places`) has one."""
    import inspect
    import tempfile

    from dka import models
    from dka.dissection import dissect

    dissect_cfg = stage.params.get("dissect")
    if stage.section != "places" or not dissect_cfg or not dissect_cfg.get("models"):
        return 0, None
    index = stage.path(dissect_cfg["broden_root"]) / "index.csv"
    if index.is_file():
        with open(index) as f:
            images = sum(1 for _ in f) - 1
    else:
        images = BRODEN_IMAGES
    width = stage.config["train"].get("width") or train.PRESETS[train.resolve_preset(
        stage.config["train"].get("preset", "demo"), stage.config["dataset"])]["width"]
    with torch.device("meta"):
        units = max(models.build(name, num_classes=10, width=width).num_features for name in dissect_cfg["models"])
    size = images * units * 7 * 7 * 4  # layer4 of a 224 px Broden image: 7 x 7 float32 per unit
    budget = inspect.signature(dissect).parameters["memory_budget"].default
    return (size, Path(tempfile.gettempdir())) if size > budget else (0, None)


def final_payloads(results: Mapping[str, Sequence[train.RunResult]]) -> dict[str, list[dict]]:
    """{run: [its final.pt payload per seed]} (weights, config, the last epoch's routing masks)."""
    return {run: [load_checkpoint(r.final_path) for r in runs] for run, runs in results.items()}


def evaluate_runs(results: Mapping[str, Sequence[train.RunResult]], loader, device: str = "cpu"):
    """{run: [`dka.evaluation.Collected` per seed]}: one pass of each final model over `loader`'s images."""
    from dka.evaluation import collect
    from dka.models import load_model

    out = {}
    for run, runs in results.items():
        out[run] = []
        for r in runs:
            config = load_checkpoint(r.final_path)["config"]
            out[run].append(collect(load_model(r.final_path, map_location=device), loader, device,
                                    amp=bool(config["amp"]), channels_last=bool(config["channels_last"])))
    return out


def dataset_label(section: Mapping[str, Any], stage: Stage) -> str:
    """How figures and tables name a section's data: real data by name (the CIFAR-10 JPEG copy says so),
    concept scenes as the stand-in they are."""
    name = section["dataset"]
    if name == "cifar10":
        from dka.data import cifar

        return "CIFAR-10 (JPEG copy)" if cifar.detect_format(stage.path(section["root"])) == "folder" else "CIFAR-10"
    stands_in = {"scenes-demo32": "CIFAR-10", "scenes-demo64": "Places365", "scenes-smoke": "a smoke test"}
    if name in stands_in:
        return f"{name} (concept scenes, stand-in for {stands_in[name]})"
    return {"places365": "Places365"}.get(name, name)


def final_sparsity(result: train.RunResult) -> dict[str, float]:
    """Both sparsity measures of the final layer after training (never_routed: NaN for a dense head)."""
    last = result.metrics[-1]
    return {"small": float(last["sparsity"]["head"]),
            "never_routed": float(last.get("never_routed", {}).get("head", float("nan")))}


def checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """A run's per-epoch model checkpoints (`checkpoint_epochEEE.pt`), keyed by the epoch each records."""
    found = {}
    for path in sorted(Path(run_dir).glob("checkpoint_epoch*.pt")):
        found[int(load_checkpoint(path)["epoch"])] = path
    return dict(sorted(found.items()))


def checkpoint_manifest(runs_dir: str | Path) -> dict[str, dict[str, str]]:
    """run -> {checkpoint file relative to the run, e.g. `seed0/final.pt`: sha256} of every `.pt` file.

    02 writes it next to its results (committed) and 03/04 depend on it in dvc.yaml: it changes exactly
    when a checkpoint does, and a fresh clone has it where it has no runs/.
    """
    from dka.data.download import file_digest

    runs_dir = Path(runs_dir)
    return {run.name: {p.relative_to(run).as_posix(): file_digest(p) for p in sorted(run.rglob("*.pt"))}
            for run in sorted(runs_dir.iterdir()) if run.is_dir()} if runs_dir.is_dir() else {}


def broden_root(stage: Stage) -> Path:
    """The Broden-format data a training section's models are dissected on.

    A concept-scenes training set is its own Broden export; a real training set (CIFAR-10, Places365) is not,
    so its models are dissected on the profile's `dissect.broden_root` (broden1_224 at the paper profile).
    """
    if str(stage.config["dataset"]).startswith("scenes-"):
        return stage.path(stage.config["root"])
    dissect_cfg = stage.params.get("dissect") or {}
    if "broden_root" not in dissect_cfg:
        raise KeyError(f"{stage.profile}.{stage.section} trains on {stage.config['dataset']}, which is not in "
                       f"Broden format: set {stage.profile}.dissect.broden_root to a Broden folder (broden1_224)")
    return stage.path(dissect_cfg["broden_root"])


def shared_data() -> Path | None:
    """The optional folder of real data beside the project (``$DKA_SHARED_DATA`` or ../shared/data)."""
    path = Path(os.environ.get("DKA_SHARED_DATA") or project_root().parent / "shared" / "data")
    return path if path.is_dir() else None


def recorded_duration(root: str | Path, profile: str, stage: str) -> float | None:
    """Seconds the recorded execution of a stage took (papermill's metadata of its executed notebook)."""
    path = Path(root) / "results" / profile / stage / f"{stage}.ipynb"
    try:
        return float(json.loads(path.read_text())["metadata"]["papermill"]["duration"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _about(seconds: float | None, profile: str) -> str:
    if seconds is None:
        return f"no recorded run of the {profile} profile to time it by"
    amount = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
    return f"about {amount} at the {profile} profile when last recorded"


def missing_runs(runs_dir: str | Path, runs: Sequence[str], seeds: Sequence[int]) -> list[str]:
    """The runs without a finished run for every seed (`<runs_dir>/<run>/seed<k>/final.pt`)."""
    return [r for r in runs if not all((Path(runs_dir) / r / f"seed{s}" / "final.pt").is_file() for s in seeds)]


def _training_note(stage: Stage) -> str | None:
    """What a first execution of a training notebook will do and how long it takes; None when nothing."""
    if not isinstance(stage.config, Mapping) or not stage.config.get("models") or "train" not in stage.config \
            or stage.runtime.get("fresh_runs"):
        return None
    models = [spec.name for spec in run_specs(stage.config)]
    missing = missing_runs(stage.runs, models, seeds_of(stage.runtime))
    if not missing:
        return None
    took = _about(recorded_duration(stage.root, stage.profile, stage.name), stage.profile)
    return (f"{len(missing)} of {len(models)} models have no finished run under "
            f"{stage.runs.relative_to(stage.root)} ({', '.join(missing)}): running this notebook trains them "
            f"({took}; finished runs are reused). In a terminal, `dvc repro {stage.name}@{stage.profile}` trains "
            f"and records them; profile = \"smoke\" runs in seconds, with untrained models.")


def require_runs(stage: Stage, source: str, source_section: str, models: Sequence[str]) -> Path:
    """`runs/<profile>/<source>/`, after checking that every model in `models` finished there.

    Raises FileNotFoundError naming the command that trains the missing runs and how long it took when
    last recorded, or the settings to fix when a model is not trained by `source` at all.
    """
    folder = stage.runs_of(source)
    missing = missing_runs(folder, models, seeds_of(stage.runtime))
    if not missing:
        return folder
    section = stage.params.get(source_section, {})
    trained = [spec.name for spec in run_specs(section)] if section.get("models") else []
    foreign = [m for m in missing if m not in trained]
    if foreign:
        raise FileNotFoundError(f"{stage.name} reads {foreign}, which {source} does not train: list in "
                                f"{stage.profile}.{stage.section or '<section>'} only models of "
                                f"{stage.profile}.{source_section}.models ({trained})")
    took = _about(recorded_duration(stage.root, stage.profile, source), stage.profile)
    raise FileNotFoundError(
        f"{missing} have no finished run under {folder.relative_to(stage.root)}: run {source} first — "
        f"`dvc repro {source}@{stage.profile}` ({took}), or execute notebooks/{source}.ipynb with "
        f"profile = {stage.profile!r}")


class SliderView:
    """A figure redrawn in place by widget controls: what `interactive_figure` shows in a kernel.

    The figure is one display output that every change of a control replaces (`update_display_data`,
    which JupyterLab, Notebook, VS Code and Colab all honour): one drawing per change, nothing left above
    or below it. `redraw()` is the controls' callback, callable directly (tests, scripts).

    Attributes:
        controls: control name -> its ipywidgets control (`.value` is the current choice).
        box: the row of controls that was displayed.
        handle: the IPython display handle of the figure.
        redraws: how many times the figure was redrawn since it was shown.
    """

    def __init__(self, draw: Callable[..., Any], controls: Mapping[str, Any], box: Any, handle: Any):
        self.draw, self.controls, self.box, self.handle = draw, dict(controls), box, handle
        self.redraws = 0
        for control in self.controls.values():
            control.observe(self.redraw, names="value")

    def choice(self) -> dict[str, Any]:
        """The controls' current values, as keyword arguments of `draw`."""
        return {name: control.value for name, control in self.controls.items()}

    def redraw(self, change: Any = None):
        """Draw the current choice and replace the displayed figure with it; returns the new figure."""
        import matplotlib.pyplot as plt
        from IPython.display import Markdown

        try:
            fig = self.draw(**self.choice())
        except Exception as err:
            self.handle.update(Markdown(f"**Could not draw {self.choice()}:** `{type(err).__name__}: {err}`"))
            raise
        self.handle.update(fig)
        plt.close(fig)  # or the inline backend shows it a second time
        self.redraws += 1
        return fig


def _control(widgets, name: str, choices: Sequence, value: Any, slider: bool):
    common = {"options": list(choices), "value": value, "description": name.replace("_", " "),
              # "initial": the label takes the width it needs instead of being cut at ~80 px
              "style": {"description_width": "initial"}}
    if slider:
        # redraw once on release: a drag over several values would otherwise queue one slow redraw per value
        return widgets.SelectionSlider(continuous_update=False, layout=widgets.Layout(width="360px"), **common)
    return widgets.Dropdown(layout=widgets.Layout(width="max-content"), **common)


def interactive_figure(draw: Callable[..., Any], options: Mapping[str, Sequence], defaults: Mapping[str, Any],
                       sliders: Sequence[str] = (), save_to: str | Path | None = None) -> SliderView | None:
    """Show ``draw(**defaults)``, with controls that redraw it in place where widgets can run.

    Controls appear whenever the code runs in a kernel with ipywidgets (`dka.progress.widgets_available`);
    elsewhere, and under DKA_WIDGETS=0 (the pipeline's recorded notebooks), the default view is shown alone.

    Args:
        draw: ``draw(**choice) -> Figure`` for one choice of every control.
        options: control name -> its choices (values, or (label, value) pairs).
        defaults: control name -> the value drawn first (and saved to `save_to`).
        sliders: controls shown as a slider (the others as drop-downs).
        save_to: where the default view is saved as PNG.

    Returns:
        The `SliderView` (None when no widgets were created).
    """
    import matplotlib.pyplot as plt
    from IPython.display import DisplayHandle, display

    from dka.results import save_figure

    missing = [name for name in options if name not in defaults]
    if missing:
        raise ValueError(f"no default value for the controls {missing}; give one in `defaults`")
    fig = draw(**defaults)
    if save_to is not None:
        save_figure(fig, save_to)
    if not widgets_available():
        display(fig)
        plt.close(fig)
        return None
    import ipywidgets as widgets

    controls = {name: _control(widgets, name, choices, defaults[name], name in sliders)
                for name, choices in options.items()}
    box = widgets.HBox(list(controls.values()), layout=widgets.Layout(flex_flow="row wrap"))
    display(box)
    handle = DisplayHandle()  # a handle of our own: `display(..., display_id=True)` returns None outside IPython
    handle.display(fig)
    plt.close(fig)
    return SliderView(draw, controls, box, handle)


def k_slider(draw: Callable[..., Any], ks: Sequence[int], k_default: int, compare: Sequence[str],
             compare_default: str, save_to: str | Path | None = None) -> SliderView | None:
    """The K-sweep view: ``draw(K, compare_with) -> Figure`` with a K slider and a model chooser."""
    return interactive_figure(draw, {"K": sorted(ks), "compare_with": list(compare)},
                              {"K": k_default, "compare_with": compare_default}, sliders=("K",), save_to=save_to)
