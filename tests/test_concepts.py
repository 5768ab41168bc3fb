"""Concept composability: covering units, concept counts, the 'at most k concepts' share, recovery."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dka import concepts as C
from dka import plots


def _tally(labels, scores):
    n = len(labels)
    return pd.DataFrame({"unit": np.arange(1, n + 1), "category": "object", "label": labels, "score": scores})


# units 1..6: two detect "disc", one "red-c", one "striped", one uninterpretable, one "sky-s"
TALLY = _tally(["disc", "disc", "red-c", "striped", "blob", "sky-s"], [0.3, 0.2, 0.1, 0.05, 0.01, 0.2])
W = np.array([
    [5.0, 3.0, 2.0, 0.0, 0.0, -4.0],  # class 0: disc, disc, red
    [0.0, 0.0, 0.0, 1.0, 1.0, 1.0],  # class 1: three equal weights
    [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0],  # class 2: no positive weight
])


def test_covering_units():
    assert C.covering_units(W[0], 0.8).tolist() == [0, 1]  # 8 of 10 positive mass
    assert C.covering_units(W[0], 0.81).tolist() == [0, 1, 2]
    assert C.covering_units(W[0], 1.0).tolist() == [0, 1, 2]  # zero-weight units never join
    assert C.covering_units(W[1], 0.5).tolist() == [3, 4]  # ties: lower unit first
    assert C.covering_units(W[2], 0.8).tolist() == []
    with pytest.raises(ValueError, match="share"):
        C.covering_units(W[0], 0)


def test_class_concepts_counts_and_share_within():
    per = C.class_concepts(W, TALLY, ["a", "b", "c"], share=1.0)
    r0, r1, r2 = per.to_dict("records")
    assert r0["concepts"] == ("disc", "red-c") and r0["n_concepts"] == 2 and r0["units"] == (1, 2, 3)
    # unit 5 is uninterpretable (IoU 0.01 < 0.04): a concept of its own
    assert r1["concepts"] == ("sky-s", "striped") and r1["n_uninterpretable"] == 1 and r1["n_concepts"] == 3
    assert r2["n_concepts"] == 0
    assert C.share_within(per, 2) == pytest.approx(2 / 3)
    assert C.share_within(per, 3) == 1.0


def test_class_units_ranking():
    table = C.class_units(W, TALLY, top=3)
    first = table[table["class"] == 0]
    assert first["unit"].tolist() == [1, 2, 3]
    assert first["concept"].tolist() == ["disc", "disc", "red-c"]
    assert first["weight_share"].tolist() == pytest.approx([0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match="1-based"):
        C.class_units(W[:, :3], TALLY)


def test_concept_recovery():
    per = C.class_concepts(W, TALLY, ["a", "b", "c"], share=1.0)
    truth = pd.DataFrame({"class": ["a", "a", "b", "b", "c"],
                          "concept": ["disc", "dotted", "striped", "sky-s", "red-c"],
                          "category": "x"})
    rec = C.concept_recovery(per, truth).set_index("class_name")
    assert rec.loc["a", "precision"] == 0.5 and rec.loc["a", "recall"] == 0.5
    assert rec.loc["b", "precision"] == 1.0 and rec.loc["b", "recall"] == 1.0
    assert rec.loc["c", "precision"] == 0.0 and rec.loc["c", "recall"] == 0.0
    s = C.recovery_summary(rec.reset_index())
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not in class_concepts.csv"):
        C.concept_recovery(C.class_concepts(W, TALLY), truth)


def test_concept_graph_png(tmp_path):
    path = plots.concept_graph(W, TALLY, [0, 1], tmp_path / "fig6.png", class_names=["laptop", "beach"], top_units=3)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 500
    with pytest.raises(ValueError, match="out of range"):
        plots.concept_graph(W, TALLY, [7], tmp_path / "x.png")


def test_head_weight_from_model():
    from dka.models import build

    m = build("res18-d2a", num_classes=3, width=2)
    assert C.head_weight(m).shape == (3, m.num_features)


def _export(tmp_path):
    root = tmp_path / "scenes"
    root.mkdir()
    (root / "classes.csv").write_text("class,name,concepts\n0,a,disc;dotted\n1,b,striped;sky-s;red-c\n2,c,red-c\n")
    return root


def test_composition_names(tmp_path):
    root = _export(tmp_path)
    assert C.composition_names(["a", "b", "c"], root) == ["disc + dotted", "striped + sky-s + red-c", "red-c"]
    assert C.composition_names(["a", "zzz"], root) == ["disc + dotted", "zzz"]  # not in the export: kept
    assert C.composition_names(["cat", "dog"], None) == ["cat", "dog"]
    assert C.composition_names(["cat"], tmp_path) == ["cat"]  # no classes.csv: not a concept-scenes export
    (root / "classes.csv").write_text("class,name\n0,a\n")
    with pytest.raises(ValueError, match="no `concepts` column"):
        C.composition_names(["a"], root)


TRUTH = pd.DataFrame({"class": ["a", "a", "b", "b", "c"], "concept": ["disc", "dotted", "striped", "sky-s", "red-c"],
                      "category": "x"})


def test_recovery_table_marks_each_concept():
    per = C.class_concepts(W, TALLY, ["a", "b", "c"], share=1.0)
    table = C.recovery_table(per, TRUTH, ["disc + dotted", "striped + sky-s", "red-c"]).set_index("class")
    assert table.loc["disc + dotted", "concepts found"] == "✓ disc, ✗ red-c"
    assert table.loc["disc + dotted", "true concepts missed"] == "dotted"
    assert table.loc["striped + sky-s", "concepts found"] == "✓ sky-s, ✓ striped"
    assert table.loc["red-c", "concepts found"] == "-" and table.loc["red-c", "true concepts missed"] == "red-c"
    assert table.loc["disc + dotted", "precision"] == 0.5
    assert C.true_concepts(TRUTH, ["b", "zzz"]) == [{"striped", "sky-s"}, set()]


def test_graph_edges_true_or_false_against_the_composition(tmp_path):
    truth = C.true_concepts(TRUTH, ["a", "b", "c"])
    edges = C.graph_edges(W, TALLY, [0, 1], top_units=3, truth=truth)
    e0 = edges[edges["class"] == 0]
    assert e0["unit"].tolist() == [0, 1, 2] and e0["concept"].tolist() == ["disc", "disc", "red-c"]
    assert e0["true"].tolist() == [True, True, False]  # red-c is not in class a's composition
    e1 = edges[edges["class"] == 1].set_index("unit")
    assert e1.loc[3, "true"] and e1.loc[5, "true"]
    assert not e1.loc[4, "true"]  # unit 5 (0-based 4) is not interpretable
    assert C.graph_edges(W, TALLY, [0], top_units=2)["true"].isna().all()  # no truth: no marks
    path = plots.concept_graph(W, TALLY, [0, 1], tmp_path / "fig6.png", top_units=3, truth=truth,
                               class_names=["disc + dotted", "striped + sky-s"])
    with Image.open(path) as im:
        assert im.format == "PNG"
