"""Concept scenes: the built-in dataset whose class -> concept composition is known exactly.

Every image is drawn from named concepts in Broden's categories — colour blobs (`color`), grey
textures (`texture`), shaded shapes (`object`), marks on those shapes (`part`) and a background
(`scene`, an image-level label) — and every class is a fixed set of 2-4 concepts that it shares with
other classes. An image holds its class's concepts plus distractors that never complete another class
(and are often a near miss, one concept short of one), at random places and scales, with noise, so the
class can only be read from the combination of concepts. The export is in Broden's on-disk format, so
Network Dissection runs on it through the same loader as on real Broden, and `class_concepts.csv`
holds the ground truth that explanations are scored against.

Generation is a pure function of (preset, seed): each image has its own random stream seeded by
(seed, split, index), so the result does not depend on how the work is split between processes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["generate", "SceneMaker", "Scene", "Preset", "PRESETS", "Concept", "preset_by_name", "vocabulary",
           "sample_classes", "element_mask", "draw_element", "draw_background", "encode_label_png",
           "decode_label_png", "params_for", "is_export", "read_params", "read_classes", "GENERATOR_VERSION",
           "PARAMS_FILE", "INDEX_COLUMNS", "CATEGORY_ORDER", "PIXEL_CATEGORIES", "SPLITS", "JPEG_QUALITY", "COLOURS",
           "TEXTURES", "OBJECTS", "PARTS", "SCENES", "SCENE_PALETTES"]

GENERATOR_VERSION = 1
PARAMS_FILE = "scenes_params.json"
INDEX_COLUMNS = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "material", "part", "scene", "texture"]
CATEGORY_ORDER = ("color", "object", "part", "scene", "texture")  # category.csv order (material: none)
PIXEL_CATEGORIES = ("color", "object", "part", "texture")
SPLITS = ("train", "test")
JPEG_QUALITY = 95

# --- vocabulary (presets use a prefix of each list) -------------------------------------------------
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


PRESETS = {
    "smoke": Preset("smoke", size=24, n_classes=4, n_train=240, n_test=80, n_color=3, n_texture=3, n_object=3,
                    n_part=1, n_scene=2, class_sizes=(2, 3), class_size_probs=(0.5, 0.5), max_spatial=4),
    "demo32": Preset("demo32", size=32, n_classes=10, n_train=10000, n_test=2000, n_color=5, n_texture=5,
                     n_object=5, n_part=2, n_scene=3),
    "demo64": Preset("demo64", size=64, n_classes=32, n_train=8000, n_test=2000, n_color=8, n_texture=8,
                     n_object=8, n_part=3, n_scene=5, distractors=(1, 3), max_spatial=6),
}


def preset_by_name(name: str) -> Preset:
    key = name[len("scenes-"):] if name.startswith("scenes-") else name
    if key not in PRESETS:
        raise ValueError(f"unknown concept-scenes preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[key]


@dataclass(frozen=True)
class Concept:
    name: str
    category: str
    label: int  # Broden label number in the export


def vocabulary(preset: Preset) -> list[Concept]:
    """The preset's concepts, numbered in category.csv order (color, object, part, scene, texture)."""
    names = {
        "color": list(COLOURS)[: preset.n_color],
        "object": list(OBJECTS[: preset.n_object]),
        "part": list(PARTS[: preset.n_part]),
        "scene": list(SCENES[: preset.n_scene]),
        "texture": list(TEXTURES[: preset.n_texture]),
    }
    concepts, number = [], 1
    for cat in CATEGORY_ORDER:
        for name in names[cat]:
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
            spatial = cats["color"] + cats["texture"] + cats["object"]
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


# --- geometry -----------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _local(el: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in the element's rotated frame, in pixels, origin at its centre."""
    yy, xx = _grid(size)
    dy, dx = yy - el["cy"], xx - el["cx"]
    c, s = math.cos(el["angle"]), math.sin(el["angle"])
    return dx * c + dy * s, -dx * s + dy * c


def _blob_mask(el: dict, size: int) -> np.ndarray:
    """An irregular blob: an ellipse whose radius is modulated by a few low harmonics."""
    u, v = _local(el, size)
    u, v = u / el["aspect"], v * el["aspect"]
    theta = np.arctan2(v, u)
    radius = np.full_like(u, el["r"])
    for k, a, phi in el["harmonics"]:
        radius += el["r"] * a * np.cos(k * theta + phi)
    return np.sqrt(u * u + v * v) < radius


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _texture_ink(el: dict, size: int) -> np.ndarray:
    u, v = _local(el, size)
    p, name = el["period"], el["concept"]
    if name in ("striped", "banded"):
        return _frac(u / p) < 0.5
    if name == "dotted":
        return (_frac(u / p) - 0.5) ** 2 + (_frac(v / p) - 0.5) ** 2 < 0.3**2
    if name == "chequered":
        return (np.floor(u / p) + np.floor(v / p)) % 2 == 0
    if name in ("grid", "crosshatched"):
        w = el["line"] / p
        return (_frac(u / p) < w) | (_frac(v / p) < w)
    if name == "zigzagged":
        tri = 2 * np.abs(_frac(v / el["zig"]) - 0.5)
        return _frac((u + 0.8 * p * tri) / p) < 0.5
    if name == "blotchy":
        total = np.zeros_like(u)
        for angle, freq, phase in el["waves"]:
            total += np.sin((u * math.cos(angle) + v * math.sin(angle)) * freq + phase)
        return total > 0
    raise ValueError(f"unknown texture {name!r}")


def _shape_mask(el: dict, size: int) -> np.ndarray:
    u, v = _local(el, size)
    U, V = u / el["r"], v / el["r"]
    d2 = U * U + V * V
    name = el["concept"]
    if name == "disc":
        return d2 < 1
    if name == "ring":
        return (d2 < 1) & (d2 > 0.33)
    if name == "square":
        return np.maximum(np.abs(U), np.abs(V)) < 0.82
    if name == "diamond":
        return np.abs(U) + np.abs(V) < 1.05
    if name == "triangle":
        return (V < 0.55) & (1.732 * np.abs(U) < V + 1.0)
    if name == "cross":
        return ((np.abs(U) < 0.32) & (np.abs(V) < 1)) | ((np.abs(V) < 0.32) & (np.abs(U) < 1))
    if name == "star":
        theta = np.arctan2(V, U)
        rho = 0.45 + 0.6 * ((np.cos(5 * (theta + math.pi / 2)) + 1) / 2) ** 1.5
        return np.sqrt(d2) < rho
    if name == "crescent":
        return (d2 < 1) & ((U - 0.45) ** 2 + V**2 > 0.8**2)
    raise ValueError(f"unknown shape {name!r}")


def _erode(mask: np.ndarray, width: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(width):
        shrunk = out.copy()
        shrunk[1:, :] &= out[:-1, :]
        shrunk[:-1, :] &= out[1:, :]
        shrunk[:, 1:] &= out[:, :-1]
        shrunk[:, :-1] &= out[:, 1:]
        shrunk[0, :] = shrunk[-1, :] = shrunk[:, 0] = shrunk[:, -1] = False
        out = shrunk
    return out


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.float32)[..., None], 3, axis=2)


def element_mask(el: dict, size: int, host: dict | None = None) -> np.ndarray:
    """The pixels an element covers (what `draw_element` returns first), without painting it."""
    cat = el["category"]
    if cat in ("color", "texture"):
        return _blob_mask(el, size)
    if cat == "object":
        return _shape_mask(el, size)
    return draw_element(el, size, host)[0]


def draw_element(el: dict, size: int, host: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mask, layer) of one element: the pixels it covers and the colours it paints there.

    A pure function of the element's parameters, so tests can redraw any element on its own and compare
    with the composite image at the pixels its label mask claims."""
    cat = el["category"]
    if cat == "color":
        mask = _blob_mask(el, size)
        layer = np.empty((size, size, 3), np.float32)
        layer[:] = np.asarray(el["rgb"], np.float32)
        return mask, layer
    if cat == "texture":
        mask = _blob_mask(el, size)
        ink = _texture_ink(el, size)
        return mask, _grey(np.where(ink, el["dark"], el["light"]))
    if cat == "object":
        mask = _shape_mask(el, size)
        u, v = _local(el, size)
        t = (u * math.cos(el["shade_dir"]) + v * math.sin(el["shade_dir"])) / el["r"]
        values = el["bright"] - el["spread"] * np.clip((t + 1) / 2, 0, 1)
        outline = mask & ~_erode(mask, el["outline_px"])
        values = np.where(outline, el["outline"], values)
        return mask, _grey(values)
    if cat == "part":
        assert host is not None, "a part is drawn on its host object"
        host_mask = _shape_mask(host, size)
        u, v = _local(host, size)
        U, V = u / host["r"], v / host["r"]
        name = el["concept"]
        if name == "eye":
            d2 = (U - el["u0"]) ** 2 + (V - el["v0"]) ** 2
            region = d2 < 0.32**2
            values = np.where(d2 < 0.14**2, 10.0, 245.0)
        elif name == "band":
            region = np.abs(V - el["v0"]) < 0.17
            values = np.full(U.shape, 12.0)
        elif name == "cap":
            region = V < el["v0"]
            values = np.where(_frac(u / (2 * el["stripe_px"])) < 0.5, 10.0, 245.0)
        else:
            raise ValueError(f"unknown part {name!r}")
        return region & host_mask, _grey(values)
    raise ValueError(f"element of category {cat!r} is not drawn as a region")


def draw_background(el: dict, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    top, horizon = (np.asarray(c, np.float32) for c in el["palette"][:2])
    ground = el["palette"][2]
    t = (yy / size)[..., None]
    if ground is None:
        image = top + (horizon - top) * t
    else:
        line = el["horizon"] * size + el["slope"] * (xx - size / 2)
        sky = top + (horizon - top) * np.clip(yy / np.maximum(line, 1), 0, 1)[..., None]
        ground = np.asarray(ground, np.float32)
        earth = ground * (0.85 + 0.3 * np.clip((yy - line) / size, 0, 1))[..., None]
        image = np.where((yy > line)[..., None], earth, sky)
    image = image.astype(np.float32)
    for y, x in el.get("speckles", ()):
        image[int(y), int(x)] = 235.0
    return image


# --- sampling one image -------------------------------------------------------------------------------
@dataclass
class Scene:
    """One image: its class, background, ordered elements (drawing order) and noise seed."""

    class_index: int
    concepts: frozenset
    background: dict
    elements: list = field(default_factory=list)
    noise_seed: int = 0


class SceneMaker:
    """Samples and renders the images of one (preset, seed)."""

    def __init__(self, preset: Preset | str, seed: int = 0):
        self.preset = preset_by_name(preset) if isinstance(preset, str) else preset
        self.seed = int(seed)
        self.concepts = vocabulary(self.preset)
        self.by_name = {c.name: c for c in self.concepts}
        self.classes = sample_classes(self.preset, self.concepts, self.seed)
        self.class_sets = [frozenset(c) for c in self.classes]

    # concept-set level ------------------------------------------------------------------------------
    def _valid(self, concepts: frozenset, class_index: int) -> bool:
        cats = Counter(self.by_name[n].category for n in concepts)
        if cats["scene"] > 1 or cats["part"] > cats["object"]:
            return False
        if cats["color"] + cats["texture"] + cats["object"] > self.preset.max_spatial:
            return False
        return not any(other <= concepts for j, other in enumerate(self.class_sets) if j != class_index)

    def _concept_set(self, class_index: int, rng: np.random.Generator) -> frozenset:
        p = self.preset
        base = self.class_sets[class_index]
        chosen = set(base)
        budget = int(rng.integers(p.distractors[0], p.distractors[1] + 1))
        if rng.random() < p.near_miss_prob:
            sharing = [j for j, o in enumerate(self.class_sets) if j != class_index and o & base] or [
                j for j in range(len(self.class_sets)) if j != class_index]
            other = self.class_sets[int(rng.choice(sharing))]
            missing = str(rng.choice(sorted(other - base)))
            add = other - base - {missing}
            if add and len(add) <= budget + 1 and self._valid(frozenset(chosen | add), class_index):
                chosen |= add
                budget -= len(add)
        names = [c.name for c in self.concepts if c.category != "scene"]
        for name in map(str, rng.permutation(names)):
            if budget <= 0:
                break
            if name not in chosen and self._valid(frozenset(chosen | {name}), class_index):
                chosen.add(name)
                budget -= 1
        if not any(self.by_name[n].category == "scene" for n in chosen):
            scenes = [str(n) for n in rng.permutation([c.name for c in self.concepts if c.category == "scene"])
                      if self._valid(frozenset(chosen | {n}), class_index)]
            if not scenes:
                return frozenset()
            chosen.add(scenes[0])
        return frozenset(chosen)

    # element parameters -----------------------------------------------------------------------------
    def _element(self, name: str, rng: np.random.Generator, scale: float) -> dict:
        size = self.preset.size
        concept = self.by_name[name]
        el = {"concept": name, "category": concept.category, "label": concept.label,
              "angle": float(rng.uniform(0, math.pi))}
        if concept.category in ("color", "texture"):
            lo, hi = (0.14, 0.21) if concept.category == "color" else (0.18, 0.25)
            el.update(r=float(size * rng.uniform(lo, hi) * scale), aspect=float(rng.uniform(0.8, 1.25)),
                      harmonics=[(k, float(rng.uniform(0, 0.12)), float(rng.uniform(0, 2 * math.pi)))
                                 for k in (2, 3, 5)])
        if concept.category == "color":
            el["rgb"] = [float(np.clip(c + rng.uniform(-20, 20), 0, 255)) for c in COLOURS[name]]
        elif concept.category == "texture":
            rel = {"striped": 0.13, "banded": 0.3, "dotted": 0.18, "chequered": 0.11, "grid": 0.2,
                   "crosshatched": 0.14, "zigzagged": 0.17, "blotchy": 0.0}[name]
            el.update(period=max(3.0, size * rel * float(rng.uniform(0.9, 1.1))), line=max(1.0, size / 32),
                      dark=float(rng.uniform(25, 85)), light=float(rng.uniform(165, 230)),
                      zig=size * 0.15, waves=[(float(rng.uniform(0, math.pi)), float(rng.uniform(0.25, 0.45)) * 32 / size,
                                               float(rng.uniform(0, 2 * math.pi))) for _ in range(3)])
            if name == "grid":
                el["angle"] = float(rng.uniform(-0.17, 0.17))
            elif name == "crosshatched":
                el["angle"] = float(math.pi / 4 + rng.uniform(-0.17, 0.17))
        elif concept.category == "object":
            el.update(r=float(size * rng.uniform(0.22, 0.3) * scale), angle=float(rng.uniform(-0.35, 0.35)),
                      shade_dir=float(rng.uniform(0, 2 * math.pi)), bright=float(rng.uniform(195, 240)),
                      spread=float(rng.uniform(70, 110)), outline=float(rng.uniform(10, 40)),
                      outline_px=max(1, round(size / 32)))
        elif concept.category == "part":
            el.update(u0=float(rng.uniform(-0.55, 0.55)), v0=float(rng.uniform(-0.55, 0.25)),
                      stripe_px=max(1, round(size / 32)))
            if name == "cap":
                el["v0"] = float(rng.uniform(-0.5, -0.3))
            elif name == "band":
                el["v0"] = float(rng.uniform(-0.25, 0.25))
        return el

    def _background(self, name: str, rng: np.random.Generator) -> dict:
        size = self.preset.size
        palette = [None if c is None else [float(np.clip(x + rng.uniform(-15, 15), 0, 255)) for x in c]
                   for c in SCENE_PALETTES[name]]
        el = {"concept": name, "category": "scene", "label": self.by_name[name].label, "palette": palette,
              "horizon": float(rng.uniform(0.35, 0.65) if name != "indoor-s" else rng.uniform(0.55, 0.8)),
              "slope": float(rng.uniform(-0.15, 0.15))}
        if name == "night-s":
            n = max(2, int(size * size * 0.012))
            el["speckles"] = rng.integers(0, size, (n, 2)).tolist()
        return el

    # layout ---------------------------------------------------------------------------------------------
    def _layout(self, concepts: frozenset, class_index: int, rng: np.random.Generator, scale: float):
        """Place the elements one by one (textures, colours, objects each with its parts), keeping at least
        60% of every element visible; None when no such placement was found."""
        size = self.preset.size
        cats = {c: [n for n in (x.name for x in self.concepts) if n in concepts and self.by_name[n].category == c]
                for c in CATEGORY_ORDER}
        objects = list(cats["object"])
        class_objects = [n for n in objects if n in self.class_sets[class_index]]
        hosts: dict[str, list[str]] = {o: [] for o in objects}
        for part in cats["part"]:
            pool = class_objects if part in self.class_sets[class_index] and class_objects else objects
            free = [o for o in pool if not hosts[o]] or pool
            hosts[str(rng.choice(free))].append(part)
        order = [(n, None) for n in cats["texture"]] + [(n, None) for n in cats["color"]]
        for o in objects:
            order.append((o, None))
            order += [(p, o) for p in hosts[o]]

        owner = np.full((size, size), -1, np.int32)
        elements: list[dict] = []
        areas: list[int] = []
        groups: list[list[int]] = []  # element indices whose pixels count for element i's visibility
        min_px = max(4, size * size // 150)
        for name, host_name in order:
            host_idx = next((i for i, e in enumerate(elements) if e["concept"] == host_name), None)
            for _attempt in range(40):
                el = self._element(name, rng, scale)
                if host_idx is None:
                    margin = 0.6 * el["r"]
                    el["cy"] = float(rng.uniform(margin, size - margin))
                    el["cx"] = float(rng.uniform(margin, size - margin))
                    mask = element_mask(el, size)
                else:
                    el["host"] = host_idx
                    mask, _ = draw_element(el, size, elements[host_idx])
                area = int(mask.sum())
                if area < min_px:
                    continue
                trial = np.where(mask, len(elements), owner)
                counts = np.bincount(trial.ravel() + 1, minlength=len(elements) + 2)[1:]
                ok = True
                for i in range(len(elements) + 1):
                    members = groups[i] if i < len(groups) else [i]
                    visible = sum(int(counts[m]) for m in members)
                    full = areas[i] if i < len(areas) else area
                    if visible < max(min_px, 0.6 * full):
                        ok = False
                        break
                if ok:
                    owner = trial
                    elements.append(el)
                    areas.append(area)
                    groups.append([len(elements) - 1])
                    if host_idx is not None:
                        groups[host_idx].append(len(elements) - 1)
                    break
            else:
                return None
        return elements

    def sample(self, split: str, index: int) -> Scene:
        """The scene of image `index` of `split` (class = index modulo the number of classes)."""
        rng = np.random.default_rng([self.seed, SPLITS.index(split), int(index)])
        class_index = int(index) % len(self.classes)
        scale = 1.0
        for attempt in range(200):
            concepts = self._concept_set(class_index, rng)
            if not concepts:
                continue
            elements = self._layout(concepts, class_index, rng, scale)
            if elements is not None:
                scene_name = next(n for n in concepts if self.by_name[n].category == "scene")
                return Scene(class_index, concepts, self._background(scene_name, rng), elements,
                             int(rng.integers(0, 2**31 - 1)))
            if attempt % 10 == 9:
                scale *= 0.92  # crowded: shrink elements a little and try again
        raise RuntimeError(f"could not lay out image {split}/{index} of preset {self.preset.name}")

    # rendering ----------------------------------------------------------------------------------------
    def render(self, scene: Scene) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """(clean float32 image HxWx3, label map per pixel category, owner map of element indices)."""
        size = self.preset.size
        image = draw_background(scene.background, size)
        owner = np.full((size, size), -1, np.int32)
        for i, el in enumerate(scene.elements):
            host = scene.elements[el["host"]] if "host" in el else None
            mask, layer = draw_element(el, size, host)
            image[mask] = layer[mask]
            owner[mask] = i
        labels = {cat: np.zeros((size, size), np.int32) for cat in PIXEL_CATEGORIES}
        for i, el in enumerate(scene.elements):
            mine = owner == i
            labels[el["category"]][mine] = el["label"]
            if "host" in el:  # a part's pixels belong to its host object too, as in Broden
                labels["object"][mine] = scene.elements[el["host"]]["label"]
        return image, labels, owner

    def final_image(self, scene: Scene, clean: np.ndarray) -> np.ndarray:
        """Clean render + per-image brightness shift + pixel noise, as uint8."""
        rng = np.random.default_rng(scene.noise_seed)
        noisy = clean + rng.uniform(-8, 8) + rng.normal(0, self.preset.noise_std, clean.shape)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def encode_label_png(labels: np.ndarray) -> np.ndarray:
    """Broden's segmentation encoding: label = R + 256 * G."""
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    rgb[..., 0] = labels & 0xFF
    rgb[..., 1] = (labels >> 8) & 0xFF
    return rgb


def decode_label_png(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0].astype(np.int32) + 256 * rgb[..., 1].astype(np.int32)


# --- export -------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(preset: Preset, seed: int, root: str) -> None:
    _WORKER["maker"] = SceneMaker(preset, seed)
    _WORKER["root"] = Path(root)


def _export_chunk(tasks: list[tuple[str, int]]) -> list[dict]:
    maker: SceneMaker = _WORKER["maker"]
    root: Path = _WORKER["root"]
    size = maker.preset.size
    rows = []
    for split, index in tasks:
        scene = maker.sample(split, index)
        clean, labels, _ = maker.render(scene)
        stem = f"{split}/{index:06d}"
        Image.fromarray(maker.final_image(scene, clean)).save(root / "images" / f"{stem}.jpg", quality=JPEG_QUALITY,
                                                           subsampling=0)  # 4:4:4 keeps small colour blobs
        row = {"image": f"{stem}.jpg", "split": split, "ih": size, "iw": size, "sh": size, "sw": size,
               "color": "", "object": "", "material": "", "part": "", "scene": str(scene.background["label"]),
               "texture": ""}
        pixels: Counter = Counter({scene.background["label"]: size * size})
        for cat, lab in labels.items():
            if lab.any():
                Image.fromarray(encode_label_png(lab)).save(root / "images" / f"{stem}_{cat}.png")
                row[cat] = f"{stem}_{cat}.png"
                values, counts = np.unique(lab[lab > 0], return_counts=True)
                pixels.update({(cat, int(v)): int(n) for v, n in zip(values, counts)})
        rows.append({"row": row, "class": scene.class_index, "pixels": pixels})
    return rows


def params_for(preset: Preset, seed: int) -> dict:
    params = {"generator_version": GENERATOR_VERSION, "seed": int(seed), "preset": asdict(preset)}
    return json.loads(json.dumps(params))  # tuples -> lists, exactly as read back from the file


def _params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def is_export(path: Path) -> bool:
    return (Path(path) / PARAMS_FILE).is_file()


def read_params(path: Path) -> dict:
    return json.loads((Path(path) / PARAMS_FILE).read_text())


def read_classes(path: str | os.PathLike) -> list[tuple[str, tuple[str, ...]]]:
    """(name, true concepts) of each class of an export, in class order (its classes.csv)."""
    file = Path(path) / "classes.csv"
    if not file.is_file():
        raise FileNotFoundError(f"no classes.csv in {path}: not a concept-scenes export (write one with "
                                "dka.data.scenes.generate(preset, DIR))")
    with open(file, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "concepts" not in rows[0]:
        raise ValueError(f"{file} has no `concepts` column (columns: {sorted(rows[0])})")
    return [(r["name"], tuple(c for c in r["concepts"].split(";") if c)) for r in rows]


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_metadata(root: Path, maker: SceneMaker, results: list[dict]) -> None:
    size = maker.preset.size
    _write_csv(root / "index.csv", INDEX_COLUMNS, [[r["row"][c] for c in INDEX_COLUMNS] for r in results])
    _write_csv(root / "image_classes.csv", ["image", "split", "class"],
               [[r["row"]["image"], r["row"]["split"], r["class"]] for r in results])
    class_names = [f"class{i:02d}" for i in range(len(maker.classes))]
    _write_csv(root / "classes.csv", ["class", "name", "concepts"],
               [[i, n, ";".join(maker.classes[i])] for i, n in enumerate(class_names)])
    _write_csv(root / "class_concepts.csv", ["class", "concept", "category"],
               [[class_names[i], n, maker.by_name[n].category] for i, cl in enumerate(maker.classes) for n in cl])

    frequency: Counter = Counter()
    coverage: Counter = Counter()
    cat_frequency: Counter = Counter()
    for r in results:
        seen_cats = set()
        for key, n in r["pixels"].items():
            label = key[1] if isinstance(key, tuple) else key
            frequency[label] += 1
            coverage[label] += n / (size * size)
            seen_cats.add(key[0] if isinstance(key, tuple) else "scene")
        cat_frequency.update(seen_cats)
    _write_csv(root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
               [[c.label, c.name, f"{c.category}({frequency[c.label]})", frequency[c.label],
                 f"{coverage[c.label]:.6f}", ""] for c in maker.concepts])
    category_rows = []
    for cat in CATEGORY_ORDER:
        members = [c for c in maker.concepts if c.category == cat]
        category_rows.append([cat, members[0].label, members[-1].label, len(members), cat_frequency[cat]])
        ranked = sorted(members, key=lambda c: (-frequency[c.label], c.label))
        _write_csv(root / f"c_{cat}.csv", ["code", "number", "name", "frequency", "coverage"],
                   [[code, c.label, c.name, frequency[c.label], f"{coverage[c.label]:.6f}"]
                    for code, c in enumerate(ranked, start=1)])
    _write_csv(root / "category.csv", ["name", "first", "last", "count", "frequency"], category_rows)
    p = maker.preset
    (root / "README.txt").write_text(
        f"concept scenes ({p.name}, seed {maker.seed}) in Broden format, made by dka.data.scenes\n"
        f"size: ({size}, {size})\nsegmentation_size: ({size}, {size})\n"
        f"images: {p.n_train} train, {p.n_test} test; classes: {p.n_classes}\n\n"
        "index.csv, label.csv, category.csv, c_<category>.csv: Broden's formats (see broden1_224/README.txt);\n"
        "segmentation PNGs encode label = R + 256*G; scene is an image-level label.\n"
        "image_classes.csv: image,split,class (class index into classes.csv).\n"
        "classes.csv: class,name,concepts; class_concepts.csv: class,concept,category (the ground truth).\n")


def generate(preset: Preset | str, out: str | os.PathLike, seed: int = 0, processes: int = 2,
             progress: bool = True) -> Path:
    """Write the concept-scenes export of (preset, seed) to `out`; a no-op when `out` already holds it.

    Written into a temporary sibling directory and renamed into place, so `out` is never half-written.
    An existing `out` is replaced only when it is a concept-scenes export (it holds scenes_params.json)."""
    preset = preset_by_name(preset) if isinstance(preset, str) else preset
    out = Path(out).expanduser().resolve()
    params = params_for(preset, seed)
    if is_export(out):
        stored = read_params(out)
        stored.pop("generation_seconds", None)
        if stored == params:
            return out
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and is not a concept-scenes export (no {PARAMS_FILE}); "
                              "choose a new or empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{_params_hash(params)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for split in SPLITS:
        (tmp / "images" / split).mkdir(parents=True)
    tasks = [("train", i) for i in range(preset.n_train)] + [("test", i) for i in range(preset.n_test)]
    chunk = max(1, min(250, len(tasks) // (8 * max(1, processes)) or 1))
    chunks = [tasks[i:i + chunk] for i in range(0, len(tasks), chunk)]
    started = time.perf_counter()
    try:
        results: list[dict] = []
        from dka.progress import tqdm

        bar = tqdm(total=len(tasks), desc=f"concept scenes {preset.name}", unit="img", disable=not progress)
        if processes > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ctx.Pool(processes, initializer=_init_worker, initargs=(preset, seed, str(tmp))) as pool:
                for part in pool.imap(_export_chunk, chunks):
                    results += part
                    bar.update(len(part))
        else:
            _init_worker(preset, seed, str(tmp))
            for c in chunks:
                part = _export_chunk(c)
                results += part
                bar.update(len(part))
        bar.close()
        _write_metadata(tmp, SceneMaker(preset, seed), results)
        params["generation_seconds"] = round(time.perf_counter() - started, 2)
        (tmp / PARAMS_FILE).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
