"""Captum interoperability: DKA's exact contributions in Captum's conventions, post-hoc maps, scoring."""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients

import dka
from dka import metrics, posthoc
from dka.data.scenes import generate


@pytest.fixture(scope="module", params=["res18", "res18-d3a"])
def model(request):
    torch.manual_seed(0)
    return dka.build(request.param, num_classes=5, width=4).eval()


def test_dka_contributions_follow_captum_conventions(model):
    x = torch.randn(4, 3, 16, 16)
    attr = dka.attribute(model, x)
    contributions = posthoc.DynamicKContributions(model, model.head).attribute(x)
    assert contributions.shape == attr.activations.shape  # the layer input's shape, Captum's convention
    torch.testing.assert_close(contributions, attr.effective * attr.score[:, None], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(contributions.sum(1) + attr.bias, attr.score, rtol=1e-4, atol=1e-5)  # completeness
    if model.head.__class__.__name__ == "DynamicKLinear":
        assert int((contributions != 0).sum(1).max()) <= model.head.k
    # Captum's own Integrated Gradients on the head's input (zero baseline) finds the same numbers: top-K
    # picks the same products all along the path a * x, so the gradient is W[c, i] on the routed units
    ig = LayerIntegratedGradients(model, model.head).attribute(x, target=attr.target, n_steps=8,
                                                                attribute_to_layer_input=True)
    torch.testing.assert_close(ig, contributions, rtol=1e-3, atol=1e-4)
    other = posthoc.DynamicKContributions(model, model.head).attribute(x, target=0)
    torch.testing.assert_close(other.sum(1) + model.head.bias[0], model(x)[:, 0].detach(), rtol=1e-4, atol=1e-5)


def test_grad_cam_on_a_linear_head_is_the_head_decomposition(model):
    # Grad-CAM weighs each feature map by its mean gradient, W[c, i] / (h w) for a linear head over average
    # pooling (only the routed units for a Dynamic-K head): Captum's Grad-CAM must equal dka's spatial map
    x = torch.randn(3, 3, 16, 16)
    cam, classes = posthoc.attribution_maps(model, x, "grad_cam")
    own, own_classes = posthoc.attribution_maps(model, x, "dka")
    assert cam.shape == own.shape == (3, 16, 16) and torch.equal(classes, own_classes)
    torch.testing.assert_close(cam, own, rtol=1e-4, atol=1e-6)
    assert model.training is False


def test_integrated_gradients_maps_sum_to_the_score_difference(model):
    x = torch.randn(2, 3, 16, 16)
    maps, classes = posthoc.attribution_maps(model, x, "integrated_gradients", target=[1, 2], steps=256)
    assert classes.tolist() == [1, 2] and maps.shape == (2, 16, 16)
    with torch.no_grad():
        gain = model(x)[[0, 1], [1, 2]] - model(torch.zeros_like(x))[[0, 1], [1, 2]]
    torch.testing.assert_close(maps.flatten(1).sum(1), gain, rtol=0.05, atol=0.02)
    _, delta = IntegratedGradients(model).attribute(x, target=classes, n_steps=256, return_convergence_delta=True)
    assert float(delta.abs().max()) < 0.05 * float(gain.abs().max()) + 0.02
    with pytest.raises(ValueError, match="grad_cam"):
        posthoc.attribution_maps(model, x, "lime")


def test_localisation_summary_and_class_masks(tmp_path):
    maps = torch.tensor([[[1.0, 3.0], [-5.0, 0.0]], [[0.0, 2.0], [0.0, 0.0]], [[-1.0, 0.0], [0.0, 0.0]]])
    masks = torch.tensor([[[True, False], [True, True]], [[False, True], [False, False]],
                          [[True, True], [True, True]]])
    summary = posthoc.localisation(maps, masks)
    assert summary["images"] == 2  # the third map has no positive mass
    assert summary["share"] == pytest.approx((0.25 + 1.0) / 2)
    assert summary["pointing"] == pytest.approx(2 / 3)  # every peak is at (0, 1): outside, inside, inside
    assert summary["mask_area"] == pytest.approx((0.75 + 0.25 + 1.0) / 3)

    root = generate("smoke", tmp_path / "smoke", seed=0, processes=1, progress=False)
    truth = metrics.ConceptTruth(root, split="test")
    items = list(range(4))
    own = posthoc.class_masks(truth, items, [truth[j]["label"] for j in items])
    assert torch.equal(own, torch.stack([truth[j]["mask"] for j in items]))
    other = [(truth[j]["label"] + 1) % len(truth.class_names) for j in items]
    assert not torch.equal(posthoc.class_masks(truth, items, other), own)
    with pytest.raises(ValueError, match="one class per image"):
        posthoc.class_masks(truth, items, other[:2])
