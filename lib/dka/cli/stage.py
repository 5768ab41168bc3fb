"""`python -m dka stage`: run one notebook stage of the DVC pipeline, keeping its results if it fails."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dka stage",
        description="Execute notebooks/STAGE.ipynb at a profile with papermill into results/PROFILE/STAGE/ (what "
                    "each dvc.yaml stage runs). params.yaml is checked first; if the notebook fails, the results "
                    "it would have replaced are put back as they were.")
    parser.add_argument("stage", help="notebook name, e.g. 01_cifar")
    parser.add_argument("--profile", required=True, help="a profile section of params.yaml, e.g. demo")
    args = parser.parse_args(argv)

    from dka.experiments import project_root
    from dka.pipeline import run_stage
    from dka.profiles import ParamsError

    try:
        return run_stage(project_root(), args.stage, args.profile)
    except (ParamsError, FileNotFoundError, ValueError) as err:
        print(f"python -m dka stage: {err}", file=sys.stderr)
        return 2
