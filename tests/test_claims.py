"""Claim verdicts are decided by the interval."""

from __future__ import annotations

import pytest

from dka import claims
from dka.stats import Interval


@pytest.mark.parametrize("kind,margin,low,high,verdict", [
    ("equivalent", 1.0, -0.5, 0.8, "reproduced"),
    ("equivalent", 1.0, -0.5, 1.5, "inconclusive"),
    ("equivalent", 1.0, 1.2, 3.0, "not reproduced"),
    ("equivalent", 1.0, -4.0, -1.1, "not reproduced"),
    ("greater", 0.0, 0.1, 0.4, "reproduced"),
    ("greater", 0.0, -0.1, 0.4, "inconclusive"),
    ("greater", 0.95, 0.60, 0.70, "not reproduced"),
    ("less", 0.05, 0.01, 0.03, "reproduced"),
    ("less", 0.05, 0.2, 0.4, "not reproduced"),
])
def test_judge(kind, margin, low, high, verdict):
    claim = claims.Claim("x", "s", "src", "p", kind, margin, "m")
    assert claims.judge(claim, Interval((low + high) / 2, low, high, 3)) == verdict


def test_one_value_without_interval_is_inconclusive():
    assert claims.judge(claims.CLAIMS["parity-d5a"], Interval(0.1, float("nan"), float("nan"), 1)) == "inconclusive"


def test_record_collect_and_table(tmp_path):
    out = tmp_path / "results" / "01_cifar"
    claims.record(out, "parity-d5a", Interval(0.2, -0.4, 0.8, 3), "CIFAR-10 (JPEG copy)", note="3 seeds")
    claims.record(out, "parity-d5a", Interval(0.3, -0.3, 0.9, 3), "CIFAR-10 (JPEG copy)", note="3 seeds")  # replaces
    claims.record(out, "sparsity-99", Interval(0.6, 0.55, 0.65, 3), "CIFAR-10 (JPEG copy)")
    frame = claims.collect(tmp_path / "results")
    assert list(frame["claim"]) == ["parity-d5a", "sparsity-99"]
    assert list(frame["verdict"]) == ["reproduced", "not reproduced"]
    path = claims.write_table(frame, tmp_path / "results", "Claims")
    text = path.read_text()
    assert "| A Dynamic-K head (K=5)" in text and "1 reproduced, 1 not reproduced, 0 inconclusive" in text
    row = next(line for line in text.splitlines() if "About 99%" in line)
    assert "(\\|w\\| < 1e-3)" in row  # escaped: the row keeps its number of cells
    header = next(line for line in text.splitlines() if line.startswith("| statement"))
    assert row.replace("\\|", "").count("|") == header.count("|")
    with pytest.raises(KeyError, match="unknown claim"):
        claims.record(out, "nope", Interval(0, 0, 0, 1), "x")
