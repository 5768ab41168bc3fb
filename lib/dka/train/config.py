"""The training configuration: one dataclass, the named recipes, and the command line generated from it.

`TrainConfig` is the single source of a run's settings. Its fields carry their own help text, so the
`python -m dka train` parser (`build_parser`) and its inverse (`config_to_argv`, used to launch the same
run under torchrun) are generated from it and cannot drift apart. Fields left as None take the named
recipe's value (`PRESETS`); `resolved()` fills and validates them, and the resolved config is what a
run stores in its checkpoints and prints when it starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from dka.models import STEMS

__all__ = ["TrainConfig", "PRESETS", "SCHEDULES", "OPTIMIZERS", "LOSSES", "resolve_preset", "bf16_is_fast",
           "build_parser", "config_from_args", "config_to_argv", "plain", "type_problem"]

# Epoch lists accept ints and the token "last" (= the final epoch); "all" and "none" as strings.
PRESETS: dict[str, dict[str, Any]] = {
    # The authors' CIFAR recipe (paper, Sec. 4): 200 epochs, lr x0.1 at epochs 70 and 140.
    "paper-cifar": dict(
        optimizer="sgd", loss="cross-entropy",
        epochs=200, lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=256, schedule="step",
        milestones=(70, 140), gamma=0.1, warmup_epochs=0, l1=5e-4, width=64,
        save_head_epochs="all", save_checkpoint_epochs="0,1,5,10,25,50,100,150,last",
    ),
    # The authors' Places365 script: 90 epochs, lr x0.1 every 30, weight decay 1e-4.
    "paper-places": dict(
        optimizer="sgd", loss="cross-entropy",
        epochs=90, lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=256, schedule="step",
        milestones=(30, 60), gamma=0.1, warmup_epochs=0, l1=1e-4, width=64,
        save_head_epochs="all", save_checkpoint_epochs="0,1,2,5,10,20,30,45,60,last",
    ),
    # CPU recipe: one-epoch linear warmup + cosine decay. A step schedule needs ~3 phases of several
    # epochs each to converge; cosine anneals smoothly to 0 within any budget, so the last epochs already
    # see a small lr. Warmup protects BatchNorm nets from lr 0.1 on a fresh init. L1 2e-3: strong enough
    # to sparsify a head within ~1k steps.
    "demo": dict(
        optimizer="sgd", loss="cross-entropy",
        epochs=12, lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=128, schedule="cosine",
        milestones=(), gamma=0.1, warmup_epochs=1, l1=2e-3, width=16,
        save_head_epochs="all", save_checkpoint_epochs="0,1,2,4,8,last",
    ),
    # CI smoke recipe: a couple of epochs of a few steps each.
    "smoke": dict(
        optimizer="sgd", loss="cross-entropy",
        epochs=2, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=32, schedule="cosine",
        milestones=(), gamma=0.1, warmup_epochs=0, l1=2e-3, width=8, max_steps_per_epoch=4,
        max_eval_steps=4, save_head_epochs="all", save_checkpoint_epochs="0,last",
    ),
    # CoDA-Nets' CIFAR-10 recipe (moboehle/CoDA-Nets, experiments/CIFAR10/final): Adam at 2.5e-4, no weight
    # decay, batch 16, 200 epochs, lr / 1.5 every 30 epochs, binary cross-entropy on one-hot targets; the
    # paper's network is coda-cifar at width 16.
    "coda-paper": dict(
        optimizer="adam", loss="bce", epochs=200, lr=2.5e-4, momentum=0.9, weight_decay=0.0, batch_size=16,
        schedule="step", milestones=(30, 60, 90, 120, 150, 180), gamma=1 / 1.5, warmup_epochs=0, l1=0.0,
        width=16, save_head_epochs="none", save_checkpoint_epochs="0,1,5,10,25,50,100,150,last",
    ),
    # CPU recipe for coda-s (width 8) on the 32 px concept scenes, ~2 min per model on 2 cores: the paper's
    # optimiser and loss, a larger lr and batch for a budget of a few epochs, cosine decay. Measured in
    # bench/coda_paper_checks.py (lr 5e-3 reached 80 % in 3 epochs at T=100 where 2e-3 reached 74 %).
    "coda-demo": dict(
        optimizer="adam", loss="bce", epochs=3, lr=5e-3, momentum=0.9, weight_decay=0.0, batch_size=64,
        schedule="cosine", milestones=(), gamma=0.1, warmup_epochs=0.5, l1=0.0, width=8,
        save_head_epochs="none", save_checkpoint_epochs="0,last",
    ),
}
SCHEDULES = ("step", "cosine", "constant")
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("cross-entropy", "bce")

# Optional fields, added after runs were first fingerprinted, and their neutral values: the values that
# reproduce the behaviour from before the field existed. A field at a neutral value is left out of the
# fingerprint, so adding such a field to TrainConfig keeps older runs resumable. (`optimizer` and `loss`
# are None before a preset resolves them, "sgd" and "cross-entropy" after.)
_OPTIONAL: dict[str, tuple] = {
    "head_weight_decay": (None,),
    "model_options": (None, {}),
    "optimizer": (None, "sgd"),
    "loss": (None, "cross-entropy"),
}
# Fields that do not change what is computed: a resume may change them freely.
# skip_corrupt: a run that met a corrupt image must be resumable with --skip-corrupt added; what data it
# trains on is checked by the dataset identity stored in the checkpoint (dka.data.identity).
_NOT_FINGERPRINTED = frozenset({
    "out", "data_root", "workers", "device", "progress", "compile", "threads",
    "save_head_epochs", "save_checkpoint_epochs", "skip_corrupt",
})
# Fields holding a list of epochs or ints: a comma-separated string or a list.
_LIST_FIELDS = ("milestones", "save_head_epochs", "save_checkpoint_epochs")


def _is_neutral(value: Any, neutral: tuple) -> bool:
    """`value` is one of the `neutral` values (compared by type too: 0.0 is not None, False is not 0)."""
    return any(value is n or (type(value) is type(n) and value == n) for n in neutral)


def _opt(help_: str, **extra) -> Any:
    """A dataclass field default of None with its command-line help (and parser extras)."""
    return field(default=None, metadata={"help": help_, **extra})


def bf16_is_fast(device: str | None) -> bool:
    """Whether bf16 autocast speeds training up on `device` (None = CUDA if available, else CPU).

    On GPUs it does. On CPUs only with native bf16 instructions (AVX512-BF16 or AMX): elsewhere
    PyTorch emulates bf16 and a width-16 ResNet18 step measured ~3x slower than fp32 (2-core AVX512
    machine: 290 vs 880 img/s); with AVX512-BF16 it measured 1.4x faster (1,100 vs 800 img/s).
    """
    kind = (device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    if kind != "cpu":
        return True
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_preset(preset: str, data: str) -> str:
    """`paper` means the paper's recipe for the dataset: Places365's for places365, CIFAR's otherwise."""
    if preset == "paper":
        return "paper-places" if data.startswith("places") else "paper-cifar"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: paper, {', '.join(PRESETS)}")
    return preset


def _parse_epochs(spec, epochs: int, clip: bool = False) -> tuple[int, ...]:
    """"all" | "none" | "0,1,5,last" | iterable of ints -> sorted tuple within [0, epochs]."""
    if spec is None or spec == "none" or spec == "":
        return ()
    if spec == "all":
        return tuple(range(epochs + 1))
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for item in items:
        item = str(item).strip()
        try:
            value = epochs if item == "last" else int(item)
        except ValueError:
            raise ValueError(f"{item!r} in {spec!r} is neither an epoch number nor 'last'") from None
        if clip and value > epochs:
            continue
        if not 0 <= value <= epochs:
            raise ValueError(f"epoch {value} in {spec!r} is outside [0, {epochs}] (0 = before training)")
        out.add(value)
    return tuple(sorted(out))


def _parse_ints(spec) -> tuple[int, ...]:
    if spec is None or spec == "" or spec == "none":
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        return tuple(int(str(x).strip()) for x in items)
    except ValueError:
        raise ValueError(f"{spec!r} is not a list of integers like 70,140") from None


def plain(obj):
    """Tuples -> lists recursively, so configs compare equal after a JSON/pickle round trip."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


@dataclass
class TrainConfig:
    """One training run. Fields left as None take the preset's value (see `PRESETS`).

    Accuracies in metrics are percentages (0-100, as in the paper's tables); `sparsity` and
    `never_routed` are shares (0-1). `batch_size` is the global batch (split over DDP ranks).
    """

    model: str = field(metadata={"help": "registry name, e.g. res18-d5a (dka.models.list_models())"})
    data: str = field(metadata={"help": "cifar10 | places365 | scenes-smoke | scenes-demo32 | scenes-demo64"})
    out: str = field(metadata={"help": "run directory (metrics.jsonl, checkpoint.pt, final.pt, ...)"})
    data_root: str | None = _opt("dataset directory (concept scenes are generated there when missing)")
    preset: str = field(default="demo", metadata={
        "help": "named recipe that fills every field left unset: paper (= paper-cifar or paper-places by "
                "dataset) | " + " | ".join(PRESETS)})
    width: int | None = _opt("ResNet base width (64 = the paper's networks)")
    stem: str | None = _opt("model stem (default: the dataset's recommended one)", choices=STEMS)
    epochs: int | None = _opt("training epochs")
    optimizer: str | None = _opt("sgd (momentum, the paper's) | adam (the CoDA-Nets recipe)", choices=OPTIMIZERS)
    loss: str | None = _opt("classification loss: cross-entropy | bce (binary cross-entropy on one-hot targets, "
                            "averaged over classes: the CoDA-Nets recipe)", choices=LOSSES)
    lr: float | None = _opt("base learning rate")
    momentum: float | None = _opt("SGD momentum (unused by adam)")
    weight_decay: float | None = _opt("weight decay (coupled: added to the gradient, for sgd and adam)",
                                      aliases=("--wd",))
    head_weight_decay: float | None = _opt(
        "weight decay of the final layer only (default: --weight-decay); see the README on sparsity")
    batch_size: int | None = _opt("global batch size (split over DDP processes)", aliases=("--batch",))
    schedule: str | None = _opt("learning-rate schedule", choices=SCHEDULES)
    milestones: tuple[int, ...] | str | None = _opt("epochs where lr is multiplied by --gamma (step schedule), "
                                                    "e.g. 70,140")
    gamma: float | None = _opt("lr factor at each milestone (step schedule)")
    warmup_epochs: float | None = _opt("epochs of linear lr warmup")
    l1: float | None = _opt("L1 strength on the head weights (res18-l1 / res50-l1 models)")
    model_options: dict | None = _opt("a build option of the model family, KEY=VALUE (repeatable), e.g. "
                                      "temperature=1000")
    amp: bool | None = _opt("bf16 autocast (default: where bf16 is fast, see bf16_is_fast)")
    channels_last: bool | None = _opt("channels_last memory format (default: on)")
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    workers: int | None = _opt("DataLoader workers (default: 0 on CPU, up to 8 on GPU)")
    seed: int = field(default=0, metadata={"help": "seed of the initialisation, data order and augmentation"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic algorithms (bit-exact resume)"})
    device: str | None = _opt("cpu | cuda | cuda:N (default: cuda when available)")
    save_head_epochs: Any = _opt('epochs whose final layer is saved: "all", "none" or a list like 0,1,5,last')
    save_checkpoint_epochs: Any = _opt('epochs whose model is saved: "all", "none" or a list like 0,10,last')
    max_steps_per_epoch: int | None = _opt("cap on optimiser steps per epoch (smoke runs)")
    max_eval_steps: int | None = _opt("cap on evaluation batches (smoke runs)")
    augment: bool = field(default=True, metadata={"help": "the dataset's training augmentation"})
    sync_bn: bool = field(default=True, metadata={
        "help": "pool BatchNorm statistics across DDP processes (exact global-batch equivalence)"})
    threads: int | None = _opt("CPU threads (default: cores / local processes)")
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    skip_corrupt: bool = field(default=False, metadata={
        "help": "skip images that cannot be decoded instead of stopping: each is warned, their number is "
                "printed and stored per epoch in metrics.jsonl (skipped_images); may be added on resume"})

    def __post_init__(self) -> None:
        """Each number field holds its annotated type, whatever the source wrote: a float field given an
        integer (YAML's `warmup_epochs: 1`, a preset's `0`) holds a float, so the same recipe has one
        fingerprint however its numbers were spelled. Values of other types are left for `check_types`."""
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))

    def resolved(self) -> TrainConfig:
        """A copy with every preset-driven field filled in and validated."""
        self.check_types()
        preset_name = resolve_preset(self.preset, self.data)
        preset = PRESETS[preset_name]
        values = dataclasses.asdict(self)
        values["preset"] = preset_name
        from_preset = set()
        for key, value in preset.items():
            if values.get(key) is None:
                values[key] = value
                from_preset.add(key)
        values["amp"] = bf16_is_fast(values["device"]) if values["amp"] is None else bool(values["amp"])
        values["channels_last"] = True if values["channels_last"] is None else bool(values["channels_last"])
        try:
            values["milestones"] = _parse_ints(values["milestones"])
        except ValueError as err:
            raise ValueError(f"milestones: {err}") from None
        values["model_options"] = dict(values["model_options"] or {})
        epochs = int(values["epochs"])
        for key in ("save_head_epochs", "save_checkpoint_epochs"):
            # a preset's list is cut to a shortened run; a list the user gave must fit it
            try:
                values[key] = _parse_epochs(values[key], epochs, clip=key in from_preset)
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
        cfg = TrainConfig(**values)
        cfg._validate()
        return cfg

    def check_types(self) -> None:
        """A TypeError naming the field, the value and the fix for a value of the wrong type.

        Settings often come from YAML, which reads `1e-2` (no decimal point) as the string "1e-2": that
        would otherwise fail deep inside the optimiser with an error that names no field.
        """
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            kind = "list" if f.name in _LIST_FIELDS else _base_type(f.type)
            problem = type_problem(value, kind)
            if problem:
                raise TypeError(f"{f.name}: {problem}")

    def _validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1 or None; got {self.max_steps_per_epoch}")
        if self.l1 < 0:
            raise ValueError(f"l1 strength must be >= 0; got {self.l1}")
        if self.head_weight_decay is not None and self.head_weight_decay < 0:
            raise ValueError(f"head_weight_decay must be >= 0 or None; got {self.head_weight_decay}")

    def fingerprint_fields(self) -> dict:
        """The settings that decide what a run computes. An optional field left at its neutral value
        (`_OPTIONAL`) is left out, so adding such a field to TrainConfig keeps older runs resumable."""
        return {k: v for k, v in plain(dataclasses.asdict(self)).items()
                if k not in _NOT_FINGERPRINTED and not (k in _OPTIONAL and _is_neutral(v, _OPTIONAL[k]))}

    def fingerprint(self) -> str:
        return _digest(self.fingerprint_fields())

    def matches_fingerprint(self, stored: str | None) -> bool:
        """Whether a run recorded with fingerprint `stored` has this recipe.

        Runs recorded before float fields were coerced hashed an integral value as it was written (`1` or
        `1.0`); every such spelling of this recipe's integral float values is accepted, so those runs
        resume and are reused instead of being retrained.
        """
        if stored is None:
            return False
        fields = self.fingerprint_fields()
        if stored == _digest(fields):
            return True
        integral = [k for k in _FLOAT_FIELDS if isinstance(fields.get(k), float) and fields[k].is_integer()]
        for chosen in itertools.chain.from_iterable(
                itertools.combinations(integral, n) for n in range(1, len(integral) + 1)):
            if stored == _digest({**fields, **{k: int(fields[k]) for k in chosen}}):
                return True
        return False

    def summary(self) -> str:
        """The resolved recipe in one line, printed when a run starts."""
        keys = ("model", "data", "preset", "width", "epochs", "optimizer", "loss", "batch_size", "lr", "momentum",
                "weight_decay", "head_weight_decay", "schedule", "milestones", "warmup_epochs", "l1", "model_options",
                "amp", "seed")
        return " ".join(f"{k}={getattr(self, k)}" for k in keys if getattr(self, k) not in (None, {}, ()))


def _digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The command line, generated from the fields


def _base_type(annotation: str) -> str:
    """'int | None' -> 'int'; the field types are strings under `from __future__ import annotations`."""
    parts = [p.strip() for p in annotation.split("|") if p.strip() != "None"]
    return parts[0] if len(parts) == 1 else "str"


# Fields annotated `float`: an integer given to one is stored as a float (TrainConfig.__post_init__).
_FLOAT_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if _base_type(f.type) == "float")


_KIND_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "dict": "a mapping of KEY: VALUE", "list": "a list or a comma-separated string"}


def type_problem(value, kind: str) -> str | None:
    """Why `value` is not of `kind` (int, float, bool, str, dict, list) and how to write it; None if it is."""
    fits = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "dict": isinstance(value, dict),
        "list": isinstance(value, (str, list, tuple)),
    }.get(kind, True)
    if fits:
        return None
    problem = f"expected {_KIND_NAMES[kind]}, got {type(value).__name__} {value!r}"
    if isinstance(value, str) and kind in ("int", "float"):
        try:
            float(value)
        except ValueError:
            return problem
        mantissa, _, exponent = value.lower().partition("e")
        if kind == "float" and exponent and "." not in mantissa:
            return (f"{problem}: YAML reads {value} (a number with an exponent but no decimal point) as text; "
                    f"write {mantissa}.0e{exponent}")
        return f"{problem}: write the number without quotes"
    return problem


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m dka train` parser: one option per TrainConfig field, help and defaults included."""
    p = argparse.ArgumentParser(
        prog="python -m dka train",
        description="Train a dka registry model (res18, res18-l1, res18-d5a, res18-d[32,32,5]a, res50, ...). "
                    "Re-running the same command resumes an interrupted run; a finished run is left as is. "
                    "Multi-GPU: torchrun --nproc_per_node=N -m dka train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *f.metadata.get("aliases", ())]
        kind = _base_type(f.type)
        required = f.default is dataclasses.MISSING
        common = {"dest": f.name, "help": f.metadata.get("help", "")}
        if required:
            p.add_argument(*names, required=True, **common)
        elif kind == "bool":
            p.add_argument(*names, action=argparse.BooleanOptionalAction, default=f.default, **common)
        elif kind == "dict":
            flag = "--" + f.name.replace("_", "-").rstrip("s")  # --model-option KEY=VALUE, repeatable
            p.add_argument(flag, action="append", type=_key_value, default=None, **common)
        else:
            convert = {"int": int, "float": float}.get(kind, str)
            p.add_argument(*names, type=convert, default=f.default, choices=f.metadata.get("choices"), **common)
    return p


def config_from_args(argv: list[str]) -> TrainConfig:
    """The TrainConfig a `python -m dka train` command line describes."""
    args = vars(build_parser().parse_args(argv))
    if args.get("model_options") is not None:
        args["model_options"] = dict(args["model_options"])
    return TrainConfig(**args)


def config_to_argv(config: TrainConfig) -> list[str]:
    """The inverse of `config_from_args`: the command-line options that describe `config`."""
    argv = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict):
            for key, item in value.items():
                argv += [flag.rstrip("s"), f"{key}={json.dumps(item)}"]
        elif value is not None:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return argv

