"""Decoding image files once, and serving them from memory with batched augmentation.

Small-image datasets (CIFAR-10's image-folder form, concept scenes) are decoded once into a uint8 array
that is cached next to the data, so the demo's many training runs never re-decode a JPEG. Batches are
cropped, flipped and normalised as whole tensors (`__getitems__`), which costs far less than per-image
PIL transforms on 2 cores.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dka.atomic import atomic_write

__all__ = ["InMemoryImages", "CorruptImageError", "load_rgb", "decode_files", "cached_decode", "pass_batch",
           "IMAGENET_MEAN", "IMAGENET_STD", "CACHE_DIR", "SKIP_HINT"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_DIR = ".dka_cache"
SKIP_HINT = ("--skip-corrupt (python -m dka train / explain; it may be added when resuming a run) or "
             "skip_corrupt=True (dka.data.build_loaders)")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


class CorruptImageError(ValueError):
    """An image or segmentation file that cannot be decoded (truncated, not an image, wrong size)."""


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 RGB (H, W, 3); a CorruptImageError that names the file otherwise."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as err:
        raise CorruptImageError(f"cannot decode image {path}: {err}. Re-extract or re-download the dataset, or "
                                f"skip and count such files: {SKIP_HINT}") from err


def decode_files(paths: list[Path], expected_hw: tuple[int, int] | None = None, skip_corrupt: bool = False,
                 desc: str = "decoding images") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode `paths` into one uint8 array (N, H, W, 3). Returns (images, kept positions, skipped files)."""
    from dka.progress import tqdm

    images, kept, skipped = [], [], []
    for i, path in enumerate(tqdm(paths, desc=desc, unit="img", disable=len(paths) < 2000, mininterval=1)):
        try:
            img = load_rgb(path)
            if expected_hw is None:
                expected_hw = img.shape[:2]
            if img.shape[:2] != tuple(expected_hw):
                raise CorruptImageError(f"image {path} is {img.shape[1]}x{img.shape[0]} px but the dataset's images "
                                        f"are {expected_hw[1]}x{expected_hw[0]}")
        except CorruptImageError as err:
            if not skip_corrupt:
                raise
            skipped.append(str(path))
            warnings.warn(f"skipped: {err}", RuntimeWarning, stacklevel=2)
            continue
        images.append(img)
        kept.append(i)
    _warn_skipped(skipped, len(paths), "")
    if not images:
        raise CorruptImageError(f"no decodable image among {len(paths)} files (first: {paths[0] if paths else None})")
    return np.stack(images), np.asarray(kept, np.int64), skipped


def _files_key(root: Path, paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        st = p.stat()
        digest.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _warn_skipped(skipped: list[str], total: int, source: str) -> None:
    if skipped:
        listed = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        warnings.warn(f"skipped {len(skipped)} corrupt image(s) of {total}{source}: {listed}", RuntimeWarning,
                      stacklevel=3)


def cached_decode(root: Path, name: str, paths: list[Path], labels: np.ndarray, skip_corrupt: bool = False,
                  expected_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decoded images, labels and skipped files of `paths`, from `root/.dka_cache/<name>-<key>.npz` when current.

    The key hashes the file names, sizes and modification times, so a changed dataset is decoded again.
    The skipped files (`skip_corrupt`) are stored with the images, so a reused cache warns about them
    as the first decode did. Written atomically; a read-only root just keeps the result in memory."""
    root = Path(root)
    key = _files_key(root, paths)
    cache = root / CACHE_DIR / f"{name}-{key}{'-skip' if skip_corrupt else ''}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                skipped = [str(p) for p in z["skipped"]] if "skipped" in z.files else []
                _warn_skipped(skipped, len(paths), f" (decode cache {cache.name})")
                return z["images"], z["labels"], skipped
        except (OSError, ValueError, KeyError) as err:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable cache {cache}: {err}", RuntimeWarning, stacklevel=2)
    images, kept, skipped = decode_files(paths, expected_hw, skip_corrupt, desc=f"decoding {name}")
    labels = np.asarray(labels, np.int64)[kept]
    try:
        cache.parent.mkdir(exist_ok=True)
        for stale in cache.parent.glob(f"{name}-*.npz"):
            stale.unlink()
        with atomic_write(cache, "wb") as f:
            np.savez(f, images=images, labels=labels, skipped=np.asarray(skipped, dtype=str))
    except OSError as err:
        warnings.warn(f"could not write the decode cache {cache} ({err}); keeping the images in memory only",
                      RuntimeWarning, stacklevel=2)
    return images, labels, skipped


class InMemoryImages(Dataset):
    """uint8 images (N, H, W, 3) in memory, served as normalised float batches.

    With `augment`: random crop with zero padding `pad` and horizontal flip (the CIFAR recipe), drawn per
    image from torch's global generator (seeded per worker by the DataLoader). `skipped` lists the files
    left out because they could not be decoded (training reports their number)."""

    def __init__(self, images: np.ndarray | torch.Tensor, labels, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 augment: bool = False, pad: int = 4, skipped: list[str] = ()):
        self.images = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.uint8)
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got shape {tuple(self.images.shape)}")
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.augment = augment
        self.pad = int(pad)
        self.skipped = list(skipped)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __getitems__(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = self.images[idx]  # (B, H, W, 3)
        if self.augment:
            b, h, w, _ = batch.shape
            p = self.pad
            padded = torch.nn.functional.pad(batch, (0, 0, p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b, 1))
            ox = torch.randint(0, 2 * p + 1, (b, 1))
            flip = torch.rand(b, 1) < 0.5
            cols = torch.where(flip, torch.arange(w - 1, -1, -1), torch.arange(w)) + ox
            rows = torch.arange(h) + oy
            batch = padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
        x = batch.permute(0, 3, 1, 2).float()
        x = (x - self.mean) * self.inv_std
        return x.contiguous(), self.labels[idx]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([int(i)])
        return x[0], y[0]


def pass_batch(batch):
    """collate_fn for datasets whose `__getitems__` already returns a whole batch."""
    return batch
