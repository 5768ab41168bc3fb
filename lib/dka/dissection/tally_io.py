"""Tally files: NetDissect-Lite's `tally.csv` written and read, summarised, and looked up per unit.

`unit_labels` is the one unit -> concept lookup that concepts, explanations and figures use.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dka.atomic import atomic_write
from dka.data.broden import DEFAULT_CATEGORIES
from dka.dissection.tally import FIELDS

__all__ = ["INTERPRETABLE_IOU", "write_tally", "read_tally", "tally_categories", "tally_columns", "tally_summary",
           "unit_labels", "tally_differences", "summary_row"]

INTERPRETABLE_IOU = 0.04


def tally_columns(categories=DEFAULT_CATEGORIES) -> list[str]:
    """The column names of a tally over `categories`, in NetDissect-Lite's order."""
    return ["unit", "category", "label", "score"] + [f"{c}-{f}" for c in categories for f in FIELDS]


def write_tally(df: pd.DataFrame, path: str | Path) -> Path:
    """Write tally.csv atomically (temp file in the same folder, then os.replace)."""
    with atomic_write(path, newline="") as handle:
        df.to_csv(handle, index=False)
    return Path(path)


def read_tally(path: str | Path) -> pd.DataFrame:
    """Read a NetDissect-Lite tally.csv (ours or the authors' released one), checking its columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tally at {path}; produce one with `python -m dka dissect ... --out DIR`")
    df = pd.read_csv(path, keep_default_na=False, na_values=[])
    head = ["unit", "category", "label", "score"]
    if list(df.columns[:4]) != head or (len(df.columns) - 4) % len(FIELDS):
        raise ValueError(f"{path} is not a NetDissect tally: columns start {list(df.columns[:6])}")
    cats = [c[: -len("-label")] for c in df.columns[4:: len(FIELDS)]]
    if list(df.columns) != tally_columns(cats):
        raise ValueError(f"{path}: columns do not follow `<category>-{{{','.join(FIELDS)}}}` per category")
    return df


def tally_categories(df: pd.DataFrame) -> list[str]:
    return [c[: -len("-label")] for c in df.columns[4:: len(FIELDS)]]


def tally_summary(df: pd.DataFrame, iou_threshold: float = INTERPRETABLE_IOU) -> dict:
    """Interpretable units (score >= threshold), unique concepts among them, per-category counts."""
    good = df[df["score"] >= iou_threshold]
    return {
        "units": int(len(df)),
        "interpretable_units": int(len(good)),
        "unique_concepts": int(good["label"].nunique()),
        "mean_score": float(df["score"].mean()),
        "by_category": {str(k): int(v) for k, v in good["category"].value_counts().items()},
    }


def unit_labels(df: pd.DataFrame, units: int | None = None) -> pd.DataFrame:
    """The unit -> concept lookup: label, category and score (IoU) indexed by the 1-based unit.

    With `units` (the layer's unit count) the table is checked against it and reindexed to 1..units,
    so a tally made for another layer or model fails here with a clear message instead of giving
    wrong concepts.
    """
    table = df.set_index("unit")[["label", "category", "score"]].sort_index()
    if units is None:
        return table
    if list(table.index) != list(range(1, units + 1)):
        span = f"{table.index.min()}..{table.index.max()}" if len(table) else "nothing"
        raise ValueError(f"the tally covers {len(table)} units ({span}) but the layer has {units} units (tally units "
                         "are 1-based, one row each): was the tally made for this model's layer?")
    return table


def tally_differences(before: pd.DataFrame, after: pd.DataFrame, iou_threshold: float = INTERPRETABLE_IOU) -> dict:
    """What changes between two tallies of the same layer (e.g. dka vs NetDissect-Lite rules).

    Cells are compared per unit (rows aligned on `unit`), values exactly as they would be written:
    `cells` counts every changed cell, `by_field` splits them by field (label, truth, ...), `labels`
    and `categories` count units whose best label / category changed, `category_labels` units whose
    label changed in some category column, `row_order` rows that moved; `headline` holds both
    tallies' interpretable units, unique concepts and mean IoU.
    """
    if list(before.columns) != list(after.columns):
        raise ValueError("the tallies have different columns; compare tallies of the same categories")
    a, b = before.set_index("unit").sort_index(), after.set_index("unit").sort_index()
    if list(a.index) != list(b.index):
        raise ValueError(f"the tallies cover different units ({len(a)} vs {len(b)}); compare tallies of one layer")
    changed = a.ne(b)
    by_field = {f: int(changed[[c for c in changed.columns if c.endswith(f"-{f}")]].to_numpy().sum()) for f in FIELDS}
    label_cols = [c for c in a.columns if c.endswith("-label")]
    sa, sb = tally_summary(before, iou_threshold), tally_summary(after, iou_threshold)
    return {
        "units": int(len(a)),
        "cells": int(changed.to_numpy().sum()),
        "cells_total": int(changed.size),
        "by_field": {"category": int(changed["category"].sum()), "label": int(changed["label"].sum()),
                     "score": int(changed["score"].sum()), **{f"<cat>-{k}": v for k, v in by_field.items()}},
        "labels": int(changed["label"].sum()),
        "categories": int(changed["category"].sum()),
        "category_labels": int(changed[label_cols].any(axis=1).sum()),
        "row_order": int((before["unit"].to_numpy() != after["unit"].to_numpy()).sum()),
        "headline": {
            key: (sa[key], sb[key]) for key in ("interpretable_units", "unique_concepts", "mean_score")
        },
    }


def summary_row(name: str, tally: pd.DataFrame, iou_threshold: float = INTERPRETABLE_IOU, top_units: int = 100) -> dict:
    """A dissection-summary table row: units, interpretable units (count and %), unique concepts, mean IoU of all
    units and of the `top_units` best (the paper's Fig. 5(d) statistic; all units when there are fewer)."""
    s = tally_summary(tally, iou_threshold)
    top = tally["score"].nlargest(min(top_units, len(tally)))
    return {"model": name, "units": s["units"], "interpretable units": s["interpretable_units"],
            "interpretable (%)": 100 * s["interpretable_units"] / s["units"], "unique concepts": s["unique_concepts"],
            "mean IoU": s["mean_score"], f"mean IoU, top {top_units} units": float(top.mean())}
