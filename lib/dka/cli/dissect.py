"""`python -m dka dissect`: Network Dissection of one layer of a checkpoint -> tally.csv, thresholds.csv."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from dka.dissection import (DEFAULT_CATEGORIES, INTERPRETABLE_IOU, RULES, dissect, pick_device, tally_summary,
                            write_tally)
from dka.models import load_model

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dka dissect",
        description="Network Dissection (NetDissect-Lite definitions) of one layer of a checkpoint.",
    )
    parser.add_argument("--checkpoint", required=True, help="model checkpoint (final.pt from dka train)")
    parser.add_argument("--layer", default="layer4", help="module name, e.g. layer4 or layer3.0.conv1")
    parser.add_argument("--data", required=True, help="Broden-format dataset root (index.csv, label.csv ...)")
    parser.add_argument("--out", required=True, help="output folder: tally.csv, thresholds.csv")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--categories", default=",".join(DEFAULT_CATEGORIES))
    parser.add_argument("--caffe", action="store_true", help="Caffe-style preprocessing (as NetDissect-Lite)")
    parser.add_argument("--rules", default="dka", choices=sorted(RULES),
                        help="netdissect: NetDissect-Lite's exact output (its threshold sketch, label 0 from `0` "
                             "entries, PIL's resize arithmetic; use it to compare with the paper or a released "
                             "tally); dka: the exact-quantile rules (see dka.dissection.rules)")
    parser.add_argument("--threshold-method", default="auto", choices=("auto", "sorted", "streaming"),
                        help="how dka's rules compute the exact quantile (netdissect: its own sketch)")
    parser.add_argument("--memory-budget-gb", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        parser.error(f"no checkpoint at {ckpt}; train one with `python -m dka train ...` (writes final.pt)")
    model = load_model(ckpt)
    dev = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(dev)
    tally, details = dissect(
        model, args.layer, args.data, batch_size=args.batch_size, device=dev,
        categories=[c for c in args.categories.split(",") if c], caffe=args.caffe,
        threshold_method=args.threshold_method, memory_budget=int(args.memory_budget_gb * (1 << 30)),
        cache_dir=args.out, workers=args.workers, return_details=True, rules=args.rules,
    )
    write_tally(tally, out / "tally.csv")
    thr = pd.DataFrame({"unit": np.arange(1, len(details.thresholds) + 1), "threshold": details.thresholds})
    write_tally(thr, out / "thresholds.csv")
    s = tally_summary(tally)
    print(f"{out / 'tally.csv'}: {s['interpretable_units']}/{s['units']} units with IoU >= {INTERPRETABLE_IOU}, "
          f"{s['unique_concepts']} unique concepts ({args.rules} rules)")
    return 0
