"""The ResNet registry: names, shapes, torchvision compatibility, internal dynamic layers."""

import pytest
import torch
from torch import nn

from dka._compat import torchvision
from dka.layers import DynamicKConv2d, DynamicKLinear
from dka.models import build, parse_name


@pytest.mark.parametrize(
    "name,head_k,internal,l1",
    [
        ("res18", None, None, False), ("res18-l1", None, None, True), ("res18-d5a", 5, None, False),
        ("res50-d25a", 25, None, False), ("res50", None, None, False), ("res18-d[32,32,5]a", 5, (32, 32), False),
        ("RES18-D1A", 1, None, False),
    ],
)
def test_parse_name(name, head_k, internal, l1):
    spec = parse_name(name)
    assert (spec.head_k, spec.internal_k, spec.l1_head) == (head_k, internal, l1)


@pytest.mark.parametrize("bad", ["res34", "res18-d5", "resnet18", "res18-dxa", "res50-d[1,2,3]a", "res18-d0a", ""])
def test_unknown_names_list_the_valid_forms(bad):
    with pytest.raises(ValueError) as err:
        build(bad, 10)
    if "K must" not in str(err.value) and "res18 only" not in str(err.value):
        assert "res18-d{K}a" in str(err.value) and "res18-d[K3,K4,K]a" in str(err.value)


def test_dense_res18_and_res50_match_torchvision():
    for ours, theirs in (("res18", torchvision.models.resnet18), ("res50", torchvision.models.resnet50)):
        model = build(ours, 1000, stem="imagenet")
        ref = theirs()
        state = {k.replace("fc.", "head."): v for k, v in ref.state_dict().items()}
        model.load_state_dict(state)  # same module names and shapes, one to one
        if ours == "res18":
            x = torch.randn(1, 3, 64, 64)
            torch.testing.assert_close(model.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stem,size,final", [("cifar", 32, 4), ("imagenet", 64, 2), ("imagenet-small", 64, 4)])
def test_features_pool_head(stem, size, final):
    model = build("res18-d5a", 7, stem=stem, width=8).eval()
    x = torch.randn(3, 3, size, size)
    fmap = model.features(x)
    assert fmap.shape == (3, model.num_features, final, final) and model.num_features == 64
    assert isinstance(model.head, DynamicKLinear) and model.head.k == 5
    torch.testing.assert_close(model.head(model.pool(fmap)), model(x))
    assert model.build_kwargs == {"name": "res18-d5a", "num_classes": 7, "stem": stem, "width": 8}
    rebuilt = build(**model.build_kwargs)
    rebuilt.load_state_dict(model.state_dict())


def test_internal_dynamic_layers_replace_first_conv_of_layer3_and_layer4():
    model = build("res18-d[8,16,5]a", 10, width=8)
    layers = model.dynamic_layers()
    assert list(layers) == ["layer3.0.conv1", "layer4.0.conv1", "head"]
    l3, l4 = layers["layer3.0.conv1"], layers["layer4.0.conv1"]
    assert isinstance(l3, DynamicKConv2d) and (l3.in_channels, l3.out_channels, l3.k, l3.stride) == (16, 32, 8, 2)
    assert (l4.in_channels, l4.out_channels, l4.k, l4.stride) == (32, 64, 16, 2)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert l3.weight.grad is not None and l3.weight.grad.abs().sum() > 0


def test_paper_shapes_of_internal_layers():
    model = build("res18-d[32,32,5]a", 365, stem="imagenet")
    l3, l4 = model.layer3[0].conv1, model.layer4[0].conv1
    assert (l3.in_channels, l3.out_channels, l4.in_channels, l4.out_channels) == (128, 256, 256, 512)
    assert isinstance(model.head, DynamicKLinear) and model.head.in_features == 512


def test_k_larger_than_the_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="1 <= K <= 128"):
        build("res18-d200a", 10, width=16)
    with pytest.raises(ValueError, match="layer3.*1 <= K <= 32"):
        build("res18-d[64,8,5]a", 10, width=16)
    with pytest.raises(ValueError, match="unknown stem"):
        build("res18", 10, stem="tiny")


def test_l1_model_has_a_dense_head():
    model = build("res18-l1", 10, width=8)
    assert type(model.head) is nn.Linear and model.spec.l1_head and model.dynamic_layers() == {}


def test_training_step_with_bf16_autocast_and_channels_last():
    model = build("res18-d[4,4,3]a", 5, width=4).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_dense_1x1_control_has_the_supplement_architecture_without_dynamic_k():
    """res18-1x1-d5a differs from res18-d[8,8,5]a only in its internal 1x1 layers being dense."""
    control = build("res18-1x1-d5a", 10, stem="cifar", width=16)
    dynamic = build("res18-d[8,8,5]a", 10, stem="cifar", width=16)
    for layer in ("layer3.0.conv1", "layer4.0.conv1"):
        dense, dk = control.get_submodule(layer), dynamic.get_submodule(layer)
        assert isinstance(dense, nn.Conv2d) and dense.kernel_size == (1, 1) and dense.stride == (dk.stride, dk.stride)
        assert dense.weight.shape == dk.weight.shape
    assert set(control.state_dict()) == set(dynamic.state_dict())
    assert list(control.dynamic_layers()) == ["head"]
    with pytest.raises(ValueError, match="dense 1x1"):
        build("res50-1x1", 10)
