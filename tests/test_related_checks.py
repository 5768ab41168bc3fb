"""dka.related: the papers' checks on hand-made maps, paths and scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dka.related import adversarial, filters, paths


def _maps(peaks, values, totals, labels, map_size=(2, 2), image_size=(8, 8)):
    return filters.FilterMaps(torch.tensor(peaks), torch.tensor(values, dtype=torch.float),
                              torch.tensor(totals, dtype=torch.float), torch.tensor(labels), map_size, image_size)


def test_categories_and_specificity_follow_the_papers_rule():
    # 2 filters, 3 images of classes 0, 0, 1
    totals = [[4.0, 1.0], [2.0, 1.0], [0.0, 6.0]]
    maps = _maps([[0, 0]] * 3, [[1.0, 1.0]] * 3, totals, [0, 0, 1])
    assert filters.assign_categories(maps.totals, maps.labels, 2).tolist() == [0, 1]
    spec = filters.category_specificity(maps, torch.tensor([0, 1]), 2)
    # filter 0: class means 3 and 0 -> 1.0; filter 1: means 1 and 6 -> 6/7
    assert spec["per_filter"].tolist() == pytest.approx([1.0, 6 / 7])
    assert spec["mean_share"] == pytest.approx((1 + 6 / 7) / 2) and spec["chance"] == 0.5


def test_peak_pixels_are_cell_centres():
    px = filters.peak_pixels(torch.tensor([0, 3]), (2, 2), (8, 8))
    assert px.tolist() == [[2.0, 2.0], [6.0, 6.0]]


def test_location_instability_is_zero_for_a_filter_that_follows_its_landmark():
    # one filter of class 0; its peak is always at the landmark's cell -> distance constant 0
    peaks = [[0], [3], [1]]
    landmarks = [{7: (2.0, 2.0)}, {7: (6.0, 6.0)}, {7: (2.0, 6.0)}]
    maps = _maps(peaks, [[1.0], [2.0], [3.0]], [[1.0]] * 3, [0, 0, 0])
    out = filters.location_instability(maps, torch.tensor([0]), landmarks)
    assert out["instability"] == pytest.approx(0.0)
    # a peak that stays put while the landmark moves: sd of distances over the image diagonal
    still = _maps([[0], [0], [0]], [[1.0], [2.0], [3.0]], [[1.0]] * 3, [0, 0, 0])
    d = np.array([0.0, np.hypot(4, 4), 4.0])
    expected = d.std(ddof=1) / np.hypot(8, 8)
    assert filters.location_instability(still, torch.tensor([0]), landmarks)["instability"] == pytest.approx(expected)
    # only the top images of the filter's own class count
    assert filters.location_instability(still, torch.tensor([0]), landmarks, top=1)["filters"] == 0


def test_concept_hits_count_peaks_inside_true_masks():
    mask_a = torch.zeros(8, 8, dtype=torch.bool)
    mask_a[:4, :4] = True  # the cell (0, 0) of a 2 x 2 map
    mask_b = torch.zeros(8, 8, dtype=torch.bool)
    mask_b[4:, 4:] = True  # cell (1, 1)
    masks = [{1: mask_a, 2: mask_b}] * 3
    maps = _maps([[0], [3], [1]], [[3.0], [2.0], [1.0]], [[1.0]] * 3, [0, 0, 0])
    out = filters.concept_hits(maps, torch.tensor([0]), masks)
    assert out["hit_rate"] == pytest.approx(2 / 3)  # cells 0 and 3 hit, cell 1 misses
    assert out["chance"] == pytest.approx(0.5)  # 2 of the 4 cell centres lie in a mask
    assert out["purity"] == pytest.approx(0.5) and out["modal_concept"][0] in (1, 2)


def test_own_concept_rate_is_cross_fitted_and_counts_an_absent_concept_as_a_miss():
    mask_a = torch.zeros(8, 8, dtype=torch.bool)
    mask_a[:4, :4] = True  # cell 0 of a 2 x 2 map
    mask_b = torch.zeros(8, 8, dtype=torch.bool)
    mask_b[4:, 4:] = True  # cell 3
    masks = [{1: mask_a, 2: mask_b}] * 3 + [{2: mask_b}]  # the weakest image lacks concept 1
    maps = _maps([[0], [0], [0], [0]], [[4.0], [3.0], [2.0], [1.0]], [[1.0]] * 4, [0, 0, 0, 0])
    out = filters.concept_hits(maps, torch.tensor([0]), masks)
    # ranks 0, 2 choose concept 1 on ranks 1, 3 (one hit) and hit it twice; ranks 1, 3 choose it on 0, 2
    # and hit it once (rank 3's image has no concept 1: a miss there, and no area for chance)
    assert out["concept_rate"] == pytest.approx(3 / 4)
    assert out["concept_chance"] == pytest.approx((0.25 * 3 + 0.0) / 4)
    assert out["hit_rate"] == pytest.approx(3 / 4) and out["purity"] == pytest.approx(1.0)
    one = filters.concept_hits(_maps([[0]], [[1.0]], [[1.0]], [0]), torch.tensor([0]), masks[:1])
    assert np.isnan(one["concept_rate"])  # a single top image leaves a half empty: undefined, not 0


def test_concept_landmarks_are_mask_centroids():
    m = torch.zeros(4, 4, dtype=torch.bool)
    m[0:2, 2:4] = True
    marks = filters.concept_landmarks([{5: m, 6: torch.zeros(4, 4, dtype=torch.bool), 9: m}], exclude={9})
    assert marks == [{5: (1.0, 3.0)}]


def test_gate_statistics_and_class_paths():
    gates = {"a": torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=torch.bool)}
    labels = torch.tensor([0, 0, 1, 1])
    sp = paths.gate_sparsity(gates)
    assert sp["overall"] == pytest.approx(0.5) and sp["layers"]["a"] == pytest.approx(0.5)
    rates = paths.class_open_rates(gates, labels, 2)
    assert rates["a"].tolist() == [[1.0, 0.5], [0.0, 0.5]]
    tally = pd.DataFrame({"unit": [1, 2], "label": ["disc", "red-c"], "category": ["object", "color"],
                          "score": [0.2, 0.05]})
    table = paths.class_paths(gates, labels, ["c0", "c1"], tallies={"a": tally}, top=1)
    first = table.iloc[0]
    assert (first["class"], first["unit"], first["label"]) == ("c0", 0, "disc")  # open 1.0 vs 0.5 overall
    assert table[table["class"] == "c1"]["unit"].tolist() == [1]  # unit 0 is never open for c1


def test_roc_auc_counts_ties_as_one_half():
    assert adversarial.roc_auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert adversarial.roc_auc(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])) == 0.5
    assert adversarial.roc_auc(torch.tensor([1.0]), torch.tensor([1.0, 2.0])) == 0.75
    with pytest.raises(ValueError):
        adversarial.roc_auc(torch.tensor([]), torch.tensor([1.0]))


def test_path_surprise_is_the_bernoulli_nll_under_the_predicted_class():
    rates = {"a": torch.tensor([[0.9, 0.1], [0.2, 0.5]])}
    gates = {"a": torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)}
    s = adversarial.path_surprise(gates, torch.tensor([0, 0]), rates)
    expected0 = -(np.log(0.9) + np.log(0.9)) / 2
    expected1 = -(np.log(0.1) + np.log(0.1)) / 2
    assert s.tolist() == pytest.approx([expected0, expected1], rel=1e-5)


def test_probe_separates_separable_features_and_not_noise():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(100, 5, generator=g)
    assert adversarial.probe_auc(clean, torch.randn(100, 5, generator=g) + 2.0) > 0.95
    assert abs(adversarial.probe_auc(clean, torch.randn(100, 5, generator=g)) - 0.5) < 0.15


def test_fgsm_moves_pixels_by_epsilon_in_the_loss_increasing_direction():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    x = torch.rand(5, 3, 4, 4) * 0.5 + 0.25  # pixels away from the [0, 1] bounds
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    normalised = (x - 0.5) / 0.25
    y = torch.tensor([0, 1, 2, 0, 1])
    adv = adversarial.fgsm(model, normalised, y, 0.01, mean, std)
    step = adv * 0.25 + 0.5 - x
    assert torch.allclose(step.abs(), torch.full_like(step, 0.01), atol=1e-6)
    loss = lambda z: torch.nn.functional.cross_entropy(model(z), y)  # noqa: E731
    assert loss(adv) > loss(normalised)
