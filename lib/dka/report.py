"""The self-contained HTML report of per-image explanations (PNGs embedded as base64).

Presentation only: it draws `dka.attribution.Attribution` records next to their dissection concepts.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from torch import Tensor

from dka.atomic import write_text
from dka.attribution import Attribution
from dka.dissection import unit_labels

__all__ = ["render_report", "write_report", "overlay"]


def _display_image(img: Tensor) -> np.ndarray:
    """(3, H, W) normalised tensor -> uint8 (H, W, 3), min-max stretched (the normalisation is unknown here)."""
    a = img.detach().float().cpu().permute(1, 2, 0).numpy()
    lo, hi = a.min(), a.max()
    return (255 * (a - lo) / max(hi - lo, 1e-8)).astype(np.uint8)


def _png_base64(rgb: np.ndarray, scale: int = 1) -> str:
    from PIL import Image

    im = Image.fromarray(rgb)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def overlay(image_rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Heatmap (H, W) in [0, 1] blended over an RGB uint8 image with the 'jet' colormap."""
    from matplotlib import colormaps

    colour = colormaps["jet"](heat)[..., :3] * 255
    return (image_rgb * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)


def render_report(
    images: Tensor,
    explanations: Mapping[str, tuple[Attribution, pd.DataFrame | None]],
    class_names: Sequence[str] | None = None,
    n: int = 3,
    labels: Sequence[int] | None = None,
    title: str = "Dynamic-K activation: per-image explanations",
    scale: int = 3,
) -> str:
    """A self-contained HTML page (PNGs embedded as base64): per image, one column per model."""
    names = list(explanations)
    style = (
        "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:13px}"
        ".unit{display:inline-block;margin:2px;text-align:center;width:%dpx}.small{color:#555}" % (images.shape[-1] * scale + 8)
    )
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>",
           "<p>Contribution of unit i to class c = W[c,i]·x<sub>i</sub> / y<sub>c</sub> "
           "(x<sub>i</sub>: the unit's pooled activation). Heatmaps: the unit's map upsampled onto the "
           "image. Residual: the share of y<sub>c</sub> the listed units leave unexplained (bias included).</p>",
           "<table><tr><th>image</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in names) + "</tr>"]
    size = tuple(images.shape[-2:])
    cname = (lambda c: class_names[c]) if class_names is not None else str  # noqa: E731
    tops = {m: (a.top_units(n), a.residual(n)) for m, (a, _) in explanations.items()}
    heats = {m: explanations[m][0].heatmaps(tops[m][0][0], size) for m in names}
    for bi in range(images.shape[0]):
        rgb = _display_image(images[bi])
        cap = f"<br><span class='small'>true: {html.escape(cname(int(labels[bi])))}</span>" if labels is not None else ""
        out.append(f"<tr><td><img src='{_png_base64(rgb, scale)}'>{cap}</td>")
        for m in names:
            attr, tally = explanations[m]
            lab = unit_labels(tally, attr.contributions.shape[1]) if tally is not None else None
            (units, vals), res = tops[m]
            c = int(attr.target[bi])
            cell = [f"<b>{html.escape(cname(c))}</b> <span class='small'>y={float(attr.score[bi]):.3f}"
                    f"{f', K={attr.k}' if attr.k else ''}</span><br>"]
            for r in range(units.shape[1]):
                u = int(units[bi, r]) + 1
                concept = iou = ""
                if lab is not None and isinstance(lab.loc[u, "label"], str):
                    concept = str(lab.loc[u, "label"])
                    iou = f"IoU {float(lab.loc[u, 'score']):.2f}"
                img = overlay(rgb, heats[m][bi, r].numpy())
                cell.append(
                    f"<div class='unit'><img src='{_png_base64(img, scale)}'><br>unit {u}: "
                    f"{100 * float(vals[bi, r]):.1f}%<br>{html.escape(concept)}<br><span class='small'>{iou}</span></div>"
                )
            cell.append(f"<br><span class='small'>residual {100 * float(res[bi]):.1f}%</span>")
            out.append("<td>" + "".join(cell) + "</td>")
        out.append("</tr>")
    out.append("</table></body></html>")
    return "\n".join(out)


def write_report(html_text: str, path: str | Path) -> Path:
    """Write the report atomically."""
    return write_text(path, html_text)
