"""The paper profile's code paths end to end at toy size: `make test-paper-dryrun` (part of `make test`).

Writes tiny CIFAR-10 (torchvision batches), Places365 (easy-format folders) and broden1_224 (the real
metadata from ../shared/data, generated images) under data/paper-dryrun/, then executes the five notebooks
with papermill at the `paper-dryrun` profile of params.yaml: width 64, ResNet50 and res18-d[32,32,5]a, the
ImageNet stem at 224 px, the step schedule, DataLoader workers, bf16 autocast and torchrun with 2 processes
(gloo). Runs and results start empty each time. Without the Broden metadata, 03-05 (which dissect on
Broden) are skipped with a message. Afterwards it checks what the notebooks cannot see: that each model
really trained under 2 processes, with the stem and width of the paper, and that the cost estimate was
printed. Exit status 0 when everything passed.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROFILE = "paper-dryrun"
NOTEBOOKS = ("01_cifar", "02_places_sweep", "03_dissect", "04_instance_explain", "05_internal_layers")
NEEDS_BRODEN = {"03_dissect", "04_instance_explain", "05_internal_layers"}


def write_data(root: Path, meta: Path | None) -> None:
    sys.path.insert(0, str(HERE))
    import paper_formats

    shutil.rmtree(root, ignore_errors=True)
    paper_formats.write_cifar10(root / "cifar10")
    paper_formats.write_places365(root / "places365")
    if meta is not None:
        paper_formats.write_broden(root / "broden1_224", meta)


def check_runs() -> list[str]:
    """What the notebooks' own checks cannot see: the runs' process count, stem, width and schedule."""
    import torch

    from dka.checkpoint import load_checkpoint

    problems = []
    for stage in ("01_cifar", "02_places_sweep", "05_internal_layers"):
        for ckpt in sorted((ROOT / "runs" / PROFILE / stage).glob("*/seed*/checkpoint.pt")):
            state = load_checkpoint(ckpt)
            run = ckpt.parent.relative_to(ROOT)
            if len(state["rng"]) != 2:
                problems.append(f"{run}: trained by {len(state['rng'])} process(es), not torchrun's 2")
            model = load_checkpoint(ckpt.parent / "final.pt")
            kwargs, config = model.get("build_kwargs", {}), model["config"]
            stem = "cifar" if stage == "01_cifar" else "imagenet"
            if kwargs.get("stem", stem) != stem or kwargs.get("width", 64) != 64 or config["width"] != 64:
                problems.append(f"{run}: stem {kwargs.get('stem')} width {kwargs.get('width')}, expected {stem}, 64")
            lrs = [row["lr"] for row in state["metrics"]]
            if config["schedule"] != "step" or (len(lrs) > 1 and not lrs[1] < lrs[0]):
                problems.append(f"{run}: schedule {config['schedule']} with lr per epoch {lrs}: no step decay")
    return problems


def main() -> int:
    started = time.perf_counter()
    try:
        import papermill
    except ImportError:
        print("paper dry run: papermill is not installed (make setup installs it)", file=sys.stderr)
        return 1
    sys.path.insert(0, str(HERE))
    from paper_formats import broden_meta

    lib = str(ROOT / "lib")
    os.environ["PYTHONPATH"] = os.pathsep.join([lib, *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path.insert(0, lib)
    os.environ.update(DKA_WIDGETS="0", MPLBACKEND="Agg")
    meta = broden_meta()
    write_data(ROOT / "data" / PROFILE, meta)
    for folder in ("runs", "results"):
        shutil.rmtree(ROOT / folder / PROFILE, ignore_errors=True)
    print(f"paper dry run: data written in {time.perf_counter() - started:.1f} s", flush=True)

    timings, failed = {}, None
    for name in NOTEBOOKS:
        if name in NEEDS_BRODEN and meta is None:
            print(f"paper dry run: {name} skipped: no Broden metadata (../shared/data/broden1_224_meta or "
                  f"$DKA_SHARED_DATA/broden1_224_meta)", flush=True)
            continue
        out = ROOT / "results" / PROFILE / name / f"{name}.ipynb"
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(out),
                                       parameters={"profile": PROFILE}, cwd=str(ROOT / "notebooks"),
                                       progress_bar=False, kernel_name="python3")
        except Exception as err:  # papermill's error carries the failing cell and its traceback
            print(f"paper dry run: {name} FAILED after {time.perf_counter() - t0:.0f} s (executed notebook: "
                  f"{out.relative_to(ROOT)})\n{err}", file=sys.stderr, flush=True)
            failed = name
            break
        timings[name] = time.perf_counter() - t0
        print(f"paper dry run: {name} passed in {timings[name]:.0f} s", flush=True)
        text = out.read_text()
        if name in ("01_cifar", "02_places_sweep", "05_internal_layers") and "cost estimate (" not in text:
            print(f"paper dry run: {name} printed no cost estimate before training", file=sys.stderr)
            failed = name
            break
    problems = check_runs() if failed is None else []
    for problem in problems:
        print(f"paper dry run: {problem}", file=sys.stderr)
    total = time.perf_counter() - started
    status = "FAILED" if failed or problems else "passed"
    print(f"paper dry run {status} in {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
