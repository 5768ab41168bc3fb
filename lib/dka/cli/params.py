"""`python -m dka params`: check every profile of params.yaml (what `make repro` runs first)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dka params",
        description="Check every profile of params.yaml before anything runs: unknown keys, wrong types, model "
                    "names and K, training recipes, the notebooks' model lists. Exit 2 lists every problem.")
    parser.add_argument("--file", default="params.yaml", help="the settings file (dvc.yaml beside it for --stages)")
    parser.add_argument("--profile", default=None,
                        help="the profile to select (default: the file's `profile:` line); must name a section")
    parser.add_argument("--stages", action="store_true",
                        help="print the DVC stage names of the selected profile (what `make repro` reproduces)")
    args = parser.parse_args(argv)

    from dka.pipeline import stage_names
    from dka.profiles import ParamsError, check_params, profile_names

    try:
        params, selected = check_params(args.file, args.profile or None)
        names = stage_names(Path(args.file).resolve().parent, selected) if args.stages else []
    except (ParamsError, ValueError, FileNotFoundError) as err:
        print(f"python -m dka params: {err}", file=sys.stderr)
        return 2
    print(f"{args.file}: every profile is valid ({', '.join(profile_names(params))}); selected: {selected}",
          file=sys.stderr)
    if args.stages:
        print(" ".join(names))
    return 0
