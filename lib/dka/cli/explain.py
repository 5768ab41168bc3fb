"""`python -m dka explain`: per-image explanations of checkpoints, side by side, as a self-contained HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from dka.checkpoint import load_checkpoint
from dka.data import build_loaders
from dka.data.loaders import check_dataset, class_names
from dka.dissection import read_tally, unit_labels
from dka.explain import attribute
from dka.models import load_model
from dka.report import render_report, write_report

__all__ = ["main"]


def _check_classes(ckpt: str, model, trained_on: dict | None, names: list[str] | None, dataset: str, root: str) -> None:
    """A checkpoint explained on other data than it was trained on would label its outputs with the wrong
    class names: ValueError when the class count (or the class names the checkpoint recorded) differ."""
    if names is None:
        return
    classes = int(model.build_kwargs["num_classes"])
    if classes != len(names):
        raise ValueError(f"{ckpt} is a {classes}-class model but {dataset} at {root} has {len(names)} classes: "
                         "explain a checkpoint on the dataset it was trained on (--dataset, --data)")
    stored = (trained_on or {}).get("class_names")
    if stored and list(stored) != list(names):
        differ = next(i for i, (a, b) in enumerate(zip(stored, names)) if a != b)
        raise ValueError(f"{ckpt} was trained on other classes than {dataset} at {root} holds (class {differ}: "
                         f"{stored[differ]!r} in training, {names[differ]!r} here): explain it on its own dataset")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dka explain",
        description="Per-image explanations of one or more checkpoints, side by side, as a self-contained HTML report.",
    )
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="model checkpoint (repeat: e.g. the DKA model, then the baseline)")
    parser.add_argument("--tally", action="append", default=[],
                        help="tally.csv per checkpoint, same order (optional; gives each unit its concept)")
    parser.add_argument("--name", action="append", default=[], help="column title per checkpoint")
    parser.add_argument("--dataset", required=True, help="dataset preset for dka.data.build_loaders (e.g. scenes-demo32)")
    parser.add_argument("--data", required=True, help="dataset root")
    parser.add_argument("--count", type=int, default=8, help="images from the test split")
    parser.add_argument("--top", type=int, default=3, help="units shown per image")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="skip test images that cannot be decoded (counted and reported) instead of stopping")
    parser.add_argument("--out", required=True, help="report path (.html)")
    args = parser.parse_args(argv)
    if args.tally and len(args.tally) != len(args.checkpoint):
        parser.error(f"give one --tally per --checkpoint ({len(args.checkpoint)}), or none")
    if args.name and len(args.name) != len(args.checkpoint):
        parser.error(f"give one --name per --checkpoint ({len(args.checkpoint)}), or none")
    if args.count < 1:
        parser.error("--count must be >= 1")
    if args.top < 1:
        parser.error("--top must be >= 1")

    # Model, tally and data must belong together; all is checked before the dataset is decoded.
    try:
        check_dataset(args.dataset, args.data)
        names_now = class_names(args.dataset, args.data)
        loaded = []
        for i, ckpt in enumerate(args.checkpoint):
            model = load_model(ckpt)
            trained_on = load_checkpoint(ckpt).get("dataset")
            _check_classes(ckpt, model, trained_on, names_now, args.dataset, args.data)
            tally = read_tally(args.tally[i]) if args.tally else None
            if tally is not None:
                try:
                    unit_labels(tally, int(model.head.weight.shape[1]))
                except ValueError as err:
                    raise ValueError(f"--tally {args.tally[i]} does not fit --checkpoint {ckpt}: {err}") from None
            loaded.append((ckpt, model, trained_on, tally))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        parser.error(str(err))

    bundle = build_loaders(args.dataset, args.data, batch_size=args.count, workers=0, augment=False,
                           skip_corrupt=args.skip_corrupt)
    images, labels = next(iter(bundle.test))
    asked = min(args.count, len(bundle.test.dataset))  # a file dataset drops undecodable images from a batch
    skipped = len(getattr(bundle.test.dataset, "skipped", [])) + asked - len(labels)
    if args.skip_corrupt and skipped > 0:
        print(f"--skip-corrupt: {skipped} test image(s) could not be decoded and are left out")
    explanations = {}
    for i, (ckpt, model, trained_on, tally) in enumerate(loaded):
        _check_classes(ckpt, model, trained_on, bundle.class_names, args.dataset, args.data)
        name = args.name[i] if args.name else getattr(getattr(model, "spec", None), "name", Path(ckpt).stem)
        explanations[name] = (attribute(model, images), tally)
    text = render_report(images, explanations, bundle.class_names, n=args.top, labels=labels.tolist())
    print(write_report(text, args.out))
    return 0
