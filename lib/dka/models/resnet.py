"""The ResNet family of the paper, built by the paper's names.

`build("res18-d5a", num_classes=365, stem="imagenet", width=64)` gives ResNet18 whose final layer
is Dynamic-K with K=5. Names:

- `res18`, `res50`                 dense head (the baselines)
- `res18-l1`, `res50-l1`           dense head; the trainer adds an L1 penalty on the head's weights
- `res18-d{K}a`, `res50-d{K}a`     Dynamic-K head with K=K ("Res18-d5a")
- `res18-d[K3,K4,K]a`              also the first conv of layer3's and layer4's first block replaced by
                                   a 1x1 DynamicKConv2d with K3 and K4 (the supplement's "Res18-d[32,32,5]a")
- `res18-1x1`, `res18-1x1-d{K}a`   the same two convs replaced by dense 1x1 convs: the supplement's
                                   architecture change without Dynamic-K (its control)

The blocks follow torchvision's resnet (same module names, so its ResNet weights map one to one)
with two additions for CPU-sized work: a width multiplier (64 = the paper's networks) and the CIFAR
stem (3x3 conv, stride 1, no max-pool). Dissection and explanation need the last feature map and
the final layer on their own: `model.features(x)`, `model.pool(fmap)` and `model.head`.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from dka.attribution import Attribution, decompose_linear_head, inference_mode
from dka.layers import DynamicKConv2d, DynamicKLinear
from dka.models._registry import ModelSpec, register_model

__all__ = ["DKAResNet", "STEMS", "FORMS"]


STEMS = ("cifar", "imagenet", "imagenet-small")
FORMS = ("res18", "res50", "res18-l1", "res50-l1", "res18-d{K}a", "res50-d{K}a", "res18-d[K3,K4,K]a", "res18-1x1",
         "res18-1x1-d{K}a")
_PATTERN = (r"res(?P<depth>18|50)(?P<dense1x1>-1x1)?"
            r"(?:-(?:(?P<l1>l1)|d(?P<k>\d+)a|d\[(?P<k3>\d+),(?P<k4>\d+),(?P<kh>\d+)\]a))?")


def _parse(name: str, match: re.Match) -> ModelSpec:
    arch = f"res{match['depth']}"
    internal = None
    dense_1x1 = match["dense1x1"] is not None
    if dense_1x1 and (arch != "res18" or match["kh"] is not None):
        raise ValueError(f"internal dense 1x1 layers are defined for res18 without internal Dynamic-K layers "
                         f"(res18-1x1, res18-1x1-d{{K}}a, res18-1x1-l1); got {name!r}")
    if match["kh"] is not None:
        if arch != "res18":
            raise ValueError(f"internal Dynamic-K layers are defined for res18 only; got {name!r}")
        internal, head_k = (int(match["k3"]), int(match["k4"])), int(match["kh"])
    else:
        head_k = int(match["k"]) if match["k"] is not None else None
    for value in (head_k, *(internal or ())):
        if value is not None and value < 1:
            raise ValueError(f"K must be at least 1 in {name!r}")
    return ModelSpec(name=name, family="resnet", arch=arch, head_k=head_k, internal_k=internal,
                     l1_head=match["l1"] is not None, options={"dense_1x1": dense_1x1})


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, first_conv: nn.Module | None = None):
        super().__init__()
        self.conv1 = first_conv or nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, first_conv: nn.Module | None = None):
        super().__init__()
        if first_conv is not None:
            raise ValueError("internal Dynamic-K layers are defined for BasicBlock (res18) only")
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride here, as torchvision
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


_ARCH = {"res18": (BasicBlock, (2, 2, 2, 2)), "res50": (Bottleneck, (3, 4, 6, 3))}


class DKAResNet(nn.Module):
    """ResNet with a dense or Dynamic-K head and optional internal Dynamic-K 1x1 convolutions."""

    final_layer_name = "head"

    def __init__(self, spec: ModelSpec, num_classes: int, stem: str = "cifar", width: int = 64):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; valid stems: {', '.join(STEMS)}")
        if num_classes < 1 or width < 1:
            raise ValueError(f"num_classes and width must be positive; got {num_classes} and {width}")
        self.spec = spec
        self.build_kwargs = {"name": spec.name, "num_classes": num_classes, "stem": stem, "width": width}
        block, depths = _ARCH[spec.arch]
        if stem == "cifar":  # 3x3 stride 1, no max-pool: 32 px images keep a 4x4 final map
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        elif stem == "imagenet":  # 7x7 stride 2 + max-pool: 224 px -> 7x7 final map
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:  # "imagenet-small": 3x3 stride 2, no max-pool; 64 px -> 4x4 at a quarter of the cost
            self.conv1 = nn.Conv2d(3, width, 3, 2, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        planes = [width, width * 2, width * 4, width * 8]
        in_planes = width
        internal = dict(zip((3, 4), spec.internal_k)) if spec.internal_k else {}
        for stage, (p, depth) in enumerate(zip(planes, depths), start=1):
            stride = 1 if stage == 1 else 2
            blocks = []
            for b in range(depth):
                first_conv = None
                if b == 0 and stage in (3, 4) and spec.options.get("dense_1x1"):
                    first_conv = nn.Conv2d(in_planes, p, 1, stride, bias=False)
                elif b == 0 and stage in internal:
                    k = internal[stage]
                    if k > in_planes:
                        raise ValueError(
                            f"internal K={k} of layer{stage} is out of range: its 1x1 layer has "
                            f"{in_planes} input channels at width {width}; use 1 <= K <= {in_planes}"
                        )
                    first_conv = DynamicKConv2d(in_planes, p, k, stride=stride)
                blocks.append(block(in_planes, p, stride if b == 0 else 1, first_conv))
                in_planes = p * block.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.num_features = in_planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if spec.head_k is not None:
            if spec.head_k > in_planes:
                raise ValueError(
                    f"head K={spec.head_k} is out of range: the final layer has {in_planes} inputs at "
                    f"width {width}; use 1 <= K <= {in_planes}"
                )
            self.head = DynamicKLinear(in_planes, num_classes, spec.head_k)
        else:
            self.head = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, DynamicKConv2d)) and m is not self.head:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """The last convolutional feature map (layer4's output), (B, num_features, h, w)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def pool(self, fmap: Tensor) -> Tensor:
        """Global average pooling: the per-unit activations x_i that the head weighs."""
        return torch.flatten(self.avgpool(fmap), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)))

    def dynamic_layers(self) -> dict[str, nn.Module]:
        """Qualified name -> Dynamic-K module (internal 1x1 layers, then the head if dynamic)."""
        return {n: m for n, m in self.named_modules() if isinstance(m, (DynamicKLinear, DynamicKConv2d))}

    def explain(self, x: Tensor, target=None) -> Attribution:
        """Per-image unit contributions to the target class (the paper's Fig. 7 decomposition).

        Args:
            x: (B, 3, H, W) images (moved to the model's device).
            target: None (the predicted class), an int, or one class per image.
        """
        with inference_mode(self):
            fmap = self.features(x.to(next(self.parameters()).device))
            pooled = self.pool(fmap)
            logits = self.head(pooled)
        return decompose_linear_head(fmap, pooled, logits, self.head, target)

    def auxiliary_losses(self, labels: Tensor, recipe) -> dict[str, Tensor]:
        """The training engine's extension point (see `dka.train.objectives`): the L1 head penalty.

        Only `res18-l1`/`res50-l1` add a term: ``recipe.l1 * sum |W|`` over the head's weights.
        """
        if self.spec.l1_head and recipe.l1 > 0:
            return {"l1": recipe.l1 * self.head.weight.abs().sum()}
        return {}


@register_model("resnet", FORMS, _PATTERN, _parse,
                "ResNet18/50 with a dense, L1-penalised or Dynamic-K head (and internal 1x1 Dynamic-K layers)")
def _build_resnet(spec: ModelSpec, num_classes: int, stem: str = "cifar", width: int = 64) -> DKAResNet:
    return DKAResNet(spec, num_classes=num_classes, stem=stem, width=width)
