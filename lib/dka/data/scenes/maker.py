"""`SceneMaker`: one image of a (preset, seed) — which concepts it shows, where they go, and its pixels.

Each image has its own random stream seeded by (seed, split, index), so an image does not depend on
which process draws it or in what order. The draws, in order: the concept set (the class's concepts
plus distractors, often a near miss of another class), the layout (element parameters, then position,
retried until every element stays at least 60% visible), the background, and the seed of the noise.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from dka.data.scenes.elements import ELEMENT_TYPES, Background, Element, Part
from dka.data.scenes.vocabulary import PIXEL_CATEGORIES, SPATIAL_CATEGORIES, Preset, preset_by_name, \
    sample_classes, vocabulary

__all__ = ["Scene", "SceneMaker", "SPLITS"]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Scene:
    """One image: its class, concepts, background, elements in drawing order, and noise seed."""

    class_index: int
    concepts: frozenset
    background: Background
    elements: tuple[Element, ...]
    noise_seed: int


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
        """At most one scene, no more parts than objects, at most max_spatial regions, and no other
        class's concepts all present."""
        cats = Counter(self.by_name[n].category for n in concepts)
        if cats["scene"] > 1 or cats["part"] > cats["object"]:
            return False
        if sum(cats[c] for c in SPATIAL_CATEGORIES) > self.preset.max_spatial:
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
            backgrounds = [str(n) for n in rng.permutation([c.name for c in self.concepts if c.category == "scene"])
                           if self._valid(frozenset(chosen | {n}), class_index)]
            if not backgrounds:
                return frozenset()
            chosen.add(backgrounds[0])
        return frozenset(chosen)

    # elements ---------------------------------------------------------------------------------------
    def _element(self, name: str, rng: np.random.Generator, scale: float) -> Element:
        concept = self.by_name[name]
        angle = float(rng.uniform(0, math.pi))  # drawn for every kind (shapes and parts ignore it)
        return ELEMENT_TYPES[concept.category].sample(concept, rng, self.preset.size, scale, angle)

    def _drawing_order(self, concepts: frozenset, class_index: int,
                       rng: np.random.Generator) -> list[tuple[str, str | None]]:
        """(concept, host object or None) in drawing order: textures, colours, then each object followed
        by its parts. A class's own part goes on one of the class's objects when it has one."""
        present = {cat: [c.name for c in self.concepts if c.name in concepts and c.category == cat]
                   for cat in ("color", "texture", "object", "part")}
        objects = present["object"]
        class_objects = [n for n in objects if n in self.class_sets[class_index]]
        hosts: dict[str, list[str]] = {o: [] for o in objects}
        for part in present["part"]:
            pool = class_objects if part in self.class_sets[class_index] and class_objects else objects
            free = [o for o in pool if not hosts[o]] or pool
            hosts[str(rng.choice(free))].append(part)
        order = [(n, None) for n in present["texture"]] + [(n, None) for n in present["color"]]
        for o in objects:
            order.append((o, None))
            order += [(p, o) for p in hosts[o]]
        return order

    def _layout(self, concepts: frozenset, class_index: int, rng: np.random.Generator,
                scale: float) -> list[Element] | None:
        """Place the elements one by one, keeping at least 60% of every element (an object with its
        parts) visible; None when no such placement was found."""
        size = self.preset.size
        owner = np.full((size, size), -1, np.int32)
        elements: list[Element] = []
        areas: list[int] = []
        groups: list[list[int]] = []  # element indices whose pixels count for element i's visibility
        min_px = max(4, size * size // 150)
        for name, host_name in self._drawing_order(concepts, class_index, rng):
            host_idx = None if host_name is None else next(i for i, e in enumerate(elements)
                                                           if e.concept == host_name)
            for _attempt in range(40):
                el = self._element(name, rng, scale)
                if host_idx is None:
                    margin = 0.6 * el.r
                    cy = float(rng.uniform(margin, size - margin))
                    cx = float(rng.uniform(margin, size - margin))
                    el = replace(el, cy=cy, cx=cx)
                else:
                    el = replace(el, host=elements[host_idx])
                mask = el.mask(size)
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
                background = Background.sample(self.by_name[scene_name], rng, self.preset.size)
                return Scene(class_index, concepts, background, tuple(elements), int(rng.integers(0, 2**31 - 1)))
            if attempt % 10 == 9:
                scale *= 0.92  # crowded: shrink elements a little and try again
        raise RuntimeError(f"could not lay out image {split}/{index} of preset {self.preset.name}")

    # rendering ----------------------------------------------------------------------------------------
    def render(self, scene: Scene) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """(clean float32 image HxWx3, label map per pixel category, owner map of element indices)."""
        size = self.preset.size
        image = scene.background.paint(size)
        owner = np.full((size, size), -1, np.int32)
        for i, el in enumerate(scene.elements):
            mask, layer = el.paint(size)
            image[mask] = layer[mask]
            owner[mask] = i
        labels = {cat: np.zeros((size, size), np.int32) for cat in PIXEL_CATEGORIES}
        for i, el in enumerate(scene.elements):
            mine = owner == i
            labels[el.category][mine] = el.label
            if isinstance(el, Part):  # a part's pixels belong to its host object too, as in Broden
                labels["object"][mine] = el.host.label
        return image, labels, owner

    def final_image(self, scene: Scene, clean: np.ndarray) -> np.ndarray:
        """Clean render + per-image brightness shift + pixel noise, as uint8."""
        rng = np.random.default_rng(scene.noise_seed)
        noisy = clean + rng.uniform(-8, 8) + rng.normal(0, self.preset.noise_std, clean.shape)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
