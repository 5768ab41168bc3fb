"""`convert`: any classifier's final linear layer made Dynamic-K, weights kept — "plugs into any CNN".

The paper's method is one layer: the classifier's last `nn.Linear` becomes a Dynamic-K linear map with
the same weight and bias, so a pretrained torchvision or timm model starts from its own decision rule
(with K = in_features it computes exactly the same logits) and is fine-tuned from there with the usual
training code. `DynamicKLinear` has `nn.Linear`'s parameter names and shapes, so the model's state_dict
keys do not change and checkpoints of the dense model still load.

Which layer: `layer="heads.head"` names one; otherwise timm's `get_classifier()` when the model has
it, else the last `nn.Linear` the model registers (torchvision's `fc`, `classifier.3`, `heads.head`).
"""

from __future__ import annotations

import torch
from torch import nn

from dka._core import check_k
from dka.layers import DynamicKLinear

__all__ = ["convert", "final_linear"]


def _name_of(model: nn.Module, module: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def final_linear(model: nn.Module, layer: str | None = None) -> tuple[str, nn.Linear]:
    """(qualified name, module) of the classifier's final linear layer, or of the one named `layer`."""
    if layer is not None:
        try:
            module = model.get_submodule(layer)
        except AttributeError as err:
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(f"{type(model).__name__} has no submodule {layer!r}; its nn.Linear layers are "
                             f"{linears}") from err
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{layer!r} is a {type(module).__name__}, not an nn.Linear: convert() replaces a "
                            "linear layer (name one with layer=...)")
        return layer, module
    get_classifier = getattr(model, "get_classifier", None)  # timm's API for the classification head
    if callable(get_classifier):
        head = get_classifier()
        name = _name_of(model, head) if isinstance(head, nn.Linear) else None
        if name:
            return name, head
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to convert (already converted, or "
                         "a convolutional classifier?); name the layer with layer=...")
    return linears[-1]


def convert(model: nn.Module, k: int, layer: str | None = None) -> nn.Module:
    """Replace the final `nn.Linear` of `model` (or the one named `layer`) by a `DynamicKLinear`, in place.

    The new layer keeps the weight, bias, device, dtype, train/eval mode and `requires_grad` of the old
    one. Returns `model` (copy it first with `copy.deepcopy` to keep the dense one).

    Args:
        model: a classifier, e.g. ``torchvision.models.resnet18()`` or a timm model.
        k: inputs each output sums (1 <= k <= the layer's in_features; in_features = the dense layer).
        layer: the qualified name of the layer to convert (default: see the module docstring).
    """
    name, linear = final_linear(model, layer)
    check_k(k, linear.in_features)
    weight = linear.weight
    head = DynamicKLinear(linear.in_features, linear.out_features, k, bias=linear.bias is not None,
                          device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        if linear.bias is not None:
            head.bias.copy_(linear.bias)
    head.weight.requires_grad_(weight.requires_grad)
    if linear.bias is not None:
        head.bias.requires_grad_(linear.bias.requires_grad)
    head.train(linear.training)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, head)
    return model
