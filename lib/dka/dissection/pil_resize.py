"""PIL's bilinear resize of float ('F') images, computed in torch with PIL's exact arithmetic.

NetDissect-Lite upsamples each firing map with scipy's imresize(mode='F'): the map becomes a float32
PIL image resized with PIL's BILINEAR filter. PIL resamples separably (horizontal pass, then vertical),
each output value a sum over a few input values taken in order, in double precision, with triangle
weights normalised to sum 1, and rounded to float32 after each pass. `torch.nn.functional.interpolate`
computes the same interpolation with another float32 formula, so its result can differ in the last
bit; a pixel exactly at a unit's threshold then flips. It cannot happen at Broden's 7 -> 112 (scale
1/16, every weight and product exact), but does at other scales. `pil_bilinear` repeats PIL's steps:
the weights as PIL's `precompute_coeffs` forms them, and the per-tap double products and sums in
PIL's order (elementwise operations, no fused multiply-add), so it equals PIL bit for bit, on any
device, enlarging or shrinking.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["pil_bilinear", "pil_bilinear_weights"]


def _triangle(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


@lru_cache(maxsize=64)
def pil_bilinear_weights(in_size: int, out_size: int) -> tuple[tuple[tuple[int, ...], ...],
                                                                tuple[tuple[float, ...], ...]]:
    """Per output pixel: the input indices and normalised weights PIL uses (bilinear, no box).

    Python floats are IEEE doubles and `int()` truncates toward zero like C's cast, so these are
    PIL's numbers exactly.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got {in_size} -> {out_size}")
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    inv = 1.0 / filterscale
    indices, weights = [], []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        w = [_triangle((x + xmin - center + 0.5) * inv) for x in range(xmax - xmin)]
        total = 0.0
        for wi in w:
            total += wi
        if total != 0.0:
            w = [wi / total for wi in w]
        indices.append(tuple(range(xmin, xmax)))
        weights.append(tuple(w))
    return tuple(indices), tuple(weights)


def _pass(x: Tensor, in_size: int, out_size: int, dim: int) -> Tensor:
    """One PIL pass along `dim` (-1: rows, -2: columns) of a float32 tensor: the taps' double products
    summed in PIL's order, then rounded to float32."""
    if in_size == out_size:
        return x
    idx, wts = pil_bilinear_weights(in_size, out_size)
    taps = max(len(i) for i in idx)
    index = torch.tensor([list(i) + [i[0]] * (taps - len(i)) for i in idx], device=x.device)  # (out, taps)
    weight = torch.tensor([list(w) + [0.0] * (taps - len(w)) for w in wts], dtype=torch.float64, device=x.device)
    xd = x.double()
    acc = None
    for t in range(taps):  # a padded tap adds 0 * value = 0 exactly
        if dim == -1:
            term = xd[..., index[:, t]] * weight[:, t]
        else:
            term = xd[..., index[:, t], :] * weight[:, t, None]
        acc = term if acc is None else acc + term
    return acc.float()


def pil_bilinear(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., h, w) float maps -> (..., sh, sw) float32, equal to PIL's BILINEAR resize of each 'F' map."""
    sh, sw = int(size[0]), int(size[1])
    h, w = maps.shape[-2:]
    x = maps.float()
    if math.prod(x.shape) == 0:
        return x.new_zeros(*x.shape[:-2], sh, sw)
    x = _pass(x, w, sw, -1)  # PIL: horizontal first
    return _pass(x, h, sh, -2)
