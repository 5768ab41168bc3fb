"""Ground-truth scores of explanations, on the concept scenes (what no real dataset can give).

Every concept-scenes image comes with the pixels of every concept in it and its class is a known set of
concepts, so an explanation of the class can be checked against where the class's concepts really are:

- `ConceptTruth`: a scenes export's split as (image, class, mask of the class's true concepts). A scene
  concept (an image-level background label) marks the background pixels, those no element covers.
- `localisation_share(maps, masks)`: the share of the positive attribution that falls inside the mask.
- `pointing_game(maps, masks)`: whether the attribution's peak falls inside the mask.

All functions take attribution maps at image resolution, e.g. `Attribution.pixel_map(size)`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dka.data.broden import BrodenDataset

__all__ = ["ConceptTruth", "localisation_share", "pointing_game"]


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
        mask = torch.zeros(seg.shape[1:], dtype=torch.bool)
        for one in self.concept_masks(seg, image_labels, label).values():
            mask |= one
        return mask

    def concept_masks(self, seg: Tensor, image_labels: Tensor, label: int) -> dict[int, Tensor]:
        """Concept label number -> (H, W) bool pixels of that one true concept of the class, for the class's
        concepts present in the image (a scene concept: the background pixels)."""
        present = set(image_labels.tolist())
        out = {}
        for number in sorted(self.class_labels[label]):
            if number in self.scene_labels:
                if number in present:
                    out[number] = (seg == 0).all(0)
            else:
                out[number] = (seg == number).any(0)
        return out

    def __getitem__(self, j: int) -> dict:
        index, label = self.items[j]
        item = self.broden[index]
        return {"image": item["image"], "label": label, "mask": self.mask(item["seg"], item["image_labels"], label),
                "index": j}

    @staticmethod
    def collate(batch: list[dict]) -> dict:
        return {"image": torch.stack([b["image"] for b in batch]),
                "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
                "mask": torch.stack([b["mask"] for b in batch]),
                "index": torch.tensor([b["index"] for b in batch], dtype=torch.long)}

