"""Ground-truth explanation scores: hand-made cases, and the scenes' true-concept masks."""

from __future__ import annotations

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
