"""`python -m dka explain`: per-image explanations of checkpoints, side by side, as a self-contained HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from dka.data import build_loaders
from dka.dissection import read_tally
from dka.explain import attribute
from dka.models import load_model
from dka.report import render_report, write_report

__all__ = ["main"]


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
    parser.add_argument("--out", required=True, help="report path (.html)")
    args = parser.parse_args(argv)
    if args.tally and len(args.tally) != len(args.checkpoint):
        parser.error(f"give one --tally per --checkpoint ({len(args.checkpoint)}), or none")
    if args.name and len(args.name) != len(args.checkpoint):
        parser.error(f"give one --name per --checkpoint ({len(args.checkpoint)}), or none")
    if args.count < 1:
        parser.error("--count must be >= 1")

    bundle = build_loaders(args.dataset, args.data, batch_size=args.count, workers=0, augment=False)
    images, labels = next(iter(bundle.test))
    explanations = {}
    for i, ckpt in enumerate(args.checkpoint):
        model = load_model(ckpt)
        name = args.name[i] if args.name else getattr(getattr(model, "spec", None), "name", Path(ckpt).stem)
        tally = read_tally(args.tally[i]) if args.tally else None
        explanations[name] = (attribute(model, images), tally)
    text = render_report(images, explanations, bundle.class_names, n=args.top, labels=labels.tolist())
    print(write_report(text, args.out))
    return 0
