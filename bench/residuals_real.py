"""The paper's residual claim (~2 % after the top units vs ~45 % for the dense head) on real CIFAR-10.

    python bench/residuals_real.py            # reads runs/cifar-cpu/01_cifar/<model>/seed<k>/final.pt

The demo measures this claim on concept scenes after 5 epochs, where never-routed head weights have not
decayed and the paper's definition (`Y_c` sums every unit) gives d5a a negative residual. The cifar-cpu runs
were trained so that weight decay clears those weights (|w| < 1e-3: d5a 95.5 %, d1a 99.2 %), so they test
whether the claim holds once the schedule allows it. For every run: the residual of its true class after
the top 5 units on each CIFAR-10 test image, by the three definitions of `dka.evaluation`; per seed the
median over images, then mean ± 95 % t-interval over the seeds. Writes results/cifar-cpu/residuals_cifar10/
(residuals.md, residuals.json) and records the claims residual-d5a and residual-gap there (claims.json), which
`python -m dka claims --results results/cifar-cpu` gathers into the profile's claims table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dka import claims, data, evaluation, stats
from dka.checkpoint import load_checkpoint
from dka.models import load_model
from dka.results import markdown_table

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("res18", "res18-l1", "res18-d1a", "res18-d5a")


def title(args) -> str:
    return (f"**Residual of the true class after the top {args.top} units — CIFAR-10 (JPEG copy), every test image; "
            f"per seed the median over images, then mean and 95 % t-interval over {len(args.seeds)} seeds** "
            "(`bench/residuals_real.py`; definitions in `dka.evaluation`: paper = Y_c over all units, "
            "authors_demo = demo.py's |W x| normalisation, routed = the score the head computes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "cifar-cpu" / "01_cifar")
    parser.add_argument("--data-root", type=Path, default=ROOT / "data" / "cifar10")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--top", type=int, default=5, help="units kept (the paper's Fig. 7 shows 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "cifar-cpu" / "residuals_cifar10",
                        help="folder for residuals.md/.json and claims.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    missing = [str(args.runs / m / f"seed{s}" / "final.pt") for m in MODELS for s in args.seeds
               if not (args.runs / m / f"seed{s}" / "final.pt").is_file()]
    if missing:
        raise SystemExit(f"missing runs ({len(missing)}), e.g. {missing[0]}: train them first "
                         "(python -m dka stage 01_cifar --profile cifar-cpu)")
    test = data.build_loaders("cifar10", args.data_root, batch_size=256, workers=0, augment=False).test
    started = time.perf_counter()
    medians: dict[tuple[str, str], list[float]] = {}
    for model_name in MODELS:
        for seed in args.seeds:
            path = args.runs / model_name / f"seed{seed}" / "final.pt"
            model = load_model(path)
            config = load_checkpoint(path)["config"]
            per_image, _ = evaluation.residual_table({model_name: model}, {model_name: config}, test, "cpu", args.top)
            for definition, values in per_image[model_name].items():
                finite = values[np.isfinite(values)]
                medians.setdefault((model_name, definition), []).append(float(np.median(finite)))
                if definition == "paper":
                    medians.setdefault((model_name, "paper, |residual|"), []).append(float(np.median(np.abs(finite))))
            print(f"{model_name} seed {seed}: " + ", ".join(f"{d} {100 * v[-1]:.1f} %" for (m, d), v in medians.items()
                                                          if m == model_name), flush=True)
    rows = []
    for (model_name, definition), values in medians.items():
        iv = stats.mean_interval(values)
        rows.append({"model": model_name, "definition": definition, "median residual (%)": 100 * iv.mean,
                     "95% low": 100 * iv.low, "95% high": 100 * iv.high, "seeds": len(values),
                     "per seed (%)": ", ".join(f"{100 * v:.1f}" for v in values)})
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    fmt = {c: ".1f" for c in ("median residual (%)", "95% low", "95% high")}
    (args.out / "residuals.md").write_text(title(args) + "\n\n" + markdown_table(table, floatfmt=fmt) + "\n")
    (args.out / "residuals.json").write_text(json.dumps({"top": args.top, "seeds": args.seeds, "rows": rows}, indent=1))
    label, note = "CIFAR-10 (JPEG copy)", f"median |residual| over the test images per seed; t-interval over {len(args.seeds)} seeds"
    d5a, dense = medians[("res18-d5a", "paper, |residual|")], medians[("res18", "paper, |residual|")]
    claims.record(args.out, "residual-d5a", stats.mean_interval(d5a), label, note=note, subject="res18-d5a")
    claims.record(args.out, "residual-gap", stats.mean_interval([a - b for a, b in zip(dense, d5a)]), label,
                  note=note + " (paired by seed)", subject="res18 − res18-d5a")
    print(markdown_table(table, floatfmt=fmt))
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.out}/residuals.md and claims.json")


if __name__ == "__main__":
    main()
