"""`python -m dka dissect`: Network Dissection of one layer of a checkpoint -> tally.csv, thresholds.csv."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dka.data.broden import BrodenDataset
from dka.dirlock import exclusive
from dka.dissection import (DEFAULT_CATEGORIES, INTERPRETABLE_IOU, RULES, LayerCapture, dissect, get_rules,
                            pick_device, tally_summary,
                            write_tally)
from dka.models import load_model

__all__ = ["main"]

LEGACY_SCRATCH = "dka-features-*.f32"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dka dissect",
        description="Network Dissection (NetDissect-Lite definitions) of one layer of a checkpoint.",
    )
    parser.add_argument("--checkpoint", required=True, help="model checkpoint (final.pt from dka train)")
    parser.add_argument("--layer", default="layer4", help="module name, e.g. layer4 or layer3.0.conv1")
    parser.add_argument("--data", required=True, help="Broden-format dataset root (index.csv, label.csv ...)")
    parser.add_argument("--out", required=True, help="output folder: tally.csv, thresholds.csv (one dissection "
                        "at a time; the feature scratch file at Broden scale goes here too, unnamed)")
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

    # Everything is checked before a feature is computed or --out is created.
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    if args.memory_budget_gb <= 0:
        parser.error("--memory-budget-gb must be > 0")
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        parser.error(f"no checkpoint at {ckpt}; train one with `python -m dka train ...` (writes final.pt)")
    categories = [c for c in args.categories.split(",") if c]
    if not categories:
        parser.error(f"--categories is empty; e.g. {','.join(DEFAULT_CATEGORIES)}")
    try:
        dev = pick_device(args.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} but CUDA is not available; use --device cpu")
        model = load_model(ckpt)
        LayerCapture(model, args.layer)  # names the model's modules when the layer does not exist
        dataset = BrodenDataset(args.data, categories=tuple(categories), caffe=args.caffe,
                                zero_image_labels=get_rules(args.rules).zero_image_labels)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
        parser.error(str(err).strip('"'))
    out = Path(args.out)
    with exclusive(out, "dissection"):
        for stale in out.glob(LEGACY_SCRATCH):  # named feature files of dka versions before the unnamed scratch
            stale.unlink(missing_ok=True)
        model.to(dev)
        tally, details = dissect(
            model, args.layer, dataset, batch_size=args.batch_size, device=dev, caffe=args.caffe,
            threshold_method=args.threshold_method, memory_budget=int(args.memory_budget_gb * (1 << 30)),
            cache_dir=out, workers=args.workers, return_details=True, rules=args.rules,
        )
        write_tally(tally, out / "tally.csv")
        thr = pd.DataFrame({"unit": np.arange(1, len(details.thresholds) + 1), "threshold": details.thresholds})
        write_tally(thr, out / "thresholds.csv")
    s = tally_summary(tally)
    print(f"{out / 'tally.csv'}: {s['interpretable_units']}/{s['units']} units with IoU >= {INTERPRETABLE_IOU}, "
          f"{s['unique_concepts']} unique concepts ({args.rules} rules)")
    return 0
