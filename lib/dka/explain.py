"""Per-image explanations: which units carry a class score, what concept each unit detects, where.

The paper's Fig. 7: the final layer's score decomposes exactly over its inputs,
``y_c = sum_i W[c,i] x_i + b_c`` (dense head) or ``y_c = sum_{i in R_c(x)} W[c,i] x_i + b_c`` with
``R_c(x)`` the K routed inputs (Dynamic-K head). So ``W[c,i] x_i / y_c`` is unit i's share of the
score; for a DKA head a handful of routed units carry all of it, while a dense head spreads it, and
the residual that the top-n units leave unexplained shows the difference. With a dissection tally
every unit comes with a concept and an IoU; its activation map, upsampled onto the image, shows
where the concept was found.

``attribute(model, images, target)`` follows Captum's shape convention: ``contributions`` has the
shape of the head's input (B, units), one row per image for its target class.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dka.atomic import write_text


@dataclass
class Attribution:
    """Unit contributions of a batch of images to their target classes (one target per image).

    All tensors are on the CPU, float32. Units are 0-based here (tally units are 1-based).
    """

    target: Tensor  # (B,) long: the explained class per image
    logits: Tensor  # (B, classes)
    score: Tensor  # (B,) y_c of the target
    bias: Tensor  # (B,) b_c of the target (0 without bias)
    activations: Tensor  # (B, U) pooled x_i
    products: Tensor  # (B, U) W[c, i] * x_i
    contributions: Tensor  # (B, U) W[c, i] * x_i / y_c over all units (the paper's Fig. 7 definition)
    effective: Tensor  # (B, U) contributions of the units the head actually sums (dense: = contributions)
    feature_maps: Tensor  # (B, U, h, w) the unit maps the head pools
    routed: Tensor | None = None  # (B, K) units routed for the target (Dynamic-K head), by product desc.
    routed_contributions: Tensor | None = None  # (B, K) their contributions
    k: int | None = None

    @property
    def dynamic(self) -> bool:
        return self.routed is not None

    def top_units(self, n: int = 5) -> tuple[Tensor, Tensor]:
        """(B, n) units with the largest contributions the head actually uses, and those contributions."""
        n = self._check_n(n)
        values, units = self.effective.topk(n, dim=1)
        return units, values

    def residual(self, n: int = 5) -> Tensor:
        """(B,) share of y_c the top-n units leave unexplained: 1 - sum of their contributions.

        It includes the bias share b_c / y_c; for a Dynamic-K head with n >= K it is exactly that.
        """
        return 1.0 - self.top_units(n)[1].sum(dim=1)

    def heatmaps(self, units: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, n, H, W) maps of the given units (B, n) upsampled bilinearly onto the image, in [0, 1]."""
        maps = self.feature_maps.gather(1, units[:, :, None, None].expand(-1, -1, *self.feature_maps.shape[2:]))
        up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        top = up.flatten(2).amax(dim=2).clamp_min(1e-12)[:, :, None, None]
        return (up / top).clamp(0, 1)

    def _check_n(self, n: int) -> int:
        units = self.effective.shape[1]
        if not 1 <= n <= units:
            raise ValueError(f"n={n} is out of range: choose 1 <= n <= {units} (the head's inputs)")
        return n


def _head_parts(model: nn.Module):
    for name in ("features", "pool", "head"):
        if not hasattr(model, name):
            raise TypeError(
                f"{type(model).__name__} has no `{name}`: attribute() needs a model with features(x), "
                "pool(fmap) and head (a dka.models.DKAResNet, from dka.models.build or dka.checkpoint.load_model)"
            )
    return model.features, model.pool, model.head


@torch.no_grad()
def attribute(model: nn.Module, images: Tensor, target: Tensor | int | Sequence[int] | None = None) -> Attribution:
    """Decompose each image's target-class score over the head's input units.

    ``target``: None (the predicted class), an int (same class for all), or one class per image.
    """
    features, pool, head = _head_parts(model)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = images.to(device)
        fmap = features(x).float()
        pooled = pool(fmap).float()
        logits = head(pooled).float()
    finally:
        model.train(was_training)
    b, n_cls = logits.shape
    if target is None:
        tgt = logits.argmax(dim=1)
    else:
        tgt = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
        if tgt.numel() == 1:
            tgt = tgt.expand(b)
        if tgt.numel() != b:
            raise ValueError(f"target has {tgt.numel()} entries for {b} images; give one per image or one for all")
        if int(tgt.min()) < 0 or int(tgt.max()) >= n_cls:
            raise ValueError(f"target out of range: classes are 0..{n_cls - 1}")
        tgt = tgt.clone()
    weight = head.weight.float()[tgt]  # (B, U)
    bias = head.bias.float()[tgt] if getattr(head, "bias", None) is not None else torch.zeros(b, device=weight.device)
    products = weight * pooled
    score = logits.gather(1, tgt[:, None])[:, 0]
    contributions = products / score[:, None]
    k = getattr(head, "k", None)
    routed = routed_contrib = None
    if k is not None:
        from dka.layers import routed_indices

        all_routed = routed_indices(pooled, head.weight, k)  # (B, classes, K)
        routed = all_routed[torch.arange(b, device=all_routed.device), tgt]  # (B, K)
        order = products.gather(1, routed).argsort(dim=1, descending=True)
        routed = routed.gather(1, order)
        routed_contrib = contributions.gather(1, routed)
        effective = torch.zeros_like(contributions).scatter_(1, routed, routed_contrib)
    else:
        effective = contributions
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    return Attribution(
        target=cpu(tgt), logits=cpu(logits), score=cpu(score), bias=cpu(bias), activations=cpu(pooled),
        products=cpu(products), contributions=cpu(contributions), effective=cpu(effective),
        feature_maps=cpu(fmap), routed=cpu(routed), routed_contributions=cpu(routed_contrib), k=k,
    )


def explanation_table(
    attr: Attribution, tally: pd.DataFrame | None = None, n: int = 5, class_names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Long table: image, class, rank, unit (1-based), contribution, concept, category, IoU, residual."""
    units, values = attr.top_units(n)
    res = attr.residual(n)
    labels = tally.set_index("unit") if tally is not None else None
    rows = []
    for bi in range(units.shape[0]):
        c = int(attr.target[bi])
        for r in range(units.shape[1]):
            u = int(units[bi, r]) + 1
            info = labels.loc[u] if labels is not None and u in labels.index else None
            rows.append({
                "image": bi, "class": c, "class_name": class_names[c] if class_names is not None else str(c),
                "score": float(attr.score[bi]), "rank": r + 1, "unit": u, "contribution": float(values[bi, r]),
                "concept": None if info is None else info["label"],
                "category": None if info is None else info["category"],
                "iou": None if info is None else float(info["score"]), "residual": float(res[bi]),
            })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# HTML report
# --------------------------------------------------------------------------------------------------

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
            lab = tally.set_index("unit") if tally is not None else None
            (units, vals), res = tops[m]
            c = int(attr.target[bi])
            cell = [f"<b>{html.escape(cname(c))}</b> <span class='small'>y={float(attr.score[bi]):.3f}"
                    f"{f', K={attr.k}' if attr.k else ''}</span><br>"]
            for r in range(units.shape[1]):
                u = int(units[bi, r]) + 1
                concept = iou = ""
                if lab is not None and u in lab.index:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dka explain",
        description="Per-image explanations of one or more checkpoints, side by side, as a self-contained HTML report.",
    )
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="model checkpoint (repeat: e.g. the DKA model, then the baseline)")
    parser.add_argument("--tally", action="append", default=[],
                        help="tally.csv per checkpoint, same order (optional; gives each unit its concept)")
    parser.add_argument("--name", action="append", default=[], help="column title per checkpoint")
    parser.add_argument("--dataset", required=True, help="dataset preset for dka.data.build_loaders (e.g. scenes-demo32)")
    parser.add_argument("--data", required=True, help="dataset root")
    parser.add_argument("--count", type=int, default=8, help="images from the test split")
    parser.add_argument("--top", type=int, default=3, help="units shown per image")
    parser.add_argument("--out", required=True, help="report path (.html)")
    args = parser.parse_args(argv)
    if args.tally and len(args.tally) != len(args.checkpoint):
        parser.error(f"give one --tally per --checkpoint ({len(args.checkpoint)}), or none")
    if args.name and len(args.name) != len(args.checkpoint):
        parser.error(f"give one --name per --checkpoint ({len(args.checkpoint)}), or none")
    if args.count < 1:
        parser.error("--count must be >= 1")

    from dka.checkpoint import load_model
    from dka.data import build_loaders
    from dka.dissect import read_tally

    bundle = build_loaders(args.dataset, args.data, batch_size=args.count, workers=0, augment=False)
    images, labels = next(iter(bundle.test))
    explanations = {}
    for i, ckpt in enumerate(args.checkpoint):
        model = load_model(ckpt)
        name = args.name[i] if args.name else getattr(getattr(model, "spec", None), "name", Path(ckpt).stem)
        tally = read_tally(args.tally[i]) if args.tally else None
        explanations[name] = (attribute(model, images), tally)
    text = render_report(images, explanations, bundle.class_names, n=args.top, labels=labels.tolist())
    print(write_report(text, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
