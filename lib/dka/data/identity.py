"""Which data a run trains on: a cheap identity of a dataset, stored in checkpoints and compared on resume.

A run's configuration fingerprint leaves the data root out (a dataset may move), so without this a resume
pointed at another export of the same dataset name would train its remaining epochs on other images and
exit 0. The identity holds the class names, the split sizes and a content digest: of the decoded pixels
and labels for in-memory datasets (CIFAR-10, concept scenes: ~0.1 s for CIFAR-10's 150 MB), of the file
names and labels for datasets read from files (Places365). Re-decoding or moving the same data keeps it.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePath
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, TensorDataset

from dka.data.images import InMemoryImages
from dka.data.places import ImageFiles

__all__ = ["dataset_identity", "identity_differences", "content_digest"]

# Compared on resume; `root` is stored for the message only (the same data may sit elsewhere).
_COMPARED = ("num_classes", "class_names", "train_size", "test_size", "train_digest", "test_digest")


def _update(digest, array) -> None:
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))


def content_digest(dataset) -> str | None:
    """A digest of what `dataset` serves (pixels and labels, or file names and labels); None if unknown."""
    digest = hashlib.sha256()
    if isinstance(dataset, InMemoryImages):
        _update(digest, dataset.images.numpy())
        _update(digest, dataset.labels.numpy())
    elif isinstance(dataset, TensorDataset):
        for tensor in dataset.tensors:
            _update(digest, tensor.detach().cpu().numpy())
    elif isinstance(dataset, ImageFiles):
        # class folder and file name, not the absolute path: the dataset may be moved between resumes
        for path, label in dataset.samples:
            digest.update(f"{'/'.join(PurePath(path).parts[-2:])}\0{int(label)}\n".encode())
    else:
        return None
    return digest.hexdigest()[:16]


def _dataset(obj):
    return obj.dataset if isinstance(obj, DataLoader) else obj


def dataset_identity(bundle, root: str | None = None) -> dict[str, Any]:
    """The identity of a `dka.data.DataBundle` (or a compatible object with train, test, num_classes)."""
    train, test = _dataset(bundle.train), _dataset(bundle.test)
    names = getattr(bundle, "class_names", None)
    return {
        "num_classes": int(bundle.num_classes),
        "class_names": None if names is None else [str(n) for n in names],
        "train_size": len(train), "test_size": len(test),
        "train_digest": content_digest(train), "test_digest": content_digest(test),
        "root": None if root is None else str(root),
    }


def _short(value) -> str:
    if isinstance(value, list) and len(value) > 6:
        return f"[{', '.join(map(str, value[:3]))}, ... {len(value)} names]"
    return str(value)


def identity_differences(stored: dict, current: dict) -> list[str]:
    """What differs between two identities, one "field: stored -> now" line each (unknown digests pass)."""
    out = []
    for key in _COMPARED:
        a, b = stored.get(key), current.get(key)
        if key.endswith("digest") and (a is None or b is None):
            continue
        if a != b:
            out.append(f"{key}: {_short(a)} (stored) vs {_short(b)} (now)")
    return out

