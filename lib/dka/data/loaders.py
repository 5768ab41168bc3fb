"""`build_loaders`: one call from a dataset name to train/test DataLoaders and what a model needs to know."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dka.data import cifar, places, scenes
from dka.data.images import IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, InMemoryImages, cached_decode, pass_batch

__all__ = ["build_loaders", "DataBundle", "DATASETS", "RECOMMENDED_STEMS", "scenes_datasets", "ensure_scenes",
           "check_dataset", "class_names"]

DATASETS = ("cifar10", "places365", "scenes-smoke", "scenes-demo32", "scenes-demo64")
# The model stem each dataset is meant for (dka.models.STEMS): stride 1 for 24-32 px, 3x3 stride 2 for the
# 64 px scenes (4x4 final maps at a quarter of the cost), ImageNet's for 224 px Places365.
RECOMMENDED_STEMS = {"cifar10": "cifar", "places365": "imagenet", "scenes-smoke": "cifar", "scenes-demo32": "cifar",
         "scenes-demo64": "imagenet-small"}


@dataclass
class DataBundle:
    """Train and test loaders yielding (normalised float images (B, 3, H, W), long labels)."""

    train: DataLoader
    test: DataLoader
    num_classes: int
    class_names: list[str]
    image_size: tuple[int, int]
    stem: str


def scenes_datasets(root: str | Path, augment: bool = True, skip_corrupt: bool = False):
    """(train, test, class names) of a concept-scenes export, decoded once and cached as uint8.

    The export is checked against its manifest first (every file's size, cheap); a damaged one is refused
    with the command that writes it again, since it is generated data and never needs downloading."""
    root = Path(root)
    size = int(scenes.require_intact(root)["preset"]["size"])
    with open(root / "classes.csv", newline="") as f:
        class_names = [r["name"] for r in csv.DictReader(f)]
    with open(root / "image_classes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for split in scenes.SPLITS:
        mine = [r for r in rows if r["split"] == split]
        paths = [root / "images" / r["image"] for r in mine]
        try:
            images, labels, skipped = cached_decode(root, f"scenes-{split}", paths, [int(r["class"]) for r in mine],
                                                    skip_corrupt=skip_corrupt, expected_hw=(size, size))
        except CorruptImageError as err:  # sizes matched, so bytes changed in place: the hashes name the files
            scenes.require_intact(root, full=True, cause=f"an image does not decode ({err.__cause__ or err})")
            raise
        out.append(InMemoryImages(images, labels, IMAGENET_MEAN, IMAGENET_STD, augment=augment and split == "train",
                                  pad=max(2, size // 8), skipped=skipped))
    return out[0], out[1], class_names


def ensure_scenes(name: str, root: str | Path) -> Path:
    """The export of preset `name` at `root`, generated (seed 0) when `root` holds none, written again
    when it is damaged (`dka.data.scenes.generate`)."""
    preset = scenes.preset_by_name(name)
    root = Path(root).expanduser()
    seed = 0
    if scenes.is_export(root):
        stored = scenes.read_params(root)  # unreadable: refused, as the seed it was written with is unknown
        if stored["preset"]["name"] != preset.name:
            raise ValueError(f"{root} holds the concept-scenes preset {stored['preset']['name']!r}, not "
                             f"{preset.name!r}; use another root for {name}")
        seed = int(stored["seed"])  # keep a seed chosen with `python -m dka data scenes --seed`
    return scenes.generate(preset, root, seed=seed)


def check_dataset(name: str, root: str | Path | None) -> None:
    """Fail fast, before any file is read or written, on an unknown name or a missing real dataset.

    Concept scenes are generated at `root` when absent, so only their name and a root are needed."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if root is None or str(root) == "":
        where = "it is generated there when missing" if name.startswith("scenes-") else "where the dataset lies"
        raise ValueError(f"dataset {name!r} needs its directory: pass --data-root DIR ({where})")
    if name == "cifar10":
        cifar.detect_format(Path(root).expanduser())
    elif name == "places365":
        places.find_layout(Path(root))


def class_names(name: str, root: str | Path) -> list[str] | None:
    """The class names of dataset `name` at `root` without decoding it; None for scenes not generated yet."""
    check_dataset(name, root)
    root = Path(root).expanduser()
    if name.startswith("scenes-"):
        if not scenes.is_export(root):
            return None
        with open(root / "classes.csv", newline="") as f:
            return [r["name"] for r in csv.DictReader(f)]
    if name == "places365":
        return places.categories()
    if cifar.detect_format(root) == "folder":
        return cifar.folder_samples(root / "train")[2]
    return list(cifar.CLASSES)


def _loader(dataset, batch_size: int, train: bool, workers: int, device: str, seed: int, collate) -> DataLoader:
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=workers, collate_fn=collate,
                      pin_memory=str(device).startswith("cuda"), persistent_workers=workers > 0,
                      generator=generator, drop_last=False)


def build_loaders(name: str, root: str | Path, batch_size: int, workers: int = 2, device: str = "cpu",
                  augment: bool = True, seed: int = 0, skip_corrupt: bool = False) -> DataBundle:
    """Loaders of dataset `name` (one of DATASETS) stored at `root`.

    Scene presets are generated at `root` when it holds none. `seed` fixes the shuffling and the
    augmentation draws; `skip_corrupt` skips undecodable images with a warning instead of failing."""
    check_dataset(name, root)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if name.startswith("scenes-"):
        train, test, class_names = scenes_datasets(ensure_scenes(name, root), augment, skip_corrupt)
        collate = pass_batch
    elif name == "cifar10":
        train, test, class_names = cifar.datasets(root, augment, skip_corrupt)
        collate = pass_batch
    else:
        train, test, class_names = places.datasets(root, augment, skip_corrupt)
        collate = places.ImageFiles.collate
    if isinstance(train, InMemoryImages):
        image_size = tuple(train.images.shape[1:3])
    else:
        image_size = (224, 224)
    return DataBundle(
        train=_loader(train, batch_size, True, workers, device, seed, collate),
        test=_loader(test, batch_size, False, workers, device, seed, collate),
        num_classes=len(class_names), class_names=list(class_names), image_size=image_size, stem=RECOMMENDED_STEMS[name])
