"""CoDA-Nets (Böhle, Fritz, Schiele, CVPR 2021): Convolutional Dynamic Alignment Networks, by name.

A CoDA-Net is a stack of `DAUConv2d` layers (`dka.models._dau`) with no non-linearity between them,
applied to the image encoded as ``[r, g, b, 1-r, 1-g, 1-b]``; the last layer has one DAU per class, its
maps are sum-pooled and scaled by ``1/T``, plus one logit bias shared by all classes. The whole network is
a dynamic linear map, ``logit_c = W_c(x)^T enc(x) / T + bias``, so `explain` returns the exact contribution
map ``W_c(x) * enc(x)`` summed over the six channels: it sums to ``logit_c - bias``. A higher temperature T
asks for larger ``W_c(x)^T enc(x)``, which the norm-bounded DAUs can only give by aligning their weights
with the input: the paper's "alignment pressure".

Names (`dka.models.build(name, num_classes, width=..., **options)`):

- ``coda-cifar``  the authors' CIFAR-10 network, "9L-S-CoDA-SQ" (experiments/CIFAR10/final in
  moboehle/CoDA-Nets): eight 3x3 DAU layers with 16, 16, 32, 32, 32, 64, 64, 64 units (strides 1, 1, 2,
  1, 1, 2, 1, 1; ranks 32, 32, 64, ...) and a 1x1 layer with one unit per class (rank 64), at width 16.
- ``coda-s``      a CPU-demo variant: four 3x3 layers with w, 2w, 2w, 4w units (strides 1, 2, 1, 2) and
  the 1x1 class layer; ranks 2w, 2w, 2w, 2w, 4w. Both end on an 8x8 map for 32 px images; at their default
  widths a coda-s training step costs ~1/10 of a coda-cifar one (bench/coda_train_step.py).

``width`` (w) is the number of units of the first layer (default: 16 for ``coda-cifar``, the paper's; 8 for
``coda-s``); every layer scales with it, and the cost of a layer with it cubed (units x rank x inputs).
``stem`` is accepted and ignored (a CoDA-Net has no stem). Build options (``--model-option KEY=VALUE``):
``temperature`` (T, default 1000: the paper's evaluated CIFAR-10 model), ``norm`` ("squash" as in the
paper's "-SQ" models, or "l2"), ``rank`` (the first layer's rank, default 2w; later layers keep the
architecture's ratio to it, as the paper's rank ablation does), ``logit_bias`` (default
``log(1 / (classes - 1))``, the paper's ``log(0.1 / 0.9)`` for 10 classes: a prior of 1/classes under the
binary cross-entropy the paper trains with, ``--loss bce``), and ``input_norm`` — the mean/std the loader
normalised the images with, undone before the encoding ("imagenet": dka's concept scenes and Broden;
"cifar10": dka's CIFAR-10 loader; "none": images already in [0, 1]).

Dissection: ``dka.dissect(model, "layers", root)`` dissects the units the class layer weighs (the
counterpart of a ResNet's layer4); ``"classifier"`` gives the per-class evidence maps.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
from torch import Tensor, nn

from dka.attribution import Attribution, resolve_target
from dka.models._dau import NORMS, DAUConv2d
from dka.models._registry import ModelSpec, register_model

__all__ = ["CoDANet", "ColourComplement", "DAUStack", "DynamicLinearMap", "ARCHITECTURES", "INPUT_NORMS", "FORMS"]

FORMS = ("coda-cifar", "coda-s")
_PATTERN = r"coda-(?P<arch>cifar|s)"

# (kernel, stride, units / width, rank / rank of the first layer) per hidden layer, the 1x1 class layer's
# rank / first rank, and the default width.
ARCHITECTURES = {
    "coda-cifar": ((
        (3, 1, 1, 1), (3, 1, 1, 1), (3, 2, 2, 2), (3, 1, 2, 2), (3, 1, 2, 2), (3, 2, 4, 2), (3, 1, 4, 2),
        (3, 1, 4, 2)), 2, 16),
    "coda-s": (((3, 1, 1, 1), (3, 2, 2, 1), (3, 1, 2, 1), (3, 2, 4, 1)), 2, 8),
}
INPUT_NORMS = {  # (mean, std) the training loaders normalise with (dka.data.images / dka.data.cifar)
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
_OPTIONS = ("temperature", "norm", "rank", "logit_bias", "input_norm")


def _parse(name: str, match: re.Match) -> ModelSpec:
    return ModelSpec(name=name, family="coda", arch=f"coda-{match['arch']}")


class ColourComplement(nn.Module):
    """Normalised RGB (B, 3, H, W) -> ``[p, 1 - p]`` (B, 6, H, W) with p the pixel values in [0, 1].

    The complement makes every pixel's encoding carry the same L1 mass, so dark pixels are not invisible
    to the (linear) units; the paper's input encoding.
    """

    def __init__(self, input_norm: str = "imagenet"):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {input_norm!r}; valid: {', '.join(INPUT_NORMS)} (the mean/std "
                             "the images were normalised with)")
        mean, std = INPUT_NORMS[input_norm]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"CoDA-Nets take RGB images (B, 3, H, W); got shape {tuple(x.shape)}")
        p = x * self.std.to(x.dtype) + self.mean.to(x.dtype)
        return torch.cat([p, 1 - p], dim=1)


class DynamicLinearMap(NamedTuple):
    """One image's target logit as a linear map: ``logit_c - bias = sum(weights * encoded)`` exactly.

    ``encoded`` (B, 6, H, W) is ``enc(x)``, ``weights`` (B, 6, H, W) the row ``W_c(x)`` of the network's
    dynamic linear map (already divided by T); ``feature_maps`` (B, U, h, w) the class layer's input and
    ``feature_weights`` its row of the class layer's dynamic map (``sum(feature_weights * feature_maps)`` is
    ``logit_c - bias`` too); ``logits`` (B, classes); ``target`` (B,).
    """

    encoded: Tensor
    weights: Tensor
    feature_maps: Tensor
    feature_weights: Tensor
    logits: Tensor
    target: Tensor


class DAUStack(nn.Sequential):
    """DAU layers applied in order; ``frozen`` is passed to every layer (a hookable module, for dissection)."""

    def forward(self, x: Tensor, frozen: bool = False) -> Tensor:
        for layer in self:
            x = layer(x, frozen=frozen)
        return x


class CoDANet(nn.Module):
    """A Convolutional Dynamic Alignment Network (see the module docstring)."""

    final_layer_name = "classifier"
    feature_layer = "layers"  # the last feature map, what dissection labels (a ResNet's layer4)

    def __init__(self, spec: ModelSpec, num_classes: int, stem: str = "cifar", width: int | None = None,
                 temperature: float = 1000.0, norm: str = "squash", rank: int | None = None,
                 logit_bias: float | None = None, input_norm: str = "imagenet"):
        super().__init__()
        hidden, final_rank, default_width = ARCHITECTURES[spec.arch]
        width = default_width if width is None else int(width)
        if num_classes < 2 or width < 1:
            raise ValueError(f"a CoDA-Net needs num_classes >= 2 and width >= 1; got {num_classes} and {width}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number; got {temperature!r}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
        rank = 2 * width if rank is None else int(rank)
        if rank < 1:
            raise ValueError(f"rank must be a positive integer; got {rank}")
        self.spec = spec
        self.temperature = float(temperature)
        self.logit_bias = math.log(1.0 / (num_classes - 1)) if logit_bias is None else float(logit_bias)
        self.build_kwargs = {"name": spec.name, "num_classes": num_classes, "stem": stem, "width": width,
                             "temperature": self.temperature, "norm": norm, "rank": rank,
                             "logit_bias": self.logit_bias, "input_norm": input_norm}
        self.encode = ColourComplement(input_norm)
        layers, channels = [], 6
        for kernel, stride, units, ranks in hidden:
            layers.append(DAUConv2d(channels, units * width, ranks * rank, kernel, stride, norm=norm))
            channels = units * width
        self.layers = DAUStack(*layers)
        self.num_features = channels
        self.classifier = DAUConv2d(channels, num_classes, final_rank * rank, kernel_size=1, norm=norm)

    def features(self, x: Tensor) -> Tensor:
        """(B, num_features, h, w) the maps of the units the class layer weighs (input of `classifier`)."""
        return self.layers(self.encode(x))

    def _logits(self, class_maps: Tensor) -> Tensor:
        pooled = class_maps.to(torch.promote_types(class_maps.dtype, torch.float32)).sum(dim=(2, 3))
        return pooled / self.temperature + self.logit_bias

    def forward(self, x: Tensor) -> Tensor:
        return self._logits(self.classifier(self.features(x)))

    def dynamic_layers(self) -> dict[str, nn.Module]:
        """No Dynamic-K layers (the trainer's routing bookkeeping has nothing to track)."""
        return {}

    def linear_map(self, x: Tensor, target=None) -> DynamicLinearMap:
        """The rows of the network's dynamic linear map for each image's target logit (see DynamicLinearMap).

        Computed as the gradient of the logit with every DAU's weights held fixed (`frozen`), which is
        exactly ``W_c(x)``; images are independent, so one backward pass of the batch's sum serves all.
        """
        param = next(self.parameters())
        x = x.to(device=param.device, dtype=param.dtype)
        was_training = self.training
        self.eval()
        try:
            with torch.enable_grad():
                enc = self.encode(x).detach().requires_grad_(True)
                fmap = self.layers(enc, frozen=True)
                logits = self._logits(self.classifier(fmap, frozen=True))
                tgt = resolve_target(logits.detach(), target)
                score = logits.gather(1, tgt[:, None])[:, 0]
                weights, fmap_weights = torch.autograd.grad(score.sum(), (enc, fmap))
        finally:
            self.train(was_training)
        return DynamicLinearMap(enc.detach(), weights, fmap.detach(), fmap_weights, logits.detach(), tgt)

    def explain(self, x: Tensor, target=None) -> Attribution:
        """The exact linear decomposition of each image's target logit (CoDA's contribution maps).

        Returns an Attribution in the model's dtype (float64 for a float64 model) whose
        - ``spatial`` is the (B, H, W) contribution map ``sum_channels W_c(x) * enc(x)`` at image resolution:
          it sums to ``score - bias`` exactly (``bias`` is the logit bias);
        - ``feature_maps`` (B, U, h, w) are the maps of the U units the class layer weighs and
          ``products[:, i]`` unit i's exact share of ``score - bias``: ``sum_positions w_ci(a) a_i / T``
          (their sum is ``score - bias`` too); ``contributions = products / score`` (the paper's Fig. 7
          definition, as for DKA), ``effective`` = ``contributions`` (every unit is used, nothing routed);
        - ``activations`` are the units' spatial means.
        """
        lm = self.linear_map(x, target)
        score = lm.logits.gather(1, lm.target[:, None])[:, 0]
        products = (lm.feature_weights * lm.feature_maps).sum(dim=(2, 3))
        cpu = lambda t: t.detach().cpu()  # noqa: E731
        return Attribution(
            target=cpu(lm.target), logits=cpu(lm.logits), score=cpu(score),
            bias=torch.full_like(score, self.logit_bias).cpu(), activations=cpu(lm.feature_maps.mean(dim=(2, 3))),
            products=cpu(products), contributions=cpu(products / score[:, None]),
            effective=cpu(products / score[:, None]), feature_maps=cpu(lm.feature_maps),
            spatial=cpu((lm.weights * lm.encoded).sum(1)),
        )

    def alignment(self, x: Tensor, target=None) -> Tensor:
        """(B,) cosine between each image's encoding and the dynamic weights of its target logit, ``W_c(x)``.

        The paper's mechanism made a number: norm-bounded DAUs can only produce a large logit by aligning
        ``W_c(x)`` with ``enc(x)``, the more so the higher the temperature.
        """
        lm = self.linear_map(x, target)
        w, e = lm.weights.flatten(1), lm.encoded.flatten(1)
        return ((w * e).sum(1) / (w.norm(dim=1) * e.norm(dim=1)).clamp_min(1e-30)).detach().cpu()


@register_model("coda", FORMS, _PATTERN, _parse,
                "CoDA-Net (Böhle et al., CVPR 2021): dynamic alignment units, exact contribution maps")
def _build_coda(spec: ModelSpec, num_classes: int, stem: str = "cifar", width: int | None = None,
                **options) -> CoDANet:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"unknown build option(s) {unknown} for {spec.name}; valid: {', '.join(_OPTIONS)}")
    return CoDANet(spec, num_classes, stem=stem, width=width, **options)
