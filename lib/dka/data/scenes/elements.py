"""The things a scene is drawn from, one small frozen class each: colour blob, texture blob, shape, part
on a shape, and background.

Each element is a pure function of its parameters: `mask(size)` gives the pixels it covers and
`paint(size)` the colours it puts there, so a test can redraw any element on its own and compare it with
the composite image. `sample` draws an element's parameters from a random stream; the order of the draws
is part of the dataset's definition (changing it changes every image), so it is kept exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, ClassVar

import numpy as np

from dka.data.scenes.vocabulary import COLOURS, SCENE_PALETTES, Concept

__all__ = ["Element", "ColourBlob", "TextureBlob", "Shape", "Part", "Background", "ELEMENT_TYPES",
           "TEXTURE_STYLES", "SHAPE_MASKS", "PART_STYLES"]


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of a size x size canvas, shared read-only."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.float32)[..., None], 3, axis=2)


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


@dataclass(frozen=True, kw_only=True)
class Element:
    """A concept drawn as a region of the image. `cy`, `cx` (pixels) and `angle` (radians) place it;
    they are set by the layout after the element's other parameters are drawn."""

    category: ClassVar[str]
    concept: str
    label: int
    angle: float
    cy: float = 0.0
    cx: float = 0.0

    def local(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates in the element's rotated frame, in pixels, origin at its centre."""
        yy, xx = _grid(size)
        dy, dx = yy - self.cy, xx - self.cx
        c, s = math.cos(self.angle), math.sin(self.angle)
        return dx * c + dy * s, -dx * s + dy * c

    def mask(self, size: int) -> np.ndarray:
        raise NotImplementedError

    def paint(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(mask, layer): the pixels it covers and the float32 RGB colours it paints (HxWx3)."""
        raise NotImplementedError


def _blob_shape(rng: np.random.Generator, size: int, scale: float, lo: float, hi: float) -> dict:
    return dict(r=float(size * rng.uniform(lo, hi) * scale), aspect=float(rng.uniform(0.8, 1.25)),
                harmonics=tuple((k, float(rng.uniform(0, 0.12)), float(rng.uniform(0, 2 * math.pi)))
                                for k in (2, 3, 5)))


@dataclass(frozen=True, kw_only=True)
class _Blob(Element):
    """An irregular blob: an ellipse whose radius is modulated by a few low harmonics."""

    r: float
    aspect: float
    harmonics: tuple  # (k, amplitude, phase) per harmonic

    def mask(self, size: int) -> np.ndarray:
        u, v = self.local(size)
        u, v = u / self.aspect, v * self.aspect
        theta = np.arctan2(v, u)
        radius = np.full_like(u, self.r)
        for k, a, phi in self.harmonics:
            radius += self.r * a * np.cos(k * theta + phi)
        return np.sqrt(u * u + v * v) < radius


@dataclass(frozen=True, kw_only=True)
class ColourBlob(_Blob):
    category: ClassVar[str] = "color"
    rgb: tuple

    @classmethod
    def sample(cls, concept: Concept, rng: np.random.Generator, size: int, scale: float,
               angle: float) -> ColourBlob:
        shape = _blob_shape(rng, size, scale, 0.14, 0.21)
        rgb = tuple(float(np.clip(c + rng.uniform(-20, 20), 0, 255)) for c in COLOURS[concept.name])
        return cls(concept=concept.name, label=concept.label, angle=angle, rgb=rgb, **shape)

    def paint(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        layer = np.empty((size, size, 3), np.float32)
        layer[:] = np.asarray(self.rgb, np.float32)
        return self.mask(size), layer


# --- textures: ink(texture, u, v) -> where the dark colour goes, in the blob's rotated frame ------------
def _stripes(t: TextureBlob, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _frac(u / t.period) < 0.5


def _dots(t: TextureBlob, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    p = t.period
    return (_frac(u / p) - 0.5) ** 2 + (_frac(v / p) - 0.5) ** 2 < 0.3**2


def _checks(t: TextureBlob, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    p = t.period
    return (np.floor(u / p) + np.floor(v / p)) % 2 == 0


def _lines(t: TextureBlob, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    p = t.period
    w = t.line / p
    return (_frac(u / p) < w) | (_frac(v / p) < w)


def _zigzags(t: TextureBlob, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    p = t.period
    tri = 2 * np.abs(_frac(v / t.zig) - 0.5)
    return _frac((u + 0.8 * p * tri) / p) < 0.5


def _blotches(t: TextureBlob, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    total = np.zeros_like(u)
    for angle, freq, phase in t.waves:
        total += np.sin((u * math.cos(angle) + v * math.sin(angle)) * freq + phase)
    return total > 0


Ink = Callable[["TextureBlob", np.ndarray, np.ndarray], np.ndarray]
TEXTURE_STYLES: dict[str, tuple[float, Ink]] = {  # name -> (period as a share of the image size, ink)
    "striped": (0.13, _stripes),
    "banded": (0.3, _stripes),
    "dotted": (0.18, _dots),
    "chequered": (0.11, _checks),
    "grid": (0.2, _lines),
    "crosshatched": (0.14, _lines),
    "zigzagged": (0.17, _zigzags),
    "blotchy": (0.0, _blotches),
}


@dataclass(frozen=True, kw_only=True)
class TextureBlob(_Blob):
    """A grey two-tone texture filling a blob."""

    category: ClassVar[str] = "texture"
    period: float
    line: float
    dark: float
    light: float
    zig: float
    waves: tuple  # (direction, frequency, phase) per wave, for blotchy

    @classmethod
    def sample(cls, concept: Concept, rng: np.random.Generator, size: int, scale: float,
               angle: float) -> TextureBlob:
        shape = _blob_shape(rng, size, scale, 0.18, 0.25)
        rel = TEXTURE_STYLES[concept.name][0]
        period = max(3.0, size * rel * float(rng.uniform(0.9, 1.1)))
        dark, light = float(rng.uniform(25, 85)), float(rng.uniform(165, 230))
        waves = tuple((float(rng.uniform(0, math.pi)), float(rng.uniform(0.25, 0.45)) * 32 / size,
                       float(rng.uniform(0, 2 * math.pi))) for _ in range(3))
        if concept.name == "grid":  # near axis-aligned
            angle = float(rng.uniform(-0.17, 0.17))
        elif concept.name == "crosshatched":  # near diagonal
            angle = float(math.pi / 4 + rng.uniform(-0.17, 0.17))
        return cls(concept=concept.name, label=concept.label, angle=angle, period=period, line=max(1.0, size / 32),
                   dark=dark, light=light, zig=size * 0.15, waves=waves, **shape)

    def paint(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        u, v = self.local(size)
        ink = TEXTURE_STYLES[self.concept][1](self, u, v)
        return self.mask(size), _grey(np.where(ink, self.dark, self.light))


# --- shapes: mask(U, V, d2) in the shape's frame scaled to its radius ----------------------------------
def _star(U: np.ndarray, V: np.ndarray, d2: np.ndarray) -> np.ndarray:
    theta = np.arctan2(V, U)
    rho = 0.45 + 0.6 * ((np.cos(5 * (theta + math.pi / 2)) + 1) / 2) ** 1.5
    return np.sqrt(d2) < rho


SHAPE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "disc": lambda U, V, d2: d2 < 1,
    "ring": lambda U, V, d2: (d2 < 1) & (d2 > 0.33),
    "square": lambda U, V, d2: np.maximum(np.abs(U), np.abs(V)) < 0.82,
    "diamond": lambda U, V, d2: np.abs(U) + np.abs(V) < 1.05,
    "triangle": lambda U, V, d2: (V < 0.55) & (1.732 * np.abs(U) < V + 1.0),
    "cross": lambda U, V, d2: ((np.abs(U) < 0.32) & (np.abs(V) < 1)) | ((np.abs(V) < 0.32) & (np.abs(U) < 1)),
    "star": _star,
    "crescent": lambda U, V, d2: (d2 < 1) & ((U - 0.45) ** 2 + V**2 > 0.8**2),
}


@dataclass(frozen=True, kw_only=True)
class Shape(Element):
    """A grey object with linear shading and a dark outline; parts are drawn on it."""

    category: ClassVar[str] = "object"
    r: float
    shade_dir: float
    bright: float
    spread: float
    outline_grey: float
    outline_px: int

    @classmethod
    def sample(cls, concept: Concept, rng: np.random.Generator, size: int, scale: float, angle: float) -> Shape:
        # a shape draws its own, smaller tilt after its radius; the common `angle` is not used
        r = float(size * rng.uniform(0.22, 0.3) * scale)
        tilt = float(rng.uniform(-0.35, 0.35))
        shade_dir, bright = float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(195, 240))
        spread, outline_grey = float(rng.uniform(70, 110)), float(rng.uniform(10, 40))
        return cls(concept=concept.name, label=concept.label, angle=tilt, r=r, shade_dir=shade_dir, bright=bright,
                   spread=spread, outline_grey=outline_grey, outline_px=max(1, round(size / 32)))

    def scaled(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(u, v, U, V): the rotated frame in pixels and in units of the radius."""
        u, v = self.local(size)
        return u, v, u / self.r, v / self.r

    def mask(self, size: int) -> np.ndarray:
        _, _, U, V = self.scaled(size)
        return SHAPE_MASKS[self.concept](U, V, U * U + V * V)

    def paint(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        mask = self.mask(size)
        u, v = self.local(size)
        t = (u * math.cos(self.shade_dir) + v * math.sin(self.shade_dir)) / self.r
        values = self.bright - self.spread * np.clip((t + 1) / 2, 0, 1)
        outline = mask & ~_erode(mask, self.outline_px)
        return mask, _grey(np.where(outline, self.outline_grey, values))


# --- parts: (region, grey values) from the host's frame (u in pixels; U, V in host radii) ---------------
def _eye(part: Part, u: np.ndarray, U: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d2 = (U - part.u0) ** 2 + (V - part.v0) ** 2
    return d2 < 0.32**2, np.where(d2 < 0.14**2, 10.0, 245.0)


def _band(part: Part, u: np.ndarray, U: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.abs(V - part.v0) < 0.17, np.full(U.shape, 12.0)


def _cap(part: Part, u: np.ndarray, U: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return V < part.v0, np.where(_frac(u / (2 * part.stripe_px)) < 0.5, 10.0, 245.0)


PART_STYLES: dict[str, Callable] = {"eye": _eye, "band": _band, "cap": _cap}


@dataclass(frozen=True, kw_only=True)
class Part(Element):
    """A mark on its host shape (an eye, a band, a striped cap), clipped to the host; placed in the host's
    frame (`u0`, `v0` in host radii), so its own `angle`, `cy`, `cx` are unused."""

    category: ClassVar[str] = "part"
    u0: float
    v0: float
    stripe_px: int
    host: Shape | None = None

    @classmethod
    def sample(cls, concept: Concept, rng: np.random.Generator, size: int, scale: float, angle: float) -> Part:
        u0, v0 = float(rng.uniform(-0.55, 0.55)), float(rng.uniform(-0.55, 0.25))
        if concept.name == "cap":
            v0 = float(rng.uniform(-0.5, -0.3))
        elif concept.name == "band":
            v0 = float(rng.uniform(-0.25, 0.25))
        return cls(concept=concept.name, label=concept.label, angle=angle, u0=u0, v0=v0,
                   stripe_px=max(1, round(size / 32)))

    def paint(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if self.host is None:
            raise ValueError(f"part {self.concept!r} has no host shape; the layout sets one")
        u, _, U, V = self.host.scaled(size)
        region, values = PART_STYLES[self.concept](self, u, U, V)
        return region & self.host.mask(size), _grey(values)

    def mask(self, size: int) -> np.ndarray:
        return self.paint(size)[0]


ELEMENT_TYPES: dict[str, type[Element]] = {cls.category: cls for cls in (ColourBlob, TextureBlob, Shape, Part)}


@dataclass(frozen=True, kw_only=True)
class Background:
    """The scene concept: a vertical gradient, with ground below a tilted horizon for some scenes (and a
    few stars at night). An image-level label, so it has no mask."""

    category: ClassVar[str] = "scene"
    concept: str
    label: int
    palette: tuple  # (top, horizon, ground or None), RGB floats
    horizon: float  # share of the height, at the centre
    slope: float
    speckles: tuple = ()  # (y, x) pixels painted near-white

    @classmethod
    def sample(cls, concept: Concept, rng: np.random.Generator, size: int) -> Background:
        palette = tuple(None if c is None else tuple(float(np.clip(x + rng.uniform(-15, 15), 0, 255)) for x in c)
                        for c in SCENE_PALETTES[concept.name])
        horizon = float(rng.uniform(0.35, 0.65) if concept.name != "indoor-s" else rng.uniform(0.55, 0.8))
        slope = float(rng.uniform(-0.15, 0.15))
        speckles = ()
        if concept.name == "night-s":
            n = max(2, int(size * size * 0.012))
            speckles = tuple(map(tuple, rng.integers(0, size, (n, 2)).tolist()))
        return cls(concept=concept.name, label=concept.label, palette=palette, horizon=horizon, slope=slope,
                   speckles=speckles)

    def paint(self, size: int) -> np.ndarray:
        """The background image, float32 HxWx3."""
        yy, xx = _grid(size)
        top, horizon = (np.asarray(c, np.float32) for c in self.palette[:2])
        ground = self.palette[2]
        t = (yy / size)[..., None]
        if ground is None:
            image = top + (horizon - top) * t
        else:
            line = self.horizon * size + self.slope * (xx - size / 2)
            sky = top + (horizon - top) * np.clip(yy / np.maximum(line, 1), 0, 1)[..., None]
            earth = np.asarray(ground, np.float32) * (0.85 + 0.3 * np.clip((yy - line) / size, 0, 1))[..., None]
            image = np.where((yy > line)[..., None], earth, sky)
        image = image.astype(np.float32)
        for y, x in self.speckles:
            image[int(y), int(x)] = 235.0
        return image
