"""res18-decouple: binary gates with a straight-through gradient, the three losses, the skipping inference path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dka import models
from dka.models import decouple
from dka.related import paths


def test_straight_through_gate_is_binary_with_the_sigmoid_gradient():
    v = torch.tensor([-2.0, -0.1, 0.3, 4.0], requires_grad=True)
    g = decouple.straight_through_gate(v, training=True)
    assert g.tolist() == [0.0, 0.0, 1.0, 1.0]
    (g * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    s = torch.sigmoid(v.detach())
    assert torch.allclose(v.grad, torch.tensor([1.0, 2.0, 3.0, 4.0]) * s * (1 - s))
    assert decouple.straight_through_gate(v.detach(), training=False).tolist() == [0.0, 0.0, 1.0, 1.0]


def _model(**options):
    torch.manual_seed(0)
    return models.build("res18-decouple", 4, stem="cifar", width=4, **options)


def test_gated_layers_keep_torchvision_names_and_every_conv_is_gated():
    model = _model()
    layers = model.gated_layers()
    assert list(layers)[:2] == ["layer1.0.conv1", "layer1.0.conv2"] and len(layers) == 16
    assert layers["layer4.1.conv2"] == model.num_features
    names = dict(model.named_modules())
    for name in ("layer2.0.conv1", "layer2.0.downsample.0", "layer4.1.bn2", "layer3.0.control1.fc2", "layer1.1.gate2"):
        assert name in names
    assert model.path_classifier.in_features == sum(layers.values())
    assert models.build(**model.build_kwargs).build_kwargs == model.build_kwargs


def test_closed_gates_zero_their_filters_and_the_last_block_zeroes_head_inputs():
    model = _model().eval()
    block = model.layer4[1]
    with torch.no_grad():
        block.control2.fc2.weight.zero_()
        block.control2.fc2.bias.copy_(torch.tensor([1.0, -1.0] * (model.num_features // 2)))
        fmaps = model.features(torch.randn(2, 3, 16, 16))
    assert (fmaps[:, 1::2] == 0).all()  # closed final gates: exact zeros at the head's input
    attr = model.explain(torch.randn(2, 3, 16, 16))
    assert (attr.contributions[:, 1::2] == 0).all()
    assert torch.allclose(attr.contributions.sum(1) + attr.bias / attr.score, torch.ones(2), atol=1e-5)
    assert attr.path["layer4.1.conv2"][:, 1::2].any() == False  # noqa: E712
    assert attr.path["layer4.1.conv2"][:, ::2].all()


def test_losses_by_hand_and_their_gradients_reach_the_control_modules():
    model = _model(mi_weight=0.5, align_weight=2.0, sparsity_weight=3.0, open_target=0.25, ramp_steps=4).train()
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    model.train_steps.fill_(2)  # half way up the ramp: the gate terms at half weight
    model(x)
    blocks = list(model.blocks().values())
    gates = [g.float() for b in blocks for g in b.gates]
    codes = [e for b in blocks for e in b.encodings]
    aux = model.auxiliary_losses(y, None)
    assert set(aux) == {"mi", "align", "sparsity"}
    mi = F.cross_entropy(model.path_classifier(torch.cat(gates, 1) / sum(model.gated_layers().values()) ** 0.5), y)
    assert aux["mi"].item() == pytest.approx(0.5 * mi.item(), rel=1e-5)
    # every gate starts open: each layer's open rate is 1, 0.75 above the target, for each of its filters
    assert all((g == 1).all() for g in gates)
    assert aux["sparsity"].item() == pytest.approx(0.5 * 3.0 * 0.75 * sum(model.gated_layers().values()), rel=1e-5)
    assert aux["align"].item() == 0.0  # no closed gate: no output to limit
    assert model.train_steps.item() == 3
    with torch.no_grad():  # close half of layer3.0's conv1 filters: their outputs now count
        model.layer3[0].control1.fc2.bias[::2] = -5.0
    model(x)
    gates = [g.float() for b in blocks for g in b.gates]
    codes = [e for b in blocks for e in b.encodings]
    aux = model.auxiliary_losses(y, None)
    align = sum(((1 - g) * e).sum(1).mean() for e, g in zip(codes, gates))  # summed over gates, mean over images
    assert align > 0 and aux["align"].item() == pytest.approx(0.75 * 2.0 * align.item(), rel=1e-5)
    sum(aux.values()).backward()
    for b in blocks:  # every gate logit gets a gradient; fc1 wherever its hidden ReLUs are alive (tiny widths kill some)
        for control in (b.control1, b.control2):
            assert control.fc2.bias.grad.abs().sum() > 0
            alive = (control.fc2.weight.grad.abs().sum(0) > 0).any()
            assert alive == (control.fc1.weight.grad.abs().sum() > 0)
    assert sum(c.fc1.weight.grad.abs().sum() > 0 for b in blocks for c in (b.control1, b.control2)) >= len(blocks)
    assert model.layer3[0].conv1.weight.grad.abs().sum() > 0  # the alignment also reaches the filters
    with pytest.raises(RuntimeError, match="training forward"):
        model.auxiliary_losses(y, None)


def test_sparse_path_skips_closed_filters_and_matches_the_gated_pass():
    model = _model()
    with torch.no_grad():  # random control modules: about half the gates closed, differently per image
        for b in model.blocks().values():
            for c in (b.control1, b.control2):
                c.fc2.weight.normal_(0, 3.0)
                c.fc2.bias.normal_(0, 0.5)
        model.train()
        for _ in range(3):  # BatchNorm running statistics away from their init
            model(torch.randn(8, 3, 16, 16))
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        gated = model(x)
    _, path = model.paths(x)
    sparse, macs = model.sparse_forward(x)
    assert torch.allclose(sparse, gated, atol=1e-5)
    closed = 1 - paths.flatten_path(path).mean().item()
    assert 0.2 < closed < 0.8
    dense = paths.forward_macs(model, x)
    assert (macs < dense).all()
    # with every gate open the executed count is the dense count (controllers included, classifier not)
    with torch.no_grad():
        for b in model.blocks().values():
            for c in (b.control1, b.control2):
                c.fc2.weight.zero_()
                c.fc2.bias.fill_(1.0)
    _, all_open = model.sparse_forward(x)
    assert (all_open == dense).all()
    with pytest.raises(RuntimeError, match="eval"):
        model.train().sparse_forward(x)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="open_target"):
        _model(open_target=0.0)
    with pytest.raises(ValueError, match="open_init"):
        _model(open_init=0.0)
    with pytest.raises(ValueError, match="valid options"):
        _model(gate="gumbel")
