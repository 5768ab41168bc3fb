"""How much NetDissect-Lite's rules change a dissection: dka's rules vs "netdissect", per model.

Dissects each checkpoint's layer twice on one Broden-format dataset (rules="dka", then
rules="netdissect") and prints, per model, how many tally cells change (rows aligned on unit), how
many units change their label / category, and the headline numbers under both rules (interpretable
units, unique concepts, mean IoU), with the threshold shift. Writes both tallies with --out.

    python bench/dissect_rules.py --data data/scenes-demo64 res18=runs/.../res18/final.pt res18-d5a=...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from dka.dissection import dissect, tally_differences, write_tally
from dka.models import load_model


def compare(name: str, checkpoint: Path, args) -> dict:
    model = load_model(checkpoint, map_location=args.device)
    tallies, thresholds, seconds = {}, {}, {}
    for rules in ("dka", "netdissect"):
        t0 = time.perf_counter()
        tallies[rules], details = dissect(model, args.layer, args.data, batch_size=args.batch_size,
                                          device=args.device, progress=False, return_details=True, rules=rules)
        seconds[rules] = time.perf_counter() - t0
        thresholds[rules] = details.thresholds
        if args.out:
            write_tally(tallies[rules], Path(args.out) / f"{name}_{args.layer}_{rules}.csv")
    diff = tally_differences(tallies["dka"], tallies["netdissect"])
    rel = np.abs(thresholds["netdissect"] - thresholds["dka"]) / np.maximum(np.abs(thresholds["dka"]), 1e-12)
    diff.update(name=name, seconds=seconds, threshold_shift_median=float(np.median(rel)),
                threshold_shift_max=float(rel.max()), thresholds_changed=int((rel > 0).sum()))
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME=CHECKPOINT (final.pt)")
    parser.add_argument("--data", required=True, help="Broden-format dataset root (e.g. a concept-scenes export)")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="folder for the two tallies of each model")
    args = parser.parse_args()
    rows = []
    for spec in args.models:
        name, _, path = spec.partition("=")
        if not path:
            parser.error(f"{spec!r}: give NAME=CHECKPOINT")
        rows.append(compare(name, Path(path), args))
    print(f"dataset {args.data}, layer {args.layer}: dka rules -> netdissect rules\n")
    print("| model | units | thresholds changed (median / max rel. shift) | tally cells changed | unit labels "
          "changed | unit categories changed | units with a category label changed | rows moved |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['units']} | {r['thresholds_changed']} ({r['threshold_shift_median']:.2%} / "
              f"{r['threshold_shift_max']:.2%}) | {r['cells']} / {r['cells_total']} | {r['labels']} | "
              f"{r['categories']} | {r['category_labels']} | {r['row_order']} |")
    print("\n| model | interpretable units | unique concepts | mean IoU | seconds (dka / netdissect) |")
    print("|---|---|---|---|---|")
    for r in rows:
        h = r["headline"]
        print(f"| {r['name']} | {h['interpretable_units'][0]} -> {h['interpretable_units'][1]} | "
              f"{h['unique_concepts'][0]} -> {h['unique_concepts'][1]} | {h['mean_score'][0]:.4f} -> "
              f"{h['mean_score'][1]:.4f} | {r['seconds']['dka']:.0f} / {r['seconds']['netdissect']:.0f} |")
    print("\nchanged cells by field:")
    for r in rows:
        print(f"  {r['name']}: {r['by_field']}")


if __name__ == "__main__":
    main()
