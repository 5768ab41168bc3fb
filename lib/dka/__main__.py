"""`python -m dka <command>` (or the `dka` script): one entry point for the command-line tools.

Each command lives in the module that does the work and exposes `main(argv)`; this file only
dispatches, importing the module lazily so that `dka --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("dka.train", "train a registry model on a dataset (paper or scaled-down presets)"),
    "dissect": ("dka.dissect", "Network Dissection of one layer of a checkpoint -> tally.csv"),
    "explain": ("dka.explain", "per-image explanations -> self-contained HTML report"),
    "data": ("dka.data.__main__", "generate concept scenes, download real datasets"),
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


if __name__ == "__main__":
    sys.exit(main())
