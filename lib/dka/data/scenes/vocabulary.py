"""What a concept-scenes export is made of: the concept names, the presets, and each class's concept set.

A preset uses a prefix of each name list; concepts are numbered in Broden's category order
(`dka.data.broden.DEFAULT_CATEGORIES`), which is also the order of `category.csv`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from dka.data.broden import DEFAULT_CATEGORIES

__all__ = ["Preset", "SCENE_PRESETS", "preset_by_name", "Concept", "vocabulary", "sample_classes",
           "PIXEL_CATEGORIES", "SPATIAL_CATEGORIES", "COLOURS", "TEXTURES", "OBJECTS", "PARTS", "SCENES",
           "SCENE_PALETTES"]

PIXEL_CATEGORIES = ("color", "object", "part", "texture")  # the categories with per-pixel label maps
SPATIAL_CATEGORIES = ("color", "texture", "object")  # placed on their own (a part sits on an object)

COLOURS = {
    "red-c": (215, 40, 40),
    "green-c": (45, 165, 65),
    "blue-c": (40, 85, 215),
    "yellow-c": (235, 205, 45),
    "orange-c": (240, 130, 35),
    "purple-c": (135, 55, 175),
    "pink-c": (240, 125, 190),
    "brown-c": (125, 80, 40),
}
TEXTURES = ("striped", "dotted", "chequered", "grid", "zigzagged", "banded", "blotchy", "crosshatched")
OBJECTS = ("disc", "square", "triangle", "cross", "ring", "star", "diamond", "crescent")
PARTS = ("eye", "band", "cap")
SCENES = ("sky-s", "field-s", "desert-s", "night-s", "indoor-s")
SCENE_PALETTES = {  # (top colour, colour at the horizon/bottom, ground colour or None)
    "sky-s": ((90, 150, 230), (205, 225, 250), None),
    "field-s": ((165, 200, 235), (215, 230, 240), (70, 140, 60)),
    "desert-s": ((240, 225, 180), (250, 240, 210), (205, 165, 95)),
    "night-s": ((15, 20, 55), (45, 45, 95), None),
    "indoor-s": ((200, 185, 160), (215, 200, 175), (115, 80, 50)),
}


@dataclass(frozen=True)
class Preset:
    """Everything that determines a concept-scenes export (together with the seed)."""

    name: str
    size: int
    n_classes: int
    n_train: int
    n_test: int
    n_color: int
    n_texture: int
    n_object: int
    n_part: int
    n_scene: int
    class_sizes: tuple = (2, 3, 4)
    class_size_probs: tuple = (0.3, 0.45, 0.25)
    distractors: tuple = (1, 2)  # inclusive range of distractor concepts per image
    near_miss_prob: float = 0.5
    max_spatial: int = 5  # colour/texture/object elements per image
    noise_std: float = 5.0


SCENE_PRESETS = {
    "smoke": Preset("smoke", size=24, n_classes=4, n_train=240, n_test=80, n_color=3, n_texture=3, n_object=3,
                    n_part=1, n_scene=2, class_sizes=(2, 3), class_size_probs=(0.5, 0.5), max_spatial=4),
    "demo32": Preset("demo32", size=32, n_classes=10, n_train=10000, n_test=2000, n_color=5, n_texture=5,
                     n_object=5, n_part=2, n_scene=3),
    "demo64": Preset("demo64", size=64, n_classes=32, n_train=8000, n_test=2000, n_color=8, n_texture=8,
                     n_object=8, n_part=3, n_scene=5, distractors=(1, 3), max_spatial=6),
}


def preset_by_name(name: str) -> Preset:
    """The preset `name`, with or without the `scenes-` prefix the dataset names carry."""
    key = name[len("scenes-"):] if name.startswith("scenes-") else name
    if key not in SCENE_PRESETS:
        raise ValueError(f"unknown concept-scenes preset {name!r}; valid presets: {', '.join(SCENE_PRESETS)}")
    return SCENE_PRESETS[key]


@dataclass(frozen=True)
class Concept:
    name: str
    category: str  # a Broden category (DEFAULT_CATEGORIES)
    label: int  # Broden label number in the export


def vocabulary(preset: Preset) -> list[Concept]:
    """The preset's concepts, numbered from 1 in Broden's category order."""
    names = {
        "color": list(COLOURS)[: preset.n_color],
        "object": list(OBJECTS[: preset.n_object]),
        "part": list(PARTS[: preset.n_part]),
        "scene": list(SCENES[: preset.n_scene]),
        "texture": list(TEXTURES[: preset.n_texture]),
    }
    concepts, number = [], 1
    for cat in DEFAULT_CATEGORIES:
        for name in names.get(cat, ()):
            concepts.append(Concept(name, cat, number))
            number += 1
    return concepts


def sample_classes(preset: Preset, concepts: list[Concept], seed: int) -> list[tuple[str, ...]]:
    """Fixed concept sets, one per class: an antichain (no class contains another), each class sharing a
    concept with an earlier one, at most one scene and one part (and a part only with an object)."""
    rng = np.random.default_rng([seed, 0xC1A55])
    by_name = {c.name: c for c in concepts}
    names = [c.name for c in concepts]
    usage = Counter()
    classes: list[frozenset] = []
    for _ in range(preset.n_classes):
        for _attempt in range(5000):
            k = int(rng.choice(preset.class_sizes, p=preset.class_size_probs))
            weights = np.array([1.0 / (1 + usage[n]) ** 2 for n in names])
            chosen = frozenset(rng.choice(names, size=k, replace=False, p=weights / weights.sum()).tolist())
            cats = Counter(by_name[n].category for n in chosen)
            spatial = sum(cats[c] for c in SPATIAL_CATEGORIES)
            if cats["scene"] > 1 or cats["part"] > 1 or (cats["part"] and not cats["object"]):
                continue
            if spatial < 1 or spatial > preset.max_spatial - 1:
                continue
            if any(chosen <= other or other <= chosen for other in classes):
                continue
            if classes and not any(chosen & other for other in classes):
                continue
            classes.append(chosen)
            usage.update(chosen)
            break
        else:  # pragma: no cover - the presets are far from this limit
            raise RuntimeError(f"could not draw {preset.n_classes} distinct classes from {len(names)} concepts")
    order = {n: i for i, n in enumerate(names)}
    return [tuple(sorted(cl, key=order.__getitem__)) for cl in classes]
