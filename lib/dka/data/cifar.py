"""CIFAR-10 in either of its two forms: torchvision's pickled batches or the image-folder form.

The image-folder form (`train/<class>/*.jpg`, `test/<class>/*.jpg`, what ../shared/data/cifar10-jpg.tar.gz
unpacks to) is decoded once and cached as uint8 next to the data. Both forms are served from memory with
the paper's augmentation: random crop 32 with padding 4 and horizontal flip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dka.data.images import InMemoryImages, cached_decode

__all__ = ["datasets", "load_split", "detect_format", "folder_samples", "how_to_get", "CLASSES", "MEAN", "STD",
           "IMAGE_EXTENSIONS"]

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


def how_to_get(root: Path) -> str:
    return (f"get it with `python -m dka data download cifar10 --root {root}` (torchvision format), or unpack "
            f"the JPEG copy there: `tar xzf cifar10-jpg.tar.gz -C {root}` (gives {root}/train/<class>/*.jpg)")


def detect_format(root: Path) -> str:
    """'torchvision' (cifar-10-batches-py), 'folder' (train/ and test/ of class folders); else an error."""
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir() or (root.name == "cifar-10-batches-py" and root.is_dir()):
        return "torchvision"
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folder"
    if not root.exists():
        raise FileNotFoundError(f"CIFAR-10 root {root} does not exist; {how_to_get(root)}")
    raise FileNotFoundError(f"no CIFAR-10 found in {root}: expected {root}/cifar-10-batches-py or the folders "
                            f"{root}/train/<class>/ and {root}/test/<class>/; {how_to_get(root)}")


def folder_samples(split_dir: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files and labels of an image-folder split; classes are the sorted sub-folder names."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{split_dir} has no class folders (expected {split_dir}/<class>/*.jpg)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise FileNotFoundError(f"{split_dir} holds class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, np.asarray(labels, np.int64), classes


def load_split(root: str | Path, split: str,
               skip_corrupt: bool = False) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(uint8 images (N, 32, 32, 3), labels, class names, skipped files) of split 'train' or 'test'."""
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    fmt = detect_format(root)
    if fmt == "torchvision":
        from dka._compat import torchvision

        base = root.parent if root.name == "cifar-10-batches-py" else root
        try:
            ds = torchvision.datasets.CIFAR10(str(base), train=split == "train", download=False)
        except RuntimeError as err:  # torchvision's integrity check failed
            raise FileNotFoundError(f"CIFAR-10 at {base} is incomplete or corrupt ({err}); {how_to_get(base)}") from err
        return np.asarray(ds.data, np.uint8), np.asarray(ds.targets, np.int64), list(ds.classes), []
    paths, labels, classes = folder_samples(root / split)
    images, labels, skipped = cached_decode(root, f"cifar10-{split}", paths, labels, skip_corrupt=skip_corrupt)
    return images, labels, classes, skipped


def datasets(root: str | Path, augment: bool = True, skip_corrupt: bool = False):
    """(train, test, class names) as InMemoryImages with CIFAR-10 normalisation."""
    train_x, train_y, classes, train_skipped = load_split(root, "train", skip_corrupt)
    test_x, test_y, test_classes, test_skipped = load_split(root, "test", skip_corrupt)
    if test_classes != classes:
        raise ValueError(f"train and test class folders differ in {root}: {classes} vs {test_classes}")
    train = InMemoryImages(train_x, train_y, MEAN, STD, augment=augment, pad=4, skipped=train_skipped)
    test = InMemoryImages(test_x, test_y, MEAN, STD, augment=False, skipped=test_skipped)
    return train, test, classes
