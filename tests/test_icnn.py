"""res18-icnn: the Interpretable-CNN templates, filter loss, mask layer and filter categories (hand-checked)."""

from __future__ import annotations

import math

import pytest
import torch

from dka import models
from dka.models import icnn


def test_templates_peak_at_their_position_and_decay_with_l1_distance():
    t = icnn.position_templates(2, 2, beta=1.0, tau=0.25)
    assert t.shape == (5, 4)
    # n = 2: distance 1 -> 1 - 1/2, distance 2 -> 0; raster order (0,0), (0,1), (1,0), (1,1)
    assert torch.allclose(t[0], torch.tensor([1.0, 0.5, 0.5, 0.0]) * 0.25)
    assert torch.allclose(t[3], torch.tensor([0.0, 0.5, 0.5, 1.0]) * 0.25)
    assert torch.allclose(t[4], torch.full((4,), -0.25))
    # the paper's defaults: tau = 0.5 / n^2, beta = 4 (the far corner is clamped at -tau)
    paper = icnn.position_templates(4, 4)
    assert paper[0, 0] == pytest.approx(0.5 / 16) and paper[0, 15] == pytest.approx(-0.5 / 16)
    assert paper[0, 1] == pytest.approx(0.0)  # 1 - 4 * 1 / 4


def test_prior_gives_alpha_to_the_positive_templates():
    p = icnn.template_log_prior(4).exp()
    assert torch.allclose(p, torch.full((5,), 0.2))  # alpha = n^2 / (1 + n^2): all templates alike
    p = icnn.template_log_prior(4, alpha=0.6).exp()
    assert torch.allclose(p, torch.tensor([0.15, 0.15, 0.15, 0.15, 0.4]))
    with pytest.raises(ValueError, match="alpha"):
        icnn.template_log_prior(4, alpha=1.0)


def test_mutual_information_of_two_one_pixel_maps_by_hand():
    # maps x1 = 1, x2 = 0; templates T+ = tau = 1, T- = -1, priors 1/2 each
    templates = icnn.position_templates(1, 1, tau=1.0)
    log_prior = icnn.template_log_prior(1)
    fmaps = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
    e = math.e
    p_pos = [e / (e + 1), 1 / (e + 1)]  # p(x | T+) = exp(x) / Z
    p_neg = [1 / (1 + e), e / (e + 1)]  # p(x | T-) = exp(-x) / Z
    p_x = [0.5 * a + 0.5 * b for a, b in zip(p_pos, p_neg)]  # both 1/2
    full = sum(0.5 * p[k] * math.log(p[k] / p_x[k]) for p in (p_pos, p_neg) for k in range(2))
    mi = icnn.filter_mutual_information(fmaps, templates, log_prior)
    assert mi.shape == (1,) and mi.item() == pytest.approx(full, rel=1e-5)
    assert full == pytest.approx(0.1109, abs=1e-4)
    # with each map assigned to one template (x1 -> T+, x2 -> T-) only those pairs count
    target = torch.tensor([[0], [1]])
    hard = 0.5 * p_pos[0] * math.log(p_pos[0] / p_x[0]) + 0.5 * p_neg[1] * math.log(p_neg[1] / p_x[1])
    assert icnn.filter_mutual_information(fmaps, templates, log_prior, target).item() == pytest.approx(hard, rel=1e-5)


def test_mutual_information_is_bounded_by_the_template_entropy():
    torch.manual_seed(0)
    templates, log_prior = icnn.position_templates(3, 3, tau=2.0), icnn.template_log_prior(9)
    entropy = -(log_prior.exp() * log_prior).sum()
    mi = icnn.filter_mutual_information(torch.rand(32, 5, 3, 3) * 4, templates, log_prior)
    assert mi.shape == (5,) and (mi >= -1e-6).all() and (mi <= entropy + 1e-6).all()
    # a filter whose maps each fire at one distinct place carries more information than a flat one
    peaked = torch.zeros(9, 1, 3, 3)
    peaked.view(9, 9)[range(9), range(9)] = 5.0
    flat = torch.ones(9, 1, 3, 3) * 5.0 / 9
    assert icnn.filter_mutual_information(peaked, templates, log_prior) > icnn.filter_mutual_information(
        flat, templates, log_prior)


def test_mask_layer_keeps_the_template_around_each_maps_own_peak():
    x = torch.zeros(1, 2, 3, 3)
    x[0, 0] = torch.tensor([[1.0, 1.0, 3.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])  # peak at (0, 2)
    x[0, 1] = torch.ones(3, 3)
    x[0, 1, 2, 0] = 2.0  # peak at (2, 0)
    out = icnn.template_mask(x, beta=1.0)
    d = torch.tensor([[2.0, 1.0, 0.0], [3.0, 2.0, 1.0], [4.0, 3.0, 2.0]])  # L1 distance to (0, 2)
    assert torch.allclose(out[0, 0], torch.relu(x[0, 0] * (1 - d / 3).clamp_min(-1)))
    assert out[0, 0, 0, 2] == 3.0 and out[0, 0, 2, 0] == 0.0  # 1 - 4/3 < 0: cut by the ReLU
    assert out[0, 1, 2, 0] == 2.0 and out[0, 1, 0, 2] == 0.0
    # the paper's beta = 4 on a 4 x 4 map keeps the peak cell only
    y = torch.rand(2, 3, 4, 4) + 0.1
    kept = icnn.template_mask(y, beta=4.0) > 0
    assert (kept.flatten(2).sum(2) == 1).all()


def test_gradient_flows_through_the_mask_to_the_maps():
    x = (torch.rand(2, 3, 4, 4) + 0.1).requires_grad_(True)
    icnn.template_mask(x, beta=1.0).sum().backward()
    dist = torch.cdist(*(torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
                        .view(16, 2),) * 2, p=1)
    peak = x.detach().flatten(2).argmax(2)
    expected = (1 - dist[peak] / 4).clamp_min(0).view(2, 3, 4, 4)  # d(relu(x m))/dx = m where m > 0
    assert torch.allclose(x.grad, expected)


def test_filter_categories_are_a_running_mean_of_class_activation():
    model = models.build("res18-icnn", 3, width=4, momentum=0.9)
    totals = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]]).repeat(1, 16)  # 32 filters
    labels = torch.tensor([0, 0, 2])
    model.update_filter_classes(totals, labels)
    assert model.class_activation[0].tolist() == [2.0, 0.0, 0.0] and model.class_seen.tolist() == [True, False, True]
    assert model.filter_classes[:2].tolist() == [0, 2]
    model.update_filter_classes(torch.tensor([[10.0, 1.0]]).repeat(1, 16), torch.tensor([2]))
    assert model.class_activation[0, 2].item() == pytest.approx(0.1 * 10)  # 0.9 * 0 + 0.1 * 10
    assert model.class_activation[1, 2].item() == pytest.approx(0.9 * 5 + 0.1 * 1)
    assert model.filter_classes[0].item() == 0  # 2.0 beats 1.0


def test_filter_loss_reaches_the_backbone_and_is_built_by_name():
    torch.manual_seed(0)
    model = models.build("res18-icnn", 4, stem="cifar", width=4, filter_weight=2.0, tau=0.5)
    assert model.build_kwargs["filter_weight"] == 2.0 and model.dynamic_layers() == {}
    rebuilt = models.build(**model.build_kwargs)
    assert (rebuilt.filter_weight, rebuilt.tau, rebuilt.beta) == (2.0, 0.5, 4.0)
    model.train()
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    model(x)
    aux = model.auxiliary_losses(y, None)
    assert set(aux) == {"filter"} and aux["filter"].item() < 0
    aux["filter"].backward()
    assert model.layer4[1].conv2.weight.grad.abs().sum() > 0
    assert model.head.weight.grad is None  # the filter loss is on the maps, before the head
    with pytest.raises(RuntimeError, match="training forward"):
        model.auxiliary_losses(y, None)
    with pytest.raises(ValueError, match="valid options: alpha, beta"):
        models.build("res18-icnn", 4, width=4, lambda_=1)


def test_explain_adds_each_filters_peak_to_the_exact_decomposition():
    torch.manual_seed(0)
    model = models.build("res18-icnn", 5, stem="cifar", width=4).eval()
    x = torch.randn(3, 3, 16, 16)
    attr = model.explain(x, target=2)
    assert torch.allclose(attr.contributions.sum(1) + attr.bias / attr.score, torch.ones(3), atol=1e-5)
    with torch.no_grad():
        fmaps = model.features(x)
    flat = fmaps.flatten(2).argmax(2)
    assert attr.peaks.shape == (3, model.num_features, 2)
    assert torch.equal(attr.peaks[..., 0] * fmaps.shape[3] + attr.peaks[..., 1], flat)
    assert attr.filter_classes.shape == (model.num_features,)
