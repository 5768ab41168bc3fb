"""dka.convert on torchvision's classifiers (random weights: nothing is downloaded) and a timm-style model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dka
from dka._compat import torchvision
from dka.layers import DynamicKLinear


def _tiny_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10)


CLASSIFIERS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), "fc"),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=10),
                           "classifier.3"),
    "vit": (_tiny_vit, "heads.head"),
}


def _head_input(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    seen = []
    hook = model.get_submodule(name).register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    return seen[0], logits


@pytest.mark.parametrize("arch", sorted(CLASSIFIERS))
def test_convert_keeps_the_weights_and_routes_k_products(arch):
    torch.manual_seed(0)
    build, head_name = CLASSIFIERS[arch]
    dense = build().eval()
    x = torch.randn(3, 3, 32, 32)
    features, dense_logits = _head_input(dense, head_name, x)
    width = features.shape[1]

    full = dka.convert(copy.deepcopy(dense), k=width)  # K = all inputs: exactly the dense classifier
    assert isinstance(full.get_submodule(head_name), DynamicKLinear)
    assert full.state_dict().keys() == dense.state_dict().keys()
    torch.testing.assert_close(full(x), dense_logits, rtol=1e-4, atol=1e-4)

    model = dka.convert(copy.deepcopy(dense), k=5)
    head = model.get_submodule(head_name)
    assert head.k == 5 and not head.training
    assert torch.equal(head.weight, dense.get_submodule(head_name).weight)
    w, b = head.weight, head.bias
    expected = (features[:, None, :] * w[None]).topk(5, dim=2).values.sum(2) + b  # top-5 signed products
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)

    model.train()
    model(x).logsumexp(1).sum().backward()
    used = (head.weight.grad != 0).sum(1)
    assert int(used.max()) <= 5 * x.shape[0] and int((head.weight.grad != 0).sum()) < head.weight.numel()


class TimmStyle(nn.Module):
    """timm's contract: get_classifier() names the head, whatever is registered after it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)
        self.aux = nn.Linear(16, 2)  # registered last, but not the classifier

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(self.body(x))


def test_timm_style_classifier_and_named_layers():
    model = dka.convert(TimmStyle(), k=3)
    assert isinstance(model.head, DynamicKLinear) and isinstance(model.aux, nn.Linear)
    assert model(torch.randn(2, 3, 2, 2)).shape == (2, 4)
    named = dka.convert(TimmStyle(), k=2, layer="body.1")
    assert isinstance(named.body[1], DynamicKLinear) and named.body[1].k == 2
    frozen = TimmStyle()
    frozen.head.requires_grad_(False)
    assert dka.convert(frozen, k=1).head.weight.requires_grad is False


def test_convert_explains_bad_requests():
    with pytest.raises(ValueError, match="out of range"):
        dka.convert(TimmStyle(), k=17)
    with pytest.raises(ValueError, match=r"no submodule 'fc'.*head"):
        dka.convert(TimmStyle(), k=1, layer="fc")
    with pytest.raises(TypeError, match="ReLU, not an nn.Linear"):
        dka.convert(TimmStyle(), k=1, layer="body.2")
    with pytest.raises(ValueError, match="no nn.Linear"):
        dka.convert(nn.Sequential(nn.Conv2d(3, 4, 1)), k=1)
