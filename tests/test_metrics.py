"""Ground-truth explanation scores: hand-made cases, and the scenes' true-concept masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dka import metrics
from dka.data import build_loaders
from dka.data.scenes import generate


def test_localisation_share_counts_positive_mass_inside():
    maps = torch.tensor([[[1.0, 3.0], [-5.0, 0.0]], [[-1.0, -2.0], [0.0, 0.0]]])
    masks = torch.tensor([[[True, False], [True, True]], [[True, True], [True, True]]])
    share = metrics.localisation_share(maps, masks)
    assert share[0].item() == pytest.approx(0.25)  # 1 of 4 positive units inside; negatives ignored
    assert torch.isnan(share[1])  # no positive mass at all


def test_pointing_game_uses_the_peak():
    maps = torch.tensor([[[0.0, 2.0], [1.0, 0.0]], [[0.0, 2.0], [1.0, 0.0]]])
    masks = torch.tensor([[[False, True], [False, False]], [[True, False], [True, True]]])
    assert metrics.pointing_game(maps, masks).tolist() == [True, False]
    with pytest.raises(ValueError, match="pixel_map"):
        metrics.pointing_game(maps, masks[:, :1])


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    return generate("smoke", tmp_path_factory.mktemp("scenes") / "smoke", seed=0, processes=1, progress=False)


def test_concept_truth_masks_are_the_class_concepts_pixels(smoke_root):
    truth = metrics.ConceptTruth(smoke_root, split="test")
    bundle = build_loaders("scenes-smoke", smoke_root, batch_size=8, workers=0, augment=False)
    assert len(truth) == len(bundle.test.dataset)
    names = {int(r.split(",")[0]): r.split(",")[1] for r in (smoke_root / "label.csv").read_text().splitlines()[1:]}
    checked = 0
    for j in range(0, len(truth), 7):
        item = truth[j]
        image, label = bundle.test.dataset[j]
        torch.testing.assert_close(item["image"], image, rtol=0, atol=1e-5)  # same pixels, same normalisation
        assert item["label"] == int(label)
        raw = truth.broden[truth.items[j][0]]
        concepts = {names[n] for n in truth.class_labels[item["label"]]}
        expected = torch.zeros_like(item["mask"])
        for layer in raw["seg"]:
            for number in layer.unique().tolist():
                if number and names[number] in concepts:
                    expected |= layer == number
        if any(names[n] in concepts for n in raw["image_labels"].tolist()):
            expected |= (raw["seg"] == 0).all(0)
        assert torch.equal(item["mask"], expected)
        checked += int(expected.any())
    assert checked > 3  # the masks are not all empty


class _Brightness(torch.nn.Module):
    """A toy classifier: class 0's logit is the mean of the top-left quadrant, class 1's is 0."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        score = x[:, :, :2, :2].mean(dim=(1, 2, 3)) * 10
        return torch.stack([score, torch.zeros_like(score)], dim=1) + self.dummy


def test_deletion_removes_the_evidence_first_for_a_faithful_map():
    images = torch.ones(1, 3, 4, 4)
    good = torch.zeros(1, 4, 4)
    good[:, :2, :2] = 1.0  # points at the quadrant the class reads
    bad = 1.0 - good
    model, target = _Brightness(), torch.tensor([0])
    curve_good = metrics.deletion_curve(model, images, good, target)
    curve_bad = metrics.deletion_curve(model, images, bad, target)
    assert curve_good[0, 0] == curve_bad[0, 0] and curve_good[0, -1] == pytest.approx(0.5)
    assert metrics.deletion_auc(curve_good)[0] < metrics.deletion_auc(curve_bad)[0]
    with pytest.raises(ValueError, match="pixel_map"):
        metrics.deletion_curve(model, images, good[:, :2], target)


def test_score_explanations_over_a_split(smoke_root):
    from dka.models import build

    torch.manual_seed(0)
    truth = metrics.ConceptTruth(smoke_root, split="test")
    model = build("res18-d3a", len(truth.class_names), stem="cifar", width=4)
    explain = lambda m, x, c: m.explain(x, c).pixel_map(tuple(x.shape[-2:]))  # noqa: E731
    scores = metrics.score_explanations(model, truth, explain, batch_size=32, progress=False)
    assert set(scores) == {"label", "predicted", "localisation", "pointing", "deletion_auc"}
    assert all(len(v) == len(truth) for v in scores.values())
    finite = scores["localisation"][~np.isnan(scores["localisation"])]
    assert ((finite >= 0) & (finite <= 1)).all() and ((scores["deletion_auc"] >= 0) & (scores["deletion_auc"] <= 1)).all()
