"""Places365 (standard, 256 px "small" images): the easy-format folders or torchvision's layout.

Class indices always follow the official `categories_places365.txt` (shipped in dka/data/resources), so a
model trained on the easy format and one trained on torchvision's layout agree on what output 17 means.
Train: random resized crop 224 + flip; val: resize 256 + centre crop 224 (the authors' recipe).
"""

from __future__ import annotations

import os
import re
import warnings
from importlib import resources
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from dka.data.images import IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, load_rgb

__all__ = ["datasets", "categories", "ImageFiles", "transforms", "find_layout", "easy_samples", "how_to_get",
           "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def categories() -> list[str]:
    """The 365 official category names ('/a/airfield', ...), in index order."""
    text = resources.files("dka.data").joinpath("resources/categories_places365.txt").read_text()
    rows = [line.split() for line in text.splitlines() if line.strip()]
    names = [None] * len(rows)
    for name, index in rows:
        names[int(index)] = name
    return names


def _key(name: str) -> str:
    """A category spelling that the folder names of every layout map to: 'apartment_building_outdoor'."""
    name = re.sub(r"^/?[a-z]/", "", name.strip().lower())
    return re.sub(r"[/\- ]+", "_", name)


def how_to_get(root: Path) -> str:
    return (f"get it with `python -m dka data download places365 --root {root}` (torchvision layout) or "
            f"`... --format easy` (places365_standard/train/<class>/, val/<class>/)")


def find_layout(root: Path) -> tuple[str, Path]:
    root = Path(root).expanduser()
    for base in (root, root / "places365_standard"):
        if (base / "train").is_dir() and (base / "val").is_dir():
            return "easy", base
    if (root / "places365_train_standard.txt").is_file() and (root / "categories_places365.txt").is_file():
        return "torchvision", root
    if not root.exists():
        raise FileNotFoundError(f"Places365 root {root} does not exist; {how_to_get(root)}")
    raise FileNotFoundError(f"no Places365 found in {root}: expected train/<class>/ and val/<class>/ folders "
                            f"(easy format) or torchvision's places365_train_standard.txt; {how_to_get(root)}")


def easy_samples(split_dir: Path) -> list[tuple[str, int]]:
    index = {_key(n): i for i, n in enumerate(categories())}
    samples = []
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise FileNotFoundError(f"{split_dir} has no class folders (expected {split_dir}/<class>/*.jpg)")
    for d in class_dirs:
        # nested layouts (a/apartment_building/outdoor/...) are flattened into one class per leaf folder
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            files = sorted(f for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                continue
            rel = os.path.relpath(dirpath, split_dir)
            key = _key(rel)  # 'a/airfield', 'airfield', 'apartment_building-outdoor' all map to the index
            if key not in index:
                raise ValueError(f"folder {dirpath} is not a Places365 category (see categories_places365.txt)")
            samples += [(os.path.join(dirpath, f), index[key]) for f in files]
    return samples


class ImageFiles(Dataset):
    """(path, label) samples decoded with PIL on access; corrupt files raise, or are dropped by `collate`
    when `skip_corrupt` (each drop is warned with the file name)."""

    def __init__(self, samples: list[tuple[str, int]], transform, skip_corrupt: bool = False):
        self.samples = samples
        self.transform = transform
        self.skip_corrupt = skip_corrupt

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        try:
            image = Image.fromarray(load_rgb(path))
        except CorruptImageError as err:
            if not self.skip_corrupt:
                raise
            warnings.warn(f"skipped: {err}", RuntimeWarning, stacklevel=2)
            return None
        return self.transform(image), torch.tensor(label, dtype=torch.long)

    @staticmethod
    def collate(batch):
        kept = [b for b in batch if b is not None]
        if not kept:
            return torch.zeros(0, 3, 224, 224), torch.zeros(0, dtype=torch.long)
        return default_collate(kept)


def transforms(train: bool, augment: bool = True):
    from dka._compat import torchvision

    T = torchvision.transforms
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train and augment:
        return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize(256), T.CenterCrop(224), *norm])


def datasets(root: str | Path, augment: bool = True, skip_corrupt: bool = False):
    """(train, val, class names) of Places365-standard."""
    layout, base = find_layout(Path(root))
    names = categories()
    if layout == "easy":
        train = easy_samples(base / "train")
        val = easy_samples(base / "val")
    else:
        from dka._compat import torchvision

        train = torchvision.datasets.Places365(str(base), split="train-standard", small=True, download=False).imgs
        val = torchvision.datasets.Places365(str(base), split="val", small=True, download=False).imgs
    return (ImageFiles(train, transforms(True, augment), skip_corrupt),
            ImageFiles(val, transforms(False), skip_corrupt), names)
