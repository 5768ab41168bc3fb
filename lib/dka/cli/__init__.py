"""The command line: `python -m dka <command>` (or the `dka` script).

Every command's `main(argv)` lives in a module of this package; library modules hold no command-line
code. This file only dispatches, importing the command's module lazily so that `dka --help` is fast.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main", "COMMANDS"]

COMMANDS = {
    "train": ("dka.cli.train", "train a registry model on a dataset (paper or scaled-down presets)"),
    "dissect": ("dka.cli.dissect", "Network Dissection of one layer of a checkpoint -> tally.csv"),
    "explain": ("dka.cli.explain", "per-image explanations -> self-contained HTML report"),
    "data": ("dka.cli.data", "generate concept scenes, download real datasets"),
    "claims": ("dka.cli.claims", "gather a profile's claim measurements into results/<profile>/claims.md"),
    "params": ("dka.cli.params", "check every profile of params.yaml (make repro runs it first)"),
    "stage": ("dka.cli.stage", "run one notebook stage of the DVC pipeline, keeping its results if it fails"),
}


def _usage() -> str:
    lines = ["usage: python -m dka <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`python -m dka <command> --help` describes each command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}; valid commands: {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)
