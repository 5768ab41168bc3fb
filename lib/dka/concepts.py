"""Concept composability: which concepts a class is built from, read off the final layer + a tally.

The paper's claim (Sec. 4, Fig. 6) is that a Dynamic-K final layer makes each class a composition of
a few concept-detecting units ("laptop = keyboard + screen"). Here the final-layer weights give the
class -> unit edges and a Network Dissection tally gives each unit's concept and IoU, so the claim
becomes numbers:

Definitions (used by the notebooks verbatim):

- *Positive weight mass* of class c: ``sum_i max(W[c,i], 0)``. Units with negative weights vote
  against a class; they are not part of its composition.
- *Covering units* of class c at share s (default 0.8): the fewest units, taken by decreasing
  positive weight, whose weights sum to at least s x the positive weight mass (ties: lower unit first).
  The authors' rule (their released `demo.py` lists, per class, the units with W[c,i] > 1e-3) is the
  alternative ``rule="threshold"``. Give a Dynamic-K head's routed weights
  (`dka.evaluation.routed_weight`) so that weights which never route, and keep their initial values in a
  short run, do not count.
- *Concepts of class c*: the distinct tally labels of its covering units whose IoU >= 0.04 (the
  interpretable units), plus one concept per covering unit with IoU < 0.04 (an uninterpretable unit
  is a concept of its own that no label names — counting it keeps the statistic honest for heads
  that spread weight over unlabelled units).
- *Share of classes representable with at most k concepts* (the paper's "more than 95% of classes
  need at most 5 concepts", k = 5): the fraction of classes whose number of concepts is <= k.
- *Recovery* (concept scenes only, where the true composition is known): the recovered set of class c
  is its interpretable covering units' labels; precision = |recovered ∩ true| / |recovered| (0 when
  nothing is recovered), recall = |recovered ∩ true| / |true|.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from dka.dissection import INTERPRETABLE_IOU, unit_labels

__all__ = ["DEFAULT_SHARE", "AUTHORS_WEIGHT_THRESHOLD", "head_weight", "covering_units", "class_units",
           "class_concepts", "share_within", "read_class_concepts", "concept_recovery", "recovery_summary",
           "composition_names", "true_concepts", "recovery_table", "graph_edges", "composability_rows"]

DEFAULT_SHARE = 0.8
AUTHORS_WEIGHT_THRESHOLD = 1e-3


def head_weight(model_or_weight) -> np.ndarray:
    """(classes, units) final-layer weight as float64 numpy, from a model (its `head`) or an array."""
    if isinstance(model_or_weight, nn.Module):
        head = getattr(model_or_weight, "head", None)
        if head is None or not hasattr(head, "weight"):
            raise TypeError("model has no `head` with a weight; pass a dka.models.DKAResNet or the (classes, units) weight")
        model_or_weight = head.weight
    if isinstance(model_or_weight, torch.Tensor):
        model_or_weight = model_or_weight.detach().cpu().double().numpy()
    w = np.asarray(model_or_weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"final-layer weight must be (classes, units), got shape {w.shape}")
    return w


def covering_units(weight_row: np.ndarray, share: float = DEFAULT_SHARE) -> np.ndarray:
    """0-based units, by decreasing positive weight, holding at least `share` of the positive mass."""
    if not 0 < share <= 1:
        raise ValueError(f"share must lie in (0, 1], got {share}")
    w = np.asarray(weight_row, dtype=np.float64)
    pos = np.clip(w, 0, None)
    total = pos.sum()
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-pos, kind="stable")
    cum = np.cumsum(pos[order])
    n = int(np.searchsorted(cum, share * total * (1 - 1e-12))) + 1
    return order[: min(n, int((pos > 0).sum()))]


def class_units(
    model_or_weight, tally: pd.DataFrame, class_names: Sequence[str] | None = None, top: int | None = 10
) -> pd.DataFrame:
    """Per class, its units ranked by final-layer weight, with concept labels and IoUs (long table)."""
    w = head_weight(model_or_weight)
    units = unit_labels(tally, w.shape[1])
    pos_mass = np.clip(w, 0, None).sum(axis=1)
    rows = []
    for c in range(w.shape[0]):
        order = np.argsort(-w[c], kind="stable")[: top or w.shape[1]]
        for r, u in enumerate(order):
            info = units.loc[u + 1]
            rows.append({
                "class": c, "class_name": class_names[c] if class_names is not None else str(c), "rank": r + 1,
                "unit": int(u) + 1, "weight": float(w[c, u]),
                "weight_share": float(max(w[c, u], 0) / pos_mass[c]) if pos_mass[c] > 0 else 0.0,
                "concept": info["label"], "category": info["category"], "iou": float(info["score"]),
            })
    return pd.DataFrame(rows)


def class_concepts(
    model_or_weight,
    tally: pd.DataFrame,
    class_names: Sequence[str] | None = None,
    share: float = DEFAULT_SHARE,
    iou_threshold: float = INTERPRETABLE_IOU,
    rule: str = "share",
    weight_threshold: float = AUTHORS_WEIGHT_THRESHOLD,
) -> pd.DataFrame:
    """Per class: its units, its concepts and their number (definitions in the module docstring).

    Args:
        rule: "share" (the fewest units holding `share` of the positive weight) or "threshold" (the
            authors' rule: every unit with a weight above `weight_threshold`).
    """
    if rule not in ("share", "threshold"):
        raise ValueError(f"rule must be 'share' or 'threshold'; got {rule!r}")
    w = head_weight(model_or_weight)
    units = unit_labels(tally, w.shape[1])
    rows = []
    for c in range(w.shape[0]):
        if rule == "share":
            cover = covering_units(w[c], share)
        else:
            above = np.flatnonzero(w[c] > weight_threshold)
            cover = above[np.argsort(-w[c][above], kind="stable")]
        info = units.loc[cover + 1]
        good = info[info["score"] >= iou_threshold]
        concepts = tuple(sorted(set(good["label"])))
        n_unlabelled = int(len(info) - len(good))
        rows.append({
            "class": c, "class_name": class_names[c] if class_names is not None else str(c),
            "units": tuple(int(u) + 1 for u in cover), "n_units": int(len(cover)),
            "concepts": concepts, "n_uninterpretable": n_unlabelled, "n_concepts": len(concepts) + n_unlabelled,
        })
    return pd.DataFrame(rows)


def share_within(per_class: pd.DataFrame, max_concepts: int = 5) -> float:
    """Fraction of classes whose number of concepts (see `class_concepts`) is at most `max_concepts`."""
    if max_concepts < 0:
        raise ValueError(f"max_concepts must be >= 0, got {max_concepts}")
    if len(per_class) == 0:
        raise ValueError("no classes")
    return float((per_class["n_concepts"] <= max_concepts).mean())


def read_class_concepts(path: str | Path) -> pd.DataFrame:
    """The concept-scenes ground truth `class_concepts.csv` (columns class, concept, category)."""
    path = Path(path)
    if path.is_dir():
        path = path / "class_concepts.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no class_concepts.csv at {path}; it comes with a concept-scenes export "
                                "(dka.data.scenes.generate(preset, DIR))")
    df = pd.read_csv(path, keep_default_na=False)
    missing = {"class", "concept"} - set(df.columns)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}")
    return df


def concept_recovery(per_class: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Per class precision/recall of the recovered concept set against the true composition.

    `per_class` from `class_concepts` (its class_name must match truth's `class` column);
    returns class_name, recovered, true, precision, recall.
    """
    true_sets = truth.groupby("class")["concept"].apply(lambda s: set(map(str, s))).to_dict()
    unknown = set(map(str, per_class["class_name"])) - set(map(str, true_sets))
    if unknown:
        raise ValueError(f"classes {sorted(unknown)[:5]} are not in class_concepts.csv; pass the dataset's class "
                         "names to class_concepts(...)")
    rows = []
    for _, r in per_class.iterrows():
        rec, true = set(r["concepts"]), true_sets[str(r["class_name"])]
        hit = len(rec & true)
        rows.append({
            "class_name": r["class_name"], "recovered": tuple(sorted(rec)), "true": tuple(sorted(true)),
            "precision": hit / len(rec) if rec else 0.0, "recall": hit / len(true) if true else 0.0,
        })
    return pd.DataFrame(rows)


def recovery_summary(recovery: pd.DataFrame) -> dict:
    """Mean precision and recall over classes."""
    return {"precision": float(recovery["precision"].mean()), "recall": float(recovery["recall"].mean()),
            "classes": int(len(recovery))}


def composition_names(class_names: Sequence[str], root: str | Path | None = None, joiner: str = " + ") -> list[str]:
    """Display names: a concept-scenes class by its true composition, e.g. "triangle + chequered".

    The compositions come from the export's classes.csv (`root`); a class it does not list, or any
    class when `root` is None or holds no concept-scenes export (Places365, CIFAR-10), keeps its name.
    """
    names = [str(c) for c in class_names]
    if root is None or not (Path(root) / "classes.csv").is_file():
        return names
    from dka.data.scenes import read_classes

    found = dict(read_classes(root))
    return [joiner.join(found[n]) if found.get(n) else n for n in names]


def true_concepts(truth: pd.DataFrame, class_names: Sequence[str]) -> list[set[str]]:
    """Per class index, its true concepts (from `read_class_concepts`); empty for a class not listed."""
    sets = truth.groupby("class")["concept"].apply(lambda s: set(map(str, s))).to_dict()
    return [set(sets.get(str(c), set())) for c in class_names]


def recovery_table(per_class: pd.DataFrame, truth: pd.DataFrame, display_names: Sequence[str] | None = None,
                   mark: tuple[str, str] = ("✓", "✗")) -> pd.DataFrame:
    """Per class: the concepts its covering units name, each marked true or false against the ground
    truth, the true concepts none of them names, precision and recall (see `concept_recovery`)."""
    rec = concept_recovery(per_class, truth)
    names = list(display_names) if display_names is not None else list(rec["class_name"])
    if len(names) != len(rec):
        raise ValueError(f"{len(names)} display names for {len(rec)} classes")
    rows = []
    for name, (_, r) in zip(names, rec.iterrows()):
        true = set(r["true"])
        rows.append({
            "class": name,
            "concepts found": ", ".join(f"{mark[0] if c in true else mark[1]} {c}" for c in r["recovered"]) or "-",
            "true concepts missed": ", ".join(sorted(true - set(r["recovered"]))) or "-",
            "precision": r["precision"], "recall": r["recall"],
        })
    return pd.DataFrame(rows)


def graph_edges(model_or_weight, tally: pd.DataFrame, classes: Sequence[int], top_units: int = 5,
                truth: Sequence[set] | dict | None = None, iou_threshold: float = INTERPRETABLE_IOU) -> pd.DataFrame:
    """The class -> unit -> concept edges of Fig. 6: each class's `top_units` units by weight, with the
    unit's concept and IoU; with `truth` (per class index, its true concepts) `true` says whether the
    edge names a true concept of the class (the unit is interpretable and its concept is in the set)."""
    w = head_weight(model_or_weight)
    units = unit_labels(tally, w.shape[1])
    bad = [c for c in classes if not 0 <= c < w.shape[0]]
    if bad:
        raise ValueError(f"classes {bad} out of range 0..{w.shape[0] - 1}")
    rows = []
    for c in classes:
        for u in np.argsort(-w[c], kind="stable")[:top_units]:
            info = units.loc[int(u) + 1]
            iou = float(info["score"])
            right = None if truth is None else bool(iou >= iou_threshold and str(info["label"]) in set(truth[c]))
            rows.append({"class": int(c), "unit": int(u), "weight": float(w[c, u]), "concept": str(info["label"]),
                         "iou": iou, "true": right})
    return pd.DataFrame(rows, columns=["class", "unit", "weight", "concept", "iou", "true"])


def composability_rows(per_class_by_rule: dict, max_concepts: int, truth: pd.DataFrame | None = None) -> list[dict]:
    """One row per (rule, model): mean covering units and concepts, the share of classes within `max_concepts`,
    and (with the true composition) recovery precision and recall."""
    rows = []
    for rule, per_model in per_class_by_rule.items():
        for name, per_class in per_model.items():
            row = {"model": name, "rule": rule, "mean covering units": per_class["n_units"].mean(),
                   "mean concepts": per_class["n_concepts"].mean(),
                   f"classes with <= {max_concepts} concepts (%)": 100 * share_within(per_class, max_concepts)}
            if truth is not None:
                recovery = recovery_summary(concept_recovery(per_class, truth))
                row.update({"recovery precision": recovery["precision"], "recovery recall": recovery["recall"]})
            rows.append(row)
    return rows
