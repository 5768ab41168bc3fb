"""Train the model list of one params.yaml section: the glue between the notebooks and `dka.train`.

Notebooks 01, 02 and 05 each train a list of registry models with one recipe (`<profile>.<section>`
in params.yaml: `models`, `dataset`, `root`, `train` = TrainConfig fields, optional per-model
`overrides`) under the profile's `runtime` settings. Finished runs are reused and interrupted ones
resume (dka.train's contract); with `runtime.nproc_per_node > 1` each model trains under torchrun
(DDP) in child processes and the finished run is then read back.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from dka import train

__all__ = ["train_models", "torchrun_argv", "final_sparsity"]


def torchrun_argv(config: train.TrainConfig, nproc: int) -> list[str]:
    """The `torchrun -m dka train ...` command line that runs `config` on `nproc` processes."""
    argv = []
    for key, value in vars(config).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "dka", "train", *argv]


def train_models(section: Mapping[str, Any], runtime: Mapping[str, Any], runs_dir: str | Path,
                 root: str | Path, bundle=None) -> dict[str, train.RunResult]:
    """Train every model of `section` in order; returns model name -> RunResult.

    `runs_dir/<model>/` holds each run; `root` is the project root that `section["root"]` is
    relative to; `bundle` (a dka.data.DataBundle) is shared by all models when given.
    """
    runs_dir = Path(runs_dir)
    if runtime.get("fresh_runs") and runs_dir.exists():
        shutil.rmtree(runs_dir)
    nproc = int(runtime.get("nproc_per_node", 1))
    results = {}
    for name in section["models"]:
        fields = {**section["train"], **section.get("overrides", {}).get(name, {})}
        config = train.TrainConfig(
            model=name, data=section["dataset"], data_root=str(Path(root) / section["root"]),
            out=str(runs_dir / name), device=runtime["device"], workers=runtime["workers"],
            amp=runtime["amp"], seed=runtime["seed"], **fields)
        if nproc > 1:
            subprocess.run(torchrun_argv(config, nproc), check=True)
        results[name] = train.run(config, bundle=bundle)
    return results


def final_sparsity(result: train.RunResult) -> dict[str, float]:
    """Both sparsity measures of the final layer after training (never_routed: NaN for a dense head)."""
    last = result.metrics[-1]
    return {"small": float(last["sparsity"]["head"]),
            "never_routed": float(last.get("never_routed", {}).get("head", float("nan")))}
