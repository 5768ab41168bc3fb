"""Writing results: figures (PNG), tables (CSV + Markdown) and metrics (strict JSON), atomically.

Everything a notebook writes to `results/` goes through these functions, which write a temp file and
`os.replace` it onto the target, so an interrupted run never leaves a half-written file that DVC would
then record. `metrics_frame` turns the runs' `metrics.jsonl` records into one long table.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.figure
import numpy as np
import pandas as pd
from tabulate import tabulate

from dka.atomic import atomic_write, write_text

__all__ = ["save_figure", "save_table", "save_json", "markdown_table", "metrics_frame", "DEFAULT_DPI"]

# Figures are read in a README at ~700 px wide: ~120 dpi keeps a 6.4-inch figure at that size.
DEFAULT_DPI = 120


def save_figure(fig: matplotlib.figure.Figure, path: str | os.PathLike, dpi: int = DEFAULT_DPI) -> Path:
    """Write `fig` as PNG to `path` atomically (small file: ~120 dpi) and return the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figures are written as PNG; got {path.name!r} — use a .png file name")
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path


def markdown_table(df: pd.DataFrame, floatfmt: str | Mapping[str, str] = ".2f", index: bool = False) -> str:
    """GitHub-flavoured Markdown for a small table (tabulate's pipe format, as `DataFrame.to_markdown`).

    `floatfmt` is one format for every float column or a {column: format} dict (others: ".2f");
    NaN prints as an en dash and "|" is escaped, so the table renders on GitHub and in Jupyter.
    """
    frame = df.reset_index() if index else df
    formats = floatfmt if isinstance(floatfmt, Mapping) else {}
    default = ".2f" if isinstance(floatfmt, Mapping) else floatfmt

    def cell(value):
        if isinstance(value, str):
            return value.replace("|", "\\|")
        if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
            return None  # tabulate's missing value
        return value

    # tabulate itself (what DataFrame.to_markdown calls): a list of rows keeps None as its missing value,
    # where a DataFrame would turn it back into NaN
    rows = [[cell(v) for v in row] for row in frame.itertuples(index=False)]
    return tabulate(rows, headers=[cell(str(c)) for c in frame.columns], tablefmt="pipe", missingval="–",
                    floatfmt=[formats.get(c, default) for c in frame.columns]) + "\n"


def save_table(df: pd.DataFrame, path_stem: str | os.PathLike, floatfmt: str | Mapping[str, str] = ".2f",
               title: str | None = None) -> tuple[Path, Path]:
    """Write `df` as `<stem>.csv` and `<stem>.md` (atomically); returns both paths."""
    stem = Path(path_stem)
    if stem.suffix in (".csv", ".md"):
        stem = stem.with_suffix("")
    csv_path = write_text(stem.with_suffix(".csv"), df.to_csv(index=False))
    md = (f"**{title}**\n\n" if title else "") + markdown_table(df, floatfmt=floatfmt)
    md_path = write_text(stem.with_suffix(".md"), md)
    return csv_path, md_path


def save_json(obj, path: str | os.PathLike) -> Path:
    """Write metrics as indented, strict JSON (atomically): numpy values become plain numbers and
    NaN/inf become null, so any JSON reader (jq, JavaScript, DVC) accepts the file."""

    def plain(value):
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, np.ndarray):
            return plain(value.tolist())
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Path):
            return str(value)
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        raise TypeError(f"cannot write {type(value).__name__} to JSON")

    text = json.dumps(plain(obj), indent=2, sort_keys=True, allow_nan=False)
    return write_text(Path(path), text + "\n")


# --------------------------------------------------------------------------------------------
# metrics -> long tables
# --------------------------------------------------------------------------------------------


def metrics_frame(runs: Mapping[str, Sequence]) -> pd.DataFrame:
    """Per-epoch metrics of several runs as one long table (columns `model`, `seed`, `epoch`, ...).

    `runs` maps a run name to its metrics.jsonl records, or to one `RunResult` per seed (what
    `dka.experiments.train_models` returns; the seed is read from the run's folder, `seed<k>`). Scalar
    keys become columns; the per-layer dicts (`sparsity`, `never_routed`) are reduced to the final
    layer's value (`head`), the one the paper's figures show.
    """
    rows = []
    for model, entries in runs.items():
        entries = list(entries)
        if entries and hasattr(entries[0], "metrics"):
            per_seed = [(_seed_of(r, i), r.metrics) for i, r in enumerate(entries)]
        else:
            per_seed = [(0, entries)]
        for seed, records in per_seed:
            for record in records:
                row = {"model": model, "seed": seed}
                for key, value in record.items():
                    row[key] = value.get("head", np.nan) if isinstance(value, Mapping) else value
                rows.append(row)
    if not rows:
        raise ValueError("no metrics to tabulate: every run has an empty metrics list")
    return pd.DataFrame(rows)


def _seed_of(result, index: int) -> int:
    name = Path(getattr(result, "out_dir", "")).name
    return int(name[4:]) if name.startswith("seed") and name[4:].isdigit() else index
