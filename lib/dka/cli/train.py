"""`python -m dka train`: train a registry model (the options are generated from dka.train.TrainConfig)."""

from __future__ import annotations

import json
import os
import sys

from dka.train import config_from_args, run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(list(sys.argv[1:] if argv is None else argv))
    result = run(config)
    if int(os.environ.get("RANK", "0")) == 0:
        last = result.metrics[-1] if result.metrics else {}
        print(json.dumps({"out_dir": str(result.out_dir), "final": str(result.final_path),
                          "epochs": len(result.metrics), "test_top1": last.get("test_top1"),
                          "test_top5": last.get("test_top5")}))
    return 0
