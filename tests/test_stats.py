"""Intervals and paired tests, on cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dka import stats


def test_t_interval_matches_the_textbook_formula():
    iv = stats.mean_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.302653: half width 4.302653 / sqrt(3)
    assert iv.mean == 2.0 and iv.n == 3 and iv.sd == pytest.approx(1.0)
    assert (-iv).low == -iv.high and (-iv).mean == -2.0
    assert iv.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert iv.format(1) == "2.0 ± 2.5"
    one = stats.mean_interval([5.0])
    assert one.mean == 5.0 and math.isnan(one.low) and one.format() == "5.00" and not one.excludes(0)


def test_interval_excludes():
    iv = stats.Interval(1.0, 0.5, 1.5, 3)
    assert iv.excludes(0.0) and iv.excludes(2.0) and not iv.excludes(1.2)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = stats.bootstrap_interval(rng.normal(0, 1, 50), seed=1)
    large = stats.bootstrap_interval(rng.normal(0, 1, 5000), seed=1)
    assert small.low < small.mean < small.high
    assert large.half_width < small.half_width / 5
    constant = stats.bootstrap_interval(np.ones(20))
    assert constant.low == constant.high == 1.0


def test_bootstrap_difference_separates_shifted_samples_and_not_equal_ones():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1, 400), rng.normal(0.0, 1, 300)
    shifted = stats.bootstrap_difference(a, b)
    assert shifted.mean == pytest.approx(a.mean() - b.mean())
    assert 0.7 < shifted.low < shifted.mean < shifted.high < 1.3
    same = stats.bootstrap_difference(a, a[::-1])  # one sample, resampled twice: no difference
    assert same.mean == pytest.approx(0, abs=1e-12) and same.low < 0 < same.high
    with pytest.raises(ValueError, match="at least one item"):
        stats.bootstrap_difference([], [1.0])


def test_mcnemar_exact_counts_and_p_value():
    a = np.array([1, 1, 1, 1, 0, 0, 1, 1], bool)
    b = np.array([0, 0, 0, 1, 0, 1, 1, 1], bool)
    result = stats.mcnemar(a, b)
    assert (result["a_only"], result["b_only"]) == (3, 1)
    assert result["p_value"] == pytest.approx(0.625)  # 2 * P(X >= 3), X ~ Bin(4, 1/2) = 2 * 5/16
    assert stats.mcnemar(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError, match="different images"):
        stats.mcnemar(a, b[:4])


def test_paired_difference_over_seeds_and_over_images():
    iv = stats.paired_difference([90.0, 91.0, 92.0], [89.0, 89.0, 91.0])
    assert iv.mean == pytest.approx(4 / 3) and iv.n == 3 and iv.method == "t"
    correct_a = np.r_[np.ones(900), np.zeros(100)]
    correct_b = np.r_[np.ones(850), np.zeros(150)]
    one = stats.paired_difference([90.0], [85.0], correct_a, correct_b)
    assert one.mean == 5.0 and one.low > 0 and one.method.startswith("paired bootstrap")


def test_seed_summaries_and_paired_differences():
    import numpy as np

    from dka import summaries
    from dka.evaluation import Collected

    values = {"res18": [80.0, 82.0, 81.0], "res18-d5a": [81.0, 83.0, 83.0]}
    assert summaries.over_seeds(values)["res18"].mean == pytest.approx(81.0)
    diff = summaries.differences(values, "res18")
    assert diff["res18-d5a"].mean == pytest.approx(4 / 3) and diff["res18"].mean == 0.0
    with pytest.raises(KeyError, match="baseline"):
        summaries.differences(values, "res50")

    def collected(correct):
        return Collected(pooled=np.zeros((len(correct), 1)), logits=np.stack([correct, 1 - correct], 1).astype(float),
                         labels=np.zeros(len(correct), dtype=np.int64))

    evals = {"res18": [collected(np.r_[np.ones(80), np.zeros(20)])],
             "res18-d5a": [collected(np.r_[np.ones(90), np.zeros(10)])]}
    one = summaries.differences({"res18": [80.0], "res18-d5a": [90.0]}, "res18", evals)
    assert one["res18-d5a"].mean == 10.0 and one["res18-d5a"].low > 0
    assert summaries.mcnemar_per_seed(evals, "res18")["res18-d5a"][0] < 0.01
    assert "3 seeds" in summaries.interval_note(3) and "bootstrap" in summaries.interval_note(1)
