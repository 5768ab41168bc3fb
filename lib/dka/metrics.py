"""Ground-truth scores of explanations, on the concept scenes (what no real dataset can give).

Every concept-scenes image comes with the pixels of every concept in it and its class is a known set of
concepts, so an explanation of the class can be checked against where the class's concepts really are:

- `ConceptTruth`: a scenes export's split as (image, class, mask of the class's true concepts). A scene
  concept (an image-level background label) marks the background pixels, those no element covers.
- `localisation_share(maps, masks)`: the share of the positive attribution that falls inside the mask.
- `pointing_game(maps, masks)`: whether the attribution's peak falls inside the mask.
- `deletion_curve` / `deletion_auc`: faithfulness — delete the most-attributed pixels first and watch the
  class probability fall (a small area is better).
- `score_explanations`: all of these over a whole test split, for any method's explanation function.

All functions take attribution maps at image resolution, e.g. `Attribution.pixel_map(size)`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dka.data.broden import BrodenDataset

__all__ = ["ConceptTruth", "localisation_share", "pointing_game", "deletion_curve", "deletion_auc",
           "score_explanations", "DELETION_FRACTIONS"]

DELETION_FRACTIONS = tuple(i / 10 for i in range(11))


def _check_pair(maps: Tensor, masks: Tensor) -> None:
    if maps.dim() != 3 or masks.shape != maps.shape:
        raise ValueError(f"maps and masks must both be (B, H, W) of one shape; got {tuple(maps.shape)} and "
                         f"{tuple(masks.shape)} (resize maps with Attribution.pixel_map(mask size))")


def localisation_share(maps: Tensor, masks: Tensor) -> Tensor:
    """(B,) share of each map's positive mass inside its mask; NaN where a map has no positive mass."""
    _check_pair(maps, masks)
    positive = maps.float().clamp_min(0).flatten(1)
    total = positive.sum(1)
    inside = (positive * masks.flatten(1).float()).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.full_like(total, float("nan")))


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """(B,) bool: the map's maximum lies inside the mask (first maximum in raster order on ties)."""
    _check_pair(maps, masks)
    peak = maps.float().flatten(1).argmax(1)
    return masks.flatten(1).gather(1, peak[:, None])[:, 0].bool()


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: ConceptTruth needs a concept-scenes export "
                                "(dka.data.scenes.generate(preset, DIR) writes one)")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class ConceptTruth(Dataset):
    """The images of one split of a concept-scenes export with the mask of their class's true concepts.

    `truth[j]` -> dict(image=(3, H, W) normalised as the training loaders normalise it, label=class index,
    mask=(H, W) bool, index=j). Images equal (to float rounding) those `dka.data.build_loaders` gives.
    """

    def __init__(self, root: str | Path, split: str = "test"):
        root = Path(root)
        self.root = root
        self.broden = BrodenDataset(root)
        classes = _read_rows(root / "classes.csv")
        self.class_names = [r["name"] for r in classes]
        by_name = {name: i for i, name in enumerate(self.class_names)}
        numbers = {r["name"]: int(r["number"]) for r in _read_rows(root / "label.csv")}
        self.class_labels: list[set[int]] = [set() for _ in classes]
        self.scene_labels = {int(r["number"]) for r in _read_rows(root / "label.csv")
                             if r["category"].startswith("scene")}
        for r in _read_rows(root / "class_concepts.csv"):
            self.class_labels[by_name[r["class"]]].add(numbers[r["concept"]])
        image_class = {r["image"]: int(r["class"]) for r in _read_rows(root / "image_classes.csv")
                       if r["split"] == split}
        if not image_class:
            raise ValueError(f"{root / 'image_classes.csv'} lists no image of split {split!r}")
        self.items = [(i, image_class[name]) for i, name in enumerate(self.broden.image_names) if name in image_class]
        self.split = split

    def __len__(self) -> int:
        return len(self.items)

    def mask(self, seg: Tensor, image_labels: Tensor, label: int) -> Tensor:
        """(H, W) bool: pixels of the class's true concepts (background pixels for a scene concept)."""
        wanted = self.class_labels[label]
        pixel_wanted = torch.tensor(sorted(wanted - self.scene_labels), dtype=seg.dtype)
        mask = torch.isin(seg, pixel_wanted).any(0) if len(pixel_wanted) else torch.zeros(seg.shape[1:], dtype=torch.bool)
        if wanted & self.scene_labels & set(image_labels.tolist()):
            mask |= (seg == 0).all(0)
        return mask

    def masks(self, batch: dict, classes: Tensor) -> Tensor:
        """(B, H, W) bool: for each image of a collated batch, the pixels of `classes[b]`'s true concepts
        (e.g. the predicted class instead of the true one)."""
        return torch.stack([self.mask(batch["seg"][b], batch["image_labels"][b], int(classes[b]))
                            for b in range(len(classes))])

    def __getitem__(self, j: int) -> dict:
        index, label = self.items[j]
        item = self.broden[index]
        return {"image": item["image"], "label": label, "mask": self.mask(item["seg"], item["image_labels"], label),
                "seg": item["seg"], "image_labels": item["image_labels"], "index": j}

    @staticmethod
    def collate(batch: list[dict]) -> dict:
        """Stack a batch; label layers and image-level labels are padded with 0 (= no label)."""
        padded = BrodenDataset.collate([{"image": b["image"], "seg": b["seg"], "image_labels": b["image_labels"],
                                         "index": b["index"]} for b in batch])
        return {**padded, "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
                "mask": torch.stack([b["mask"] for b in batch])}


@torch.no_grad()
def deletion_curve(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor,
                   fractions: Sequence[float] = DELETION_FRACTIONS) -> Tensor:
    """(B, F) the target's softmax probability as the most-attributed pixels are deleted first.

    Pixels are deleted by setting them to 0 in normalised space (the dataset's mean colour), in
    decreasing order of the attribution map (B, H, W), ties in raster order. A faithful explanation makes
    the probability fall fast, so a small area under the curve (`deletion_auc`) is better.
    """
    b, _, h, w = images.shape
    if maps.shape != (b, h, w):
        raise ValueError(f"maps must be (B, H, W) = {(b, h, w)} at image resolution; got {tuple(maps.shape)} "
                         "(use Attribution.pixel_map((H, W)))")
    device = next(model.parameters()).device
    order = maps.float().flatten(1).argsort(dim=1, descending=True, stable=True)
    curve = torch.empty(b, len(fractions))
    for j, f in enumerate(fractions):
        keep = torch.ones(b, h * w, dtype=images.dtype)
        n = int(round(float(f) * h * w))
        if n:
            keep.scatter_(1, order[:, :n], 0.0)
        x = (images * keep.view(b, 1, h, w)).to(device)
        probs = torch.softmax(model(x).float(), dim=1)
        curve[:, j] = probs.gather(1, targets.to(device)[:, None])[:, 0].cpu()
    return curve


def deletion_auc(curve: Tensor, fractions: Sequence[float] = DELETION_FRACTIONS) -> Tensor:
    """(B,) area under each deletion curve over the deleted fraction (trapezoid rule)."""
    x = torch.as_tensor(list(fractions), dtype=torch.float64)
    y = curve.double()
    return ((y[:, 1:] + y[:, :-1]) / 2 * (x[1:] - x[:-1])).sum(1)


def score_explanations(model: nn.Module, truth: ConceptTruth, explain: Callable[[nn.Module, Tensor, Tensor], Tensor],
                       batch_size: int = 64, fractions: Sequence[float] = DELETION_FRACTIONS,
                       progress: bool = True) -> dict[str, np.ndarray]:
    """Score one method's explanations over the whole split of `truth`, image by image.

    Args:
        model: the trained model (put on its device by the caller; used in eval mode).
        truth: the split with its concept masks.
        explain: ``explain(model, images, classes) -> (B, H, W)`` attribution maps at image resolution for
            the given classes (the model's own explanation, or a post-hoc method's).

    Returns:
        Per image: ``label``, ``predicted``, ``localisation`` (share of the predicted class's positive
        attribution inside that class's true concepts), ``pointing`` (its peak inside them) and
        ``deletion_auc``.
    """
    from dka.progress import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(truth, batch_size=batch_size, shuffle=False, collate_fn=ConceptTruth.collate)
    out: dict[str, list] = {k: [] for k in ("label", "predicted", "localisation", "pointing", "deletion_auc")}
    try:
        for batch in tqdm(loader, desc="explanations", leave=False, disable=not progress):
            images = batch["image"]
            with torch.no_grad():
                predicted = model(images.to(device)).float().argmax(1).cpu()
            maps = explain(model, images, predicted).float().cpu()
            masks = truth.masks(batch, predicted)
            out["label"].append(batch["label"])
            out["predicted"].append(predicted)
            out["localisation"].append(localisation_share(maps, masks))
            out["pointing"].append(pointing_game(maps, masks))
            out["deletion_auc"].append(deletion_auc(deletion_curve(model, images, maps, predicted, fractions),
                                                    fractions))
    finally:
        model.train(was_training)
    return {k: torch.cat(v).numpy() for k, v in out.items()}
