"""Interpretable Neural Network Decoupling (Li et al., ECCV 2020, arXiv 1906.01166) on dka's ResNet18.

`res18-decouple`: every convolution inside a residual block gets an *architecture controlling module*,
a small network from the layer's input to a binary gate per filter, so each input runs its own
calculation path (the open filters) through the network:

- **Control module**: global average pooling of the layer input, FC -> ReLU -> FC, one logit v per
  filter; the gate is ``1[v > 0]`` in the forward pass and takes the gradient of ``sigmoid(v)``
  (straight-through estimator). The last FC's bias starts at ``open_init`` > 0 (every gate open:
  training starts from the plain network and closes filters as the losses ask).
- **Gating**: conv1's filters after BN+ReLU (``a * g``); conv2's filters before the residual sum
  (``relu(bn2(conv2) * g + identity)``), except in the network's last block, where the gate acts
  after the sum, so a closed filter is an exact zero at the head's input and the explanation of a
  class score is the contribution of the gated path.
- **Losses** (`auxiliary_losses`): ``mi_weight * CE(q(y | A), y)`` with q a linear variational
  classifier (`path_classifier`) on the concatenated gates A (scaled by 1/sqrt(len A)): maximising E log q(y|A) maximises the
  variational lower bound H(y) + E log q(y|A) of MI(A; y). ``align_weight * sum_gates (1 - g) e``:
  each layer's output encoded per filter, ``e = tanh(mean_hw |a|)`` with a the filter's ungated
  output, aligned with its gate: a closed filter should have had nothing to say (its output is
  pushed down, or its gate open). ``sparsity_weight * sum_layers filters_l * relu(open_rate_l -
  open_target)``: an L1 penalty on the open gates of every layer whose open rate is above the
  target. The two gate terms are sums over all gated filters (means over images), so their weights
  act per gate, as an L1 strength does; both ramp up linearly over the first ``ramp_steps``
  training steps (counted in the buffer `train_steps`), so a network trained from scratch first
  learns with every filter open.

Only the paper's abstracts (arXiv v1 and the ECCV version) were at hand when this was written, not
its equations. They say that each layer's output is encoded and aligned with the layer's
architecture vector under a sparsity regulariser (v1: the filters' outputs are limited); the
control module's layout, the estimator, the encoding ``e`` and the form of the sparsity term are
this implementation's reading of that, not transcriptions of the paper.

`sparse_forward` runs a batch image by image with closed filters' computation skipped (sliced
convolution weights and BatchNorm statistics) and returns the same logits as the gated forward pass,
together with the multiply-accumulates it executed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dka.attribution import Attribution, decompose_linear_head, inference_mode
from dka.models._registry import ModelSpec, check_options, register_model
from dka.models.resnet import BasicBlock, DKAResNet

__all__ = ["DecoupledResNet", "GatedBasicBlock", "ControlModule", "PathAttribution", "straight_through_gate",
           "FORMS", "OPTIONS"]

FORMS = ("res18-decouple",)
OPTIONS = ("mi_weight", "align_weight", "sparsity_weight", "open_target", "ramp_steps", "hidden_ratio", "open_init")
_PATTERN = r"res18-decouple"


def _parse(name: str, match: re.Match) -> ModelSpec:
    return ModelSpec(name=name, family="decouple", arch="res18")


def straight_through_gate(logits: Tensor, training: bool) -> Tensor:
    """Binary gates ``1[logits > 0]``; in training their gradient is that of ``sigmoid(logits)``."""
    hard = (logits > 0).to(logits.dtype)
    if not training:
        return hard
    soft = torch.sigmoid(logits)
    return hard + (soft - soft.detach())  # exactly `hard` in value


class ControlModule(nn.Module):
    """Architecture controlling module: layer input (B, C_in, H, W) -> gate logits (B, C_out)."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, open_init: float):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, out_channels)
        nn.init.normal_(self.fc2.weight, std=0.01)  # every gate starts near logit open_init, for every input
        nn.init.constant_(self.fc2.bias, open_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))

    def from_pooled(self, pooled: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(pooled)))


def _encode(a: Tensor) -> Tensor:
    """(B, C) per-filter encoding of a layer output for the alignment loss, in [0, 1)."""
    return torch.tanh(a.abs().mean(dim=(2, 3)).float())


class GatedBasicBlock(nn.Module):
    """A BasicBlock (same module names as torchvision's) whose two convolutions are gated per input."""

    def __init__(self, block: BasicBlock, hidden_ratio: float, open_init: float, post_residual: bool):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = block.conv1, block.bn1, block.conv2, block.bn2
        self.relu, self.downsample = block.relu, block.downsample
        c_in, c_mid, c_out = self.conv1.in_channels, self.conv1.out_channels, self.conv2.out_channels
        self.control1 = ControlModule(c_in, c_mid, max(4, round(c_in * hidden_ratio)), open_init)
        self.control2 = ControlModule(c_mid, c_out, max(4, round(c_mid * hidden_ratio)), open_init)
        self.gate1, self.gate2 = nn.Identity(), nn.Identity()  # hook points: the gated maps (dissection)
        self.post_residual = post_residual
        self.gates: tuple[Tensor, Tensor] | None = None
        self.encodings: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        g1 = straight_through_gate(self.control1(x), self.training)
        a1 = self.relu(self.bn1(self.conv1(x)))
        out = self.gate1(a1 * g1[:, :, None, None])
        g2 = straight_through_gate(self.control2(out), self.training)
        z = self.bn2(self.conv2(out))
        if self.post_residual:
            a2 = self.relu(z + identity)
            out = a2 * g2[:, :, None, None]
        else:
            a2 = z
            out = self.relu(z * g2[:, :, None, None] + identity)
        self.gates = (g1, g2)
        self.encodings = (_encode(a1), _encode(a2)) if self.training else None
        return self.gate2(out)

    @torch.no_grad()
    def sparse_forward(self, x: Tensor) -> tuple[Tensor, int]:
        """One image (1, C, H, W) through the block with closed filters skipped -> (output, MACs executed)."""
        macs = 0
        if self.downsample is None:
            identity = x
        else:
            conv, bn = self.downsample[0], self.downsample[1]
            identity = bn(conv(x))
            macs += conv.weight.numel() * identity.shape[2] * identity.shape[3]
        macs += _linear_macs(self.control1)
        open1 = (self.control1(x)[0] > 0).nonzero()[:, 0]
        h = _sliced_conv_bn(x, self.conv1, self.bn1, open1, None)
        h = self.relu(h)
        macs += open1.numel() * self.conv1.weight[0].numel() * h.shape[2] * h.shape[3]
        pooled = x.new_zeros(1, self.conv1.out_channels)
        pooled[:, open1] = h.mean(dim=(2, 3))
        macs += _linear_macs(self.control2)
        open2 = (self.control2.from_pooled(pooled)[0] > 0).nonzero()[:, 0]
        z = _sliced_conv_bn(h, self.conv2, self.bn2, open2, open1)
        macs += open2.numel() * open1.numel() * self.conv2.kernel_size[0] * self.conv2.kernel_size[1] * z.shape[2] * z.shape[3]
        out = torch.zeros_like(identity) if self.post_residual else F.relu(identity)  # not in place: identity is read below
        out[:, open2] = F.relu(z + identity[:, open2])
        return out, macs


def _linear_macs(control: ControlModule) -> int:
    return control.fc1.weight.numel() + control.fc2.weight.numel()


def _sliced_conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, out_idx: Tensor, in_idx: Tensor | None) -> Tensor:
    """BN(conv(x)) for the filters `out_idx` only, from the input channels `in_idx` (None: all) — eval mode."""
    weight = conv.weight[out_idx] if in_idx is None else conv.weight[out_idx][:, in_idx]
    if weight.shape[1] == 0:  # no open input channel: the convolution of zeros
        size = [(s + 2 * p - k) // st + 1 for s, p, k, st in zip(x.shape[2:], conv.padding, conv.kernel_size, conv.stride)]
        y = x.new_zeros(1, out_idx.numel(), *size)
    else:
        y = F.conv2d(x, weight, None, conv.stride, conv.padding)
    return F.batch_norm(y, bn.running_mean[out_idx], bn.running_var[out_idx], bn.weight[out_idx], bn.bias[out_idx],
                        training=False, eps=bn.eps)


@dataclass
class PathAttribution(Attribution):
    """An Attribution of the decoupled network, plus the calculation path of each image."""

    path: dict[str, Tensor] | None = None  # gated layer name -> (B, filters) bool, True = open


class DecoupledResNet(DKAResNet):
    """ResNet18 with a control module and binary gates on every convolution of its residual blocks."""

    def __init__(self, spec: ModelSpec, num_classes: int, stem: str = "cifar", width: int = 64,
                 mi_weight: float = 0.5, align_weight: float = 0.01, sparsity_weight: float = 0.02,
                 open_target: float = 0.5, ramp_steps: int = 300, hidden_ratio: float = 0.25,
                 open_init: float = 1.0):
        super().__init__(spec, num_classes=num_classes, stem=stem, width=width)
        if (min(mi_weight, align_weight, sparsity_weight) < 0 or not 0 < open_target <= 1 or hidden_ratio <= 0
                or open_init <= 0 or ramp_steps < 0):
            raise ValueError(f"res18-decouple options out of range: weights must be >= 0 (mi {mi_weight}, align "
                             f"{align_weight}, sparsity {sparsity_weight}), 0 < open_target <= 1 (got {open_target}), "
                             f"hidden_ratio > 0 (got {hidden_ratio}), open_init > 0 (got {open_init}), ramp_steps >= 0 "
                             f"(got {ramp_steps})")
        self.mi_weight, self.align_weight, self.sparsity_weight = float(mi_weight), float(align_weight), float(sparsity_weight)
        self.open_target, self.ramp_steps = float(open_target), int(ramp_steps)
        self.build_kwargs.update(mi_weight=self.mi_weight, align_weight=self.align_weight,
                                 sparsity_weight=self.sparsity_weight, open_target=self.open_target,
                                 ramp_steps=self.ramp_steps, hidden_ratio=float(hidden_ratio), open_init=float(open_init))
        stages = [getattr(self, f"layer{s}") for s in range(1, 5)]
        last = (len(stages) - 1, len(stages[-1]) - 1)
        for s, stage in enumerate(stages):
            for b in range(len(stage)):
                stage[b] = GatedBasicBlock(stage[b], hidden_ratio, open_init, post_residual=(s, b) == last)
        widths = self.gated_layers()
        self.path_classifier = nn.Linear(sum(widths.values()), num_classes)
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))

    def blocks(self) -> dict[str, GatedBasicBlock]:
        return {n: m for n, m in self.named_modules() if isinstance(m, GatedBasicBlock)}

    def gated_layers(self) -> dict[str, int]:
        """Gated layer name (e.g. ``layer3.1.conv2``) -> number of filters, in forward order."""
        out = {}
        for name, block in self.blocks().items():
            out[f"{name}.conv1"] = block.conv1.out_channels
            out[f"{name}.conv2"] = block.conv2.out_channels
        return out

    def last_path(self) -> dict[str, Tensor]:
        """The gates of the latest forward pass: gated layer name -> (B, filters) tensor of 0/1."""
        out = {}
        for name, block in self.blocks().items():
            if block.gates is None:
                raise RuntimeError("no forward pass has run yet")
            out[f"{name}.conv1"], out[f"{name}.conv2"] = block.gates
        return out

    def paths(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(logits, path) of a batch in eval mode; path: gated layer name -> (B, filters) bool."""
        with inference_mode(self):
            logits = self(x.to(next(self.parameters()).device))
            path = {k: v.bool().cpu() for k, v in self.last_path().items()}
        return logits.float().cpu(), path

    def classify_path(self, path: Tensor) -> Tensor:
        """The variational classifier q(y | A) on concatenated gates (B, all filters), scaled by
        1/sqrt(filters) so that SGD at the network's learning rate does not blow its logits up."""
        return self.path_classifier(path / path.shape[1] ** 0.5)

    def auxiliary_losses(self, labels: Tensor, recipe) -> dict[str, Tensor]:
        """The training engine's extension point (`dka.train.objectives`): the MI, alignment and sparsity terms."""
        blocks = list(self.blocks().values())
        if any(b.encodings is None for b in blocks):
            raise RuntimeError("auxiliary_losses needs the gates of a training forward pass: call model.train() "
                               "and model(images) first")
        gates = [g.float() for b in blocks for g in b.gates]
        codes = [e for b in blocks for e in b.encodings]
        for b in blocks:
            b.encodings = None
        ramp = min(1.0, float(self.train_steps) / self.ramp_steps) if self.ramp_steps else 1.0
        self.train_steps += 1
        out = {}
        if self.mi_weight:
            out["mi"] = self.mi_weight * F.cross_entropy(self.classify_path(torch.cat(gates, dim=1)), labels)
        if self.align_weight:
            out["align"] = ramp * self.align_weight * sum(((1 - g) * e).sum(1).mean() for e, g in zip(codes, gates))
        if self.sparsity_weight:
            excess = [g.shape[1] * F.relu(g.mean() - self.open_target) for g in gates]
            out["sparsity"] = ramp * self.sparsity_weight * sum(excess)
        return out

    def explain(self, x: Tensor, target=None) -> PathAttribution:
        """Unit contributions to the target class over the gated path (closed final filters are exact zeros)."""
        with inference_mode(self):
            fmaps = self.features(x.to(next(self.parameters()).device))
            pooled = self.pool(fmaps)
            logits = self.head(pooled)
            path = {k: v.bool().cpu() for k, v in self.last_path().items()}
        base = decompose_linear_head(fmaps, pooled, logits, self.head, target)
        return PathAttribution(**{f.name: getattr(base, f.name) for f in fields(Attribution)}, path=path)

    @torch.no_grad()
    def sparse_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The inference path that skips closed filters, image by image (eval mode, float32).

        Returns (logits (B, classes), MACs (B,) multiply-accumulates executed per image, control modules
        included). The logits equal the gated forward pass's up to float rounding.
        """
        if self.training:
            raise RuntimeError("sparse_forward runs the eval-mode network: call model.eval() first")
        blocks = [m for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for m in stage]
        logits, macs = [], []
        for image in x.float():
            h = self.conv1(image[None])
            count = self.conv1.weight.numel() * h.shape[2] * h.shape[3]
            h = self.maxpool(self.relu(self.bn1(h)))
            for block in blocks:
                h, m = block.sparse_forward(h)
                count += m
            logits.append(self.head(self.pool(h)))
            macs.append(count + self.head.weight.numel())
        return torch.cat(logits), torch.tensor(macs, dtype=torch.long)


@register_model("decouple", FORMS, _PATTERN, _parse,
                "Interpretable network decoupling (Li et al. 2020): per-input gated filters in every block")
def _build_decouple(spec: ModelSpec, num_classes: int, stem: str = "cifar", width: int = 64,
                    **options) -> DecoupledResNet:
    check_options(spec.name, options, OPTIONS)
    return DecoupledResNet(spec, num_classes=num_classes, stem=stem, width=width, **options)
