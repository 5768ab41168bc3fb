"""params.yaml checked as a whole before any pipeline stage runs: unknown keys, wrong types, bad models.

A typo in a profile used to surface minutes into `dvc repro`, inside a notebook, after DVC had deleted
the stage's committed results. `check_params` reads every profile against `SECTIONS` (what each
notebook reads), builds every model on the meta device at its recipe's width (a K larger than its layer,
or a dissected layer that does not exist, fails here in milliseconds), resolves every training recipe
(`dka.train.TrainConfig`, whose type check names the fix for YAML's `1e-2` string), and checks that the
notebooks' model lists fit together. All problems are reported at once, each with its dotted path.
`python -m dka params` runs it; `make repro` and every pipeline stage call it first.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from dka import models
from dka.data import DATASETS
from dka.data.loaders import RECOMMENDED_STEMS
from dka.train import TrainConfig
from dka.train.config import type_problem

__all__ = ["ParamsError", "check_params", "load_params", "profile_names", "declared_profiles", "profile_lists",
           "stage_profiles", "required_sections", "SECTIONS", "OPTIONAL",
           "RUNTIME_FIELDS"]

# TrainConfig fields a profile sets outside `train:` (the section's dataset and root, the runtime).
RUNTIME_FIELDS = ("model", "data", "data_root", "out", "device", "workers", "amp", "seed")
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


class ParamsError(ValueError):
    """params.yaml has problems; the message lists each with its dotted path and the fix."""


Check = Callable[[Any], "str | None"]


def _typed(kind: str, low: float | None = None, high: float | None = None, low_open: bool = False) -> Check:
    def check(value):
        problem = type_problem(value, kind)
        if problem:
            return problem
        if low is not None and (value <= low if low_open else value < low):
            return f"must be {'>' if low_open else '>='} {low}, got {value}"
        if high is not None and value > high:
            return f"must be <= {high}, got {value}"
        return None
    return check


def _dataset(value):
    if value not in DATASETS:
        return f"unknown dataset {value!r}; valid: {', '.join(DATASETS)}"
    return None


def _device(value):
    problem = type_problem(value, "str")
    if problem or not _DEVICE.match(value):
        return problem or f"unknown device {value!r}; valid: cpu, cuda, cuda:N, mps"
    return None


def _amp(value):
    """amp: true/false, or null for "bf16 where the CPU has fast bf16" (dka.train's automatic choice)."""
    return None if value is None else type_problem(value, "bool")


def _seeds(value):
    if not isinstance(value, list) or not value or any(type_problem(v, "int") for v in value):
        return f"expected a non-empty list of integer seeds, e.g. [0, 1, 2], got {value!r}"
    if len(set(value)) != len(value):
        return f"repeats a seed: {value!r}"
    return None


def _name_list(value):
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        return f"expected a non-empty list of model names, got {value!r}"
    return None


def _run_list(value):
    """A trained section's `models`: registry names, or {run: NAME, model: REGISTRY NAME, <train fields>}."""
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of model names or {{run, model, ...}} entries, got {value!r}"
    names = []
    for entry in value:
        if isinstance(entry, dict):
            if not isinstance(entry.get("run"), str) or not isinstance(entry.get("model"), str):
                return f"an entry that is a mapping needs `run:` and `model:` names, got {entry!r}"
            names.append(entry["run"])
        elif isinstance(entry, str):
            names.append(entry)
        else:
            return f"expected a model name or a {{run, model, ...}} mapping, got {entry!r}"
    repeated = sorted({n for n in names if names.count(n) > 1})
    return f"run names repeat: {repeated}; give each entry its own `run`" if repeated else None


def _rules(value):
    from dka.dissection import RULES

    return None if value in RULES else f"unknown dissection rules {value!r}; valid: {', '.join(sorted(RULES))}"


def _split(value):
    """dissect.split: the Broden index's split to dissect (held-out images), or null for every image."""
    return None if value is None else type_problem(value, "str")


def _posthoc(value):
    if not isinstance(value, list) or not all(isinstance(v, dict) and {"name", "run", "method"} <= set(v)
                                              for v in value):
        return f"expected a list of {{name, run, method}} entries, got {value!r}"
    return None


_INT, _POSITIVE, _BOOL, _STR = _typed("int"), _typed("int", 1), _typed("bool"), _typed("str")
_SHARE = _typed("float", 0, 1, low_open=True)
_TRAINED = {"dataset": _dataset, "root": _STR, "models": _run_list, "train": _typed("dict"),
            "overrides": _typed("dict")}

# What each notebook reads from its section. `train` and `overrides` are checked against TrainConfig too.
SECTIONS: dict[str, dict[str, Check]] = {
    "runtime": {"device": _device, "workers": _typed("int", 0), "amp": _amp, "seed": _INT,
                "seeds": _seeds, "fresh_runs": _BOOL, "nproc_per_node": _POSITIVE},
    "cifar": {**_TRAINED, "slider_default": _POSITIVE},
    "places": {**_TRAINED, "slider_default": _POSITIVE},
    "dissect": {"broden_root": _STR, "caffe": _BOOL, "rules": _rules, "split": _split, "layer": _STR,
                "batch_size": _POSITIVE, "models": _name_list,
                "over_training": _name_list, "iou_threshold": _typed("float", 0, 1), "top_units": _POSITIVE,
                "weight_share": _SHARE, "max_concepts": _POSITIVE, "graph_classes": _POSITIVE,
                "reference_tally": _STR},
    "explain": {"models": _name_list, "num_images": _POSITIVE, "top_units": _POSITIVE, "seed": _INT},
    "internal": {**_TRAINED, "dissect_batch_size": _POSITIVE, "weight_share": _SHARE, "max_concepts": _POSITIVE},
    "related": {**_TRAINED, "seeds": _seeds, "posthoc": _posthoc, "eval_images": _POSITIVE,
                "example_images": _POSITIVE},
}
# Keys a section may leave out; `runtime` has exactly one of `seed` (one run per model) and `seeds` (one per seed).
OPTIONAL = {"runtime": {"seed", "seeds"}, "cifar": {"overrides"}, "internal": {"overrides"},
            "related": {"overrides", "seeds", "posthoc"}}


def _close(key, valid) -> str | None:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return close[0] if close else None


def _unknown(path: str, key: str, valid) -> str:
    close = _close(key, valid)
    hint = f"did you mean {close!r}? " if close else ""
    return f"{path}.{key}: unknown key; {hint}valid keys: {', '.join(valid)}"


def load_params(path: str | Path) -> dict:
    """params.yaml as a dict; a ParamsError naming the line for YAML that does not parse."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"no {path}: run from the dka project root (the folder holding dvc.yaml)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(params, dict):
        raise ParamsError(f"{path} must be a mapping of `profile:` and profile sections")
    return params


def profile_names(params: dict) -> list[str]:
    """The profile sections of params.yaml (every top-level mapping)."""
    return [k for k, v in params.items() if isinstance(v, dict)]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What dvc.yaml says about profiles, read once: its `vars:` lists, each stage's profiles and sections."""

    lists: dict[str, list[str]]     # `profiles` (01-05 and claims), `related_profiles` (06)
    members: dict[str, list[str]]   # stage -> the profiles of the list its `foreach: ${...}` names
    reads: dict[str, set[str]]      # stage -> the params sections it tracks (`${item}.<section>...`)
    list_of: dict[str, str]         # stage -> the name of its list

    @classmethod
    def read(cls, root: str | Path) -> "_Layout | None":
        path = Path(root) / "dvc.yaml"
        if not path.is_file():
            return None
        dvc = yaml.safe_load(path.read_text()) or {}
        lists = {}
        for entry in dvc.get("vars", []):
            if isinstance(entry, dict):
                lists.update({k: [str(v) for v in names] for k, names in entry.items() if isinstance(names, list)})
        members, reads, list_of = {}, {}, {}
        for name, stage in (dvc.get("stages") or {}).items():
            ref = str(stage.get("foreach", ""))
            if ref.startswith("${") and ref.endswith("}"):
                list_of[name] = ref[2:-1]
                members[name] = lists.get(ref[2:-1], [])
                reads[name] = {str(param).split(".")[1] for param in stage.get("do", {}).get("params", [])
                               if str(param).startswith("${item}.")}
        return cls(lists, members, reads, list_of)

    def declared(self) -> list[str]:
        """Every profile of the `vars:` lists, in order."""
        return list(dict.fromkeys(p for names in self.lists.values() for p in names))

    def sections(self, profile: str) -> set[str]:
        return {s for stage, names in self.members.items() if profile in names for s in self.reads[stage]}

    def reading_list(self, section: str) -> str:
        """The `vars:` list whose stages read `section` (where a profile is added to run them)."""
        return next((self.list_of[stage] for stage, read in self.reads.items()
                     if section in read and self.list_of[stage] in self.lists), "profiles")


def profile_lists(root: str | Path) -> dict[str, list[str]]:
    """dvc.yaml's `vars:` profile lists by name: `profiles` (notebooks 01-05 and the claims table) and
    `related_profiles` (06, sized on its own: three seeds of seven methods would double the demo's time)."""
    layout = _Layout.read(root)
    return layout.lists if layout else {}


def stage_profiles(root: str | Path) -> dict[str, list[str]]:
    """Each dvc.yaml stage's profiles (the list its `foreach: ${...}` names)."""
    layout = _Layout.read(root)
    return layout.members if layout else {}


def declared_profiles(root: str | Path) -> list[str]:
    """The profiles dvc.yaml defines stages for: every profile of its `vars:` lists, in order."""
    layout = _Layout.read(root)
    return layout.declared() if layout else []


def required_sections(root: str | Path, profile: str) -> set[str] | None:
    """The params sections `profile`'s stages read (`${item}.<section>` in their params); None without dvc.yaml."""
    layout = _Layout.read(root)
    return layout.sections(profile) if layout else None


def _declared_problems(path: Path, profiles: list[str], layout: _Layout | None) -> list[str]:
    """A profile section without stages in dvc.yaml (or the reverse) would be silently never run."""
    if layout is None:
        return []
    declared = layout.declared()
    problems = [f"{name}: no stages in dvc.yaml; add `- {name}` to one of its `vars:` lists "
                f"({', '.join(layout.lists)})" for name in profiles if name not in declared]
    problems += [f"dvc.yaml lists profile {name!r} but {path} has no `{name}:` section; add the section or "
                 "remove the line" for name in declared if name not in profiles]
    return problems


@functools.lru_cache(maxsize=None)
def _modules_of(name: str, width: int, stem: str, options: tuple) -> tuple[str, ...] | str:
    """The module names of `name` built at `width` (shapes only, on the meta device), or why it fails."""
    try:
        with torch.device("meta"):
            net = models.build(name, num_classes=2, stem=stem, width=width, **dict(options))
    except (ValueError, KeyError, TypeError) as err:
        return str(err).strip('"')
    return tuple(n for n, _ in net.named_modules())


def _build_problem(name: str, cfg: TrainConfig, dataset, layer: str | None = None) -> str | None:
    """Why `name` cannot be built with recipe `cfg` (or has no module `layer`); None when it can."""
    stem = cfg.stem or RECOMMENDED_STEMS.get(dataset, "cifar")
    found = _modules_of(name, int(cfg.width), stem, tuple(sorted(cfg.model_options.items())))
    if isinstance(found, str):
        return found
    if layer is not None and layer not in found:
        tops = [n for n in found if n and "." not in n]
        return f"has no layer {layer!r} to dissect; its top-level modules: {', '.join(tops)}"
    return None


def _recipe(path: str, fields: dict, model: str, dataset: str, problems: list[str]) -> TrainConfig | None:
    """The resolved TrainConfig of `model` with `fields`, or None after recording why it does not resolve."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUNTIME_FIELDS]
    bad = False
    for key in fields:
        if key in RUNTIME_FIELDS:
            problems.append(f"{path}.{key}: set by the profile (the section's dataset/root, or runtime), not in train")
            bad = True
        elif key not in names:
            problems.append(_unknown(path, key, names))
            bad = True
    if bad:
        return None
    try:
        return TrainConfig(model=model, data=dataset, out="unused", **fields).resolved()
    except (TypeError, ValueError) as err:
        problems.append(f"{path}.{err}" if re.match(r"^\w+: ", str(err)) else f"{path}: {err}")
        return None


def _check_trained(path: str, section: dict, problems: list[str]) -> dict[str, TrainConfig]:
    """Recipes of a trained section's models, each resolved and each model built at its width."""
    recipes = {}
    if not isinstance(section.get("models"), list) or not isinstance(section.get("train"), dict):
        return recipes
    overrides = section.get("overrides") or {}
    if isinstance(overrides, dict):
        for name in overrides:
            runs = [e["run"] if isinstance(e, dict) else e for e in section["models"]]
            if name not in runs:
                problems.append(f"{path}.overrides.{name}: not one of {path}.models")
    dataset = section.get("dataset")
    for i, entry in enumerate(section["models"]):
        own = {}
        if isinstance(entry, dict) and isinstance(entry.get("run"), str) and isinstance(entry.get("model"), str):
            own = {k: v for k, v in entry.items() if k not in ("run", "model")}
            run_name, entry = entry["run"], entry["model"]
        elif isinstance(entry, str):
            run_name = entry
        else:
            continue
        name = entry
        extra = {**own, **(overrides.get(run_name, {}) if isinstance(overrides, dict) else {})}
        where = f"{path}.overrides.{name}" if extra else f"{path}.train"
        if not isinstance(extra, dict):
            problems.append(f"{path}.overrides.{name}: expected a mapping of train fields, got {extra!r}")
            continue
        cfg = _recipe(where, {**section["train"], **extra}, name, str(dataset), problems)
        if cfg is None:
            continue
        problem = _build_problem(name, cfg, dataset)
        if problem:
            problems.append(f"{path}.models[{i}] {name!r}: {problem}")
            continue
        recipes[run_name] = cfg
    return recipes


def _check_profile(profile: str, p: dict, problems: list[str], layout: _Layout | None = None) -> None:
    """One profile's sections: those its stages read are required, no others allowed (without a dvc.yaml
    beside params.yaml, or for a profile it does not list: `runtime` and the sections the profile has)."""
    required = layout.sections(profile) if layout is not None else None
    for key in p:
        if key not in SECTIONS:
            problems.append(_unknown(profile, key, SECTIONS))
    for section, schema in SECTIONS.items():
        path = f"{profile}.{section}"
        if required is not None and section not in required:
            if section in p:
                problems.append(f"{path}: no stage of this profile reads it; add `- {profile}` to dvc.yaml's "
                                f"`{layout.reading_list(section)}` list, or remove the section")
            continue
        if section not in p and (required is not None or section == "runtime"):
            problems.append(f"{path}: missing (notebooks read {', '.join(schema)})")
        if section not in p:
            continue
        values = p[section]
        if not isinstance(values, dict):
            problems.append(f"{path}: expected a mapping, got {values!r}")
            continue
        for key, value in values.items():
            if key not in schema:
                problems.append(_unknown(path, key, schema))
            else:
                problem = schema[key](value)
                if problem:
                    problems.append(f"{path}.{key}: {problem}")
        meant = {_close(k, schema) for k in values if k not in schema}  # already named as "did you mean"
        missing = [k for k in schema if k not in values and k not in OPTIONAL.get(section, ()) and k not in meant]
        if missing:
            problems.append(f"{path}: missing {', '.join(missing)}")
        if section == "runtime" and ("seed" in values) == ("seeds" in values):
            problems.append(f"{path}: set exactly one of `seed: 0` (one run per model) or `seeds: [0, 1, 2]` "
                            "(one run per model and seed)")
    _check_together(profile, p, problems)


def _section(p: dict, name: str) -> dict:
    value = p.get(name)
    return value if isinstance(value, dict) else {}


def _models(section: dict, key: str = "models") -> list[str]:
    value = section.get(key)
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _check_together(profile: str, p: dict, problems: list[str]) -> None:
    """Recipes resolve, models build, and the notebooks' model lists and sliders fit each other."""
    recipes = {}
    for section in ("cifar", "places", "internal", "related"):
        recipes[section] = _check_trained(f"{profile}.{section}", _section(p, section), problems)
        default = _section(p, section).get("slider_default")
        trained_k = {models.parse_name(cfg.model).head_k for cfg in recipes[section].values()}
        if section in ("cifar", "places") and isinstance(default, int) and recipes[section] and default not in trained_k:
            problems.append(f"{profile}.{section}.slider_default: {default} is not the K of a trained model "
                            f"(trained: {sorted(k for k in trained_k if k)})")
    places, dissect, explain = _models(_section(p, "places")), _section(p, "dissect"), _section(p, "explain")
    for key, source, among in (("dissect.models", _models(dissect), places),
                               ("dissect.over_training", _models(dissect, "over_training"), places),
                               ("explain.models", _models(explain), _models(dissect))):
        for name in source:
            if name not in among:
                origin = "places.models (03 dissects 02's checkpoints)" if key.startswith("dissect") else \
                    "dissect.models (04 reads 03's tallies)"
                problems.append(f"{profile}.{key}: {name!r} is not in {profile}.{origin}")
    layer = dissect.get("layer")
    for name in _models(dissect):
        cfg = recipes["places"].get(name)
        if cfg is not None and isinstance(layer, str):
            problem = _build_problem(name, cfg, _section(p, "places").get("dataset"), layer)
            if problem:
                problems.append(f"{profile}.dissect.layer: {name!r} {problem}")
                break


def check_params(path: str | Path = "params.yaml", profile: str | None = None) -> tuple[dict, str]:
    """Validate every profile of params.yaml; returns (params, the selected profile).

    `profile` (default: the file's `profile:` line) must name a profile section exactly. Raises
    ParamsError listing every problem with its dotted path (e.g. `demo.cifar.train.lr`) and the fix.
    """
    params = load_params(path)
    profiles = profile_names(params)
    problems: list[str] = []
    for key, value in params.items():
        if key != "profile" and not isinstance(value, dict):
            problems.append(f"{key}: unknown top-level key (params.yaml holds `profile:` and profile sections)")
    default = params.get("profile")
    if not isinstance(default, str) or default not in profiles:
        problems.append(f"profile: {default!r} is not a profile section; choose one of {', '.join(profiles)}")
    layout = _Layout.read(Path(path).parent)
    problems += _declared_problems(Path(path), profiles, layout)
    declared = layout.declared() if layout else []
    for name in profiles:
        _check_profile(name, params[name], problems, layout if name in declared else None)
    selected = default if profile is None else profile
    if profile is not None and profile not in profiles:
        problems.append(f"no profile {profile!r} in {path}; profiles: {', '.join(profiles)}")
    problems = list(dict.fromkeys(problems))  # a recipe shared by several models is reported once
    if problems:
        raise ParamsError(f"{path} has {len(problems)} problem{'s' if len(problems) > 1 else ''}; nothing was "
                          "run:\n  " + "\n  ".join(problems))
    return params, selected
