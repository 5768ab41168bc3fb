"""The model registry: every network dka builds, found by its name.

A model *family* registers the name forms it accepts (e.g. ``res18-d{K}a``), a regular expression for
them, a parser that turns a matching name into a `ModelSpec`, and a builder. `build`, `parse_name` and
`list_models` read the registry, so a family added in its own module (and imported by
`dka.models`) is buildable, listed and loadable from checkpoints with no other change. The valid
names are written once, in the family's registration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

__all__ = ["ModelSpec", "register_model", "list_models", "parse_name", "build", "check_options"]


@dataclass(frozen=True)
class ModelSpec:
    """What a registry name asks for.

    Attributes:
        name: the name as given.
        family: the registered family that parsed it (e.g. "resnet").
        arch: the backbone (e.g. "res18", "res50").
        head_k: K of a Dynamic-K final layer; None for a dense one.
        internal_k: K of internal Dynamic-K layers (the supplement's layer3/layer4 1x1 convs), or None.
        l1_head: a dense head that the trainer penalises with L1 (the paper's Res18-L1 baseline).
        options: family-specific settings read off the name.
    """

    name: str
    family: str
    arch: str
    head_k: int | None = None
    internal_k: tuple[int, ...] | None = None
    l1_head: bool = False
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_dynamic(self) -> bool:
        return self.head_k is not None


@dataclass(frozen=True)
class _Family:
    name: str
    forms: tuple[str, ...]
    pattern: re.Pattern
    parse: Callable[[str, re.Match], ModelSpec]
    builder: Callable[..., nn.Module]
    description: str


_FAMILIES: dict[str, _Family] = {}


def register_model(family: str, forms: tuple[str, ...], pattern: str, parse: Callable[[str, re.Match], ModelSpec],
                   description: str):
    """Decorator registering ``builder(spec, num_classes, **options) -> nn.Module`` for a family of names.

    Args:
        family: the family's name (unique).
        forms: the name forms shown to users, e.g. ``("res18-d{K}a",)``.
        pattern: a regular expression a lower-cased name must match in full.
        parse: ``(name, match) -> ModelSpec``; raises ValueError for a matching but invalid name.
        description: one line for `list_models(verbose=True)`.

    The built module must carry ``build_kwargs`` (a dict that ``build(**build_kwargs)`` turns back into
    the same network) and ``spec``: checkpoints store the former to rebuild the model.
    """
    if family in _FAMILIES:
        raise ValueError(f"model family {family!r} is registered twice")

    def decorate(builder):
        _FAMILIES[family] = _Family(family, tuple(forms), re.compile(pattern), parse, builder, description)
        return builder

    return decorate


def list_models(verbose: bool = False) -> list[str]:
    """The name forms every registered family accepts, in registration order.

    With ``verbose=True`` each entry also says what the family is ("res18-d{K}a: ResNet ...").
    """
    out = []
    for fam in _FAMILIES.values():
        out += [f"{form}: {fam.description}" if verbose else form for form in fam.forms]
    return out


def _normalise(name: str) -> str:
    return name.strip().lower().replace(" ", "")


def _find(name: str) -> tuple[_Family, re.Match]:
    if isinstance(name, str):
        key = _normalise(name)
        for fam in _FAMILIES.values():
            match = fam.pattern.fullmatch(key)
            if match is not None:
                return fam, match
    raise ValueError(f"unknown model name {name!r}; valid forms: {', '.join(list_models())}")


def parse_name(name: str) -> ModelSpec:
    """The ModelSpec of a registry name; unknown names raise a ValueError listing the valid forms."""
    fam, match = _find(name)
    return fam.parse(name, match)


def check_options(name: str, options: dict, allowed) -> None:
    """A family's build options must be among `allowed`; otherwise a ValueError lists the valid ones."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown build option(s) {unknown} for {name!r}; valid options: {', '.join(sorted(allowed))} "
                         "(python -m dka train --model-option KEY=VALUE)")


def build(name: str, num_classes: int, **options) -> nn.Module:
    """Build a registry model by name, e.g. ``build("res18-d5a", 365, stem="imagenet", width=64)``.

    Args:
        name: a registry name (see `list_models`).
        num_classes: outputs of the final layer.
        **options: the family's build options (for the ResNets: ``stem``, ``width``).
    """
    fam, match = _find(name)
    model = fam.builder(fam.parse(name, match), num_classes, **options)
    if not isinstance(getattr(model, "build_kwargs", None), dict):
        raise TypeError(f"the builder of family {fam.name!r} returned a model without `build_kwargs`")
    return model
