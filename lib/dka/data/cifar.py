"""CIFAR-10 in either of its two forms: torchvision's pickled batches or the image-folder form.

The image-folder form (`train/<class>/*.jpg`, `test/<class>/*.jpg`, what ../shared/data/cifar10-jpg.tar.gz
unpacks to) is decoded once and cached as uint8 next to the data. Both forms are served from memory with
the paper's augmentation: random crop 32 with padding 4 and horizontal flip.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from dka.data.images import InMemoryImages, cached_decode

__all__ = ["datasets", "load_split", "read_batches", "detect_format", "folder_samples", "how_to_get", "CLASSES", "MEAN", "STD",
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


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays only: a CIFAR batch needs nothing else, and a file
    that asks for any other global is refused instead of run."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays")
        return super().find_class(module, name)


def _load_batch(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch {path} is missing; {how_to_get(path.parent.parent)}")
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise FileNotFoundError(f"CIFAR-10 batch {path} is unreadable ({err}); {how_to_get(path.parent.parent)}") from err
    if not isinstance(entry, dict):
        raise FileNotFoundError(f"CIFAR-10 batch {path} holds a {type(entry).__name__}, not a batch dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def read_batches(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images (N, 32, 32, 3), labels, class names) from torchvision's `cifar-10-batches-py` folder.

    Read directly (the documented pickled-batch format) rather than through torchvision's dataset, whose
    md5 check accepts only the published files: `dka data download cifar10` verifies the archive instead,
    and here every batch is checked for shape and label range.
    """
    folder = Path(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _load_batch(folder / "batches.meta")["label_names"]]
    images, labels = [], []
    for name in names:
        entry = _load_batch(folder / name)
        data = np.asarray(entry.get("data"), np.uint8)
        target = np.asarray(entry.get("labels", entry.get("fine_labels")), np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(target) != len(data):
            raise FileNotFoundError(f"CIFAR-10 batch {folder / name} has data {data.shape} and {len(target)} labels; "
                                    f"expected (N, 3072) and N; {how_to_get(folder.parent)}")
        if len(target) and not 0 <= target.min() <= target.max() < len(classes):
            raise FileNotFoundError(f"CIFAR-10 batch {folder / name} has labels outside 0..{len(classes) - 1}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(target)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes


def load_split(root: str | Path, split: str,
               skip_corrupt: bool = False) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(uint8 images (N, 32, 32, 3), labels, class names, skipped files) of split 'train' or 'test'."""
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    fmt = detect_format(root)
    if fmt == "torchvision":
        base = root if root.name == "cifar-10-batches-py" else root / "cifar-10-batches-py"
        return (*read_batches(base, split), [])  # batches hold arrays: nothing to skip
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
