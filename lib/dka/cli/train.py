"""`python -m dka train`: train a registry model (the options are generated from dka.train.TrainConfig)."""

from __future__ import annotations

import json
import os
import sys

from dka.dirlock import DirectoryBusy
from dka.train import build_parser, check, config_from_args, run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(list(sys.argv[1:] if argv is None else argv))
    try:
        check(config)  # every argument, before any data is read or --out is created
    except (TypeError, ValueError, FileNotFoundError, RuntimeError) as err:
        build_parser().error(str(err))
    try:
        result = run(config)
    except DirectoryBusy as err:
        build_parser().exit(3, f"python -m dka train: {err}\n")
    if int(os.environ.get("RANK", "0")) == 0:
        last = result.metrics[-1] if result.metrics else {}
        print(json.dumps({"out_dir": str(result.out_dir), "final": str(result.final_path),
                          "epochs": len(result.metrics), "test_top1": last.get("test_top1"),
                          "test_top5": last.get("test_top5")}))
    return 0
