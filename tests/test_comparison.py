"""Notebook 06's scores of one trained model, on the smoke concept scenes."""

from __future__ import annotations

import math

import pytest
import torch

from dka import comparison
from dka.data.scenes import generate
from dka.metrics import ConceptTruth
from dka.models import build


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    return generate("smoke", tmp_path_factory.mktemp("scenes") / "smoke", seed=0, processes=1, progress=False)


def test_score_run_fills_every_column_for_a_resnet(smoke_root):
    torch.manual_seed(0)
    truth = ConceptTruth(smoke_root, "test")
    model = build("res18-d3a", len(truth.class_names), stem="cifar", width=4)
    scores = comparison.score_run(model, truth, smoke_root, eval_images=40, batch_size=32)
    assert set(scores) == set(comparison.SCORE_COLUMNS)
    assert all(not math.isnan(v) for v in scores.values())
    assert 0 <= scores["localisation"] <= 1 and 0 <= scores["recovery precision"] <= 1


def test_score_run_leaves_class_columns_empty_without_a_unit_head(smoke_root):
    truth = ConceptTruth(smoke_root, "test")

    class NoHead(torch.nn.Module):  # a linear map of the pixels: no units, no dissection-sized head
        feature_layer = "conv"

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, len(truth.class_names))

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    model = NoHead()
    explain = lambda m, x, c: x.abs().sum(1)  # noqa: E731 - a trivial post-hoc map
    scores = comparison.score_run(model, truth, smoke_root, explain=explain, eval_images=16, batch_size=16)
    assert math.isnan(scores["recovery precision"]) and not math.isnan(scores["mean IoU"])
