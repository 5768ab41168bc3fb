"""Per-image evaluation, the three residual definitions, routed weights, the pruned-head control."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dka import baselines, concepts, evaluation
from dka.models import build


def test_residual_definitions_on_a_hand_made_head():
    # one image of class 0, three units; products W[0] * x = [3, 1, -2], bias 0.5
    collected = evaluation.Collected(pooled=np.array([[1.0, 1.0, 2.0]]), logits=np.zeros((1, 2)), labels=np.array([0]))
    weight = np.array([[3.0, 1.0, -1.0], [0.0, 0.0, 0.0]])
    bias = np.array([0.5, 0.0])
    dense = evaluation.residuals(collected, weight, bias, k=None, n=1)
    assert dense["paper"][0] == pytest.approx(1 - 3 / 2)  # Y_c = 3 + 1 - 2 = 2: negative residual
    assert dense["authors_demo"][0] == pytest.approx(1 - 3 / 6)  # sum |W x| = 6
    assert dense["routed"][0] == pytest.approx(1 - 3 / 2.5)  # y_c = 2 + 0.5
    dk = evaluation.residuals(collected, weight, bias, k=2, n=2)
    assert dk["routed"][0] == pytest.approx(1 - 4 / 4.5)  # routed units 0, 1: y_c = 4 + 0.5, bias share left
    assert dk["paper"][0] == pytest.approx(1 - 4 / 2)
    with pytest.raises(ValueError, match="1 <= n <= 3"):
        evaluation.residuals(collected, weight, bias, k=None, n=4)


def test_collect_matches_the_model_and_routed_weight_zeroes_unrouted():
    torch.manual_seed(0)
    model = build("res18-d2a", 3, stem="cifar", width=4).eval()
    images, labels = torch.randn(10, 3, 8, 8), torch.randint(0, 3, (10,))
    got = evaluation.collect(model, DataLoader(TensorDataset(images, labels), batch_size=4))
    with torch.no_grad():
        np.testing.assert_allclose(got.logits, model(images).double().numpy(), rtol=1e-5, atol=1e-6)
    assert got.pooled.shape == (10, model.num_features) and got.accuracy == 100 * got.correct.mean()
    mask = np.zeros((3, model.num_features), bool)
    mask[:, :2] = True
    w = evaluation.routed_weight(model.head.weight, mask)
    assert (w[:, 2:] == 0).all() and np.allclose(w[:, :2], model.head.weight.detach().numpy()[:, :2])
    with pytest.raises(ValueError, match="does not match"):
        evaluation.routed_weight(model.head.weight, mask[:, :3])


def test_pruned_head_keeps_k_inputs_per_class_and_refits_them():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8)).clip(0)  # post-ReLU-like features
    y = (x[:, 0] + 0.5 * x[:, 1] > x[:, 2] + 0.5 * x[:, 3]).astype(np.int64)
    dense_w = rng.normal(scale=0.1, size=(2, 8))
    head = baselines.prune_head(dense_w, np.zeros(2), x, y, k=2, epochs=40, lr=0.2)
    assert head.mask.sum(1).tolist() == [2, 2] and (head.weight[~head.mask] == 0).all()
    assert (head.logits(x).argmax(1) == y).mean() > 0.75
    with pytest.raises(ValueError, match="1 <= k <= 8"):
        baselines.prune_head(dense_w, np.zeros(2), x, y, k=9)


def test_authors_threshold_rule_counts_units_above_1e_3():
    tally = pd.DataFrame({"unit": [1, 2, 3, 4], "category": "object", "label": ["a", "b", "b", "c"],
                          "score": [0.1, 0.1, 0.1, 0.01]})
    weight = np.array([[0.5, 2e-3, 5e-4, 0.3]])
    per_class = concepts.class_concepts(weight, tally, rule="threshold")
    assert per_class.loc[0, "units"] == (1, 4, 2)  # by decreasing weight; unit 3 is below 1e-3
    assert per_class.loc[0, "concepts"] == ("a", "b") and per_class.loc[0, "n_concepts"] == 3  # unit 4: IoU < 0.04
    with pytest.raises(ValueError, match="rule"):
        concepts.class_concepts(weight, tally, rule="top5")
