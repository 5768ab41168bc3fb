"""`python -m dka claims`: gather a profile's claim measurements into results/<profile>/claims.md (+ .csv)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dka.claims import collect, write_table

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dka claims", description=__doc__)
    parser.add_argument("--results", required=True, help="a profile's results folder, e.g. results/demo-seeds")
    parser.add_argument("--title", default=None, help="the table's heading")
    args = parser.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        parser.error(f"no results folder at {results}; run the profile's notebooks first (make repro PROFILE=...)")
    frame = collect(results)
    path = write_table(frame, results, args.title or f"The paper's claims, checked ({results.name} profile)")
    print(f"{path}: {len(frame)} claim measurements")
    return 0
