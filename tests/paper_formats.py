"""Tiny datasets written in the real on-disk formats of the paper profile's data (test utilities only).

Why: the paper profile reads torchvision's pickled CIFAR-10 batches, the Places365 folders and Broden
(broden1_224); none can be downloaded in CI. These writers produce a few images in exactly those layouts,
so the library's readers and the notebooks run on the paper's code paths at toy size. The writers encode
the formats themselves (not through dka), so a reader that misreads a format fails against them.

- `write_cifar10(root)`: root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, pickled
  dicts of uint8 rows (N, 3072) in channel-planar order, as the CIFAR site ships them;
- `write_places365(root)`: root/places365_standard/{train,val}/<category>/*.jpg (the easy format that
  `python -m dka data download places365 --format easy` unpacks), 256 px, category folders named after
  `categories_places365.txt` (nested ones such as apartment_building/outdoor included);
- `write_places365_torchvision(root)`: torchvision's layout (file lists + data_256/ + val_256/);
- `write_broden(root, meta)`: the real broden1_224 metadata (`meta`, the folder of label.csv etc.) with
  generated 224 px JPEGs and 112 px label PNGs (label = R + 256 * G) listed in index.csv;
- `archive(folder, path)`: a .tar.gz / .tar / .zip of a written dataset, for download tests.
"""

from __future__ import annotations

import csv
import os
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["write_cifar10", "write_places365", "write_places365_torchvision", "write_broden", "broden_meta",
           "archive", "CIFAR_CLASSES", "places_categories"]

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BRODEN_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw", "color", "object", "material", "part", "scene", "texture")
ROOT = Path(__file__).resolve().parents[1]


def _class_images(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, size, size, 3) images whose mean colour depends on the class, plus noise: learnable."""
    base = (np.arange(3)[None, :] * 70 + labels[:, None] * 37) % 256
    noise = rng.integers(-40, 40, (len(labels), size, size, 3))
    return np.clip(base[:, None, None, :] + noise, 0, 255).astype(np.uint8)


def write_cifar10(root: str | os.PathLike, per_batch: int = 20, test: int = 20, seed: int = 0) -> Path:
    """torchvision's CIFAR-10 layout: five training batches of `per_batch` images and a test batch."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        labels = np.arange(n) % len(CIFAR_CLASSES)
        rgb = _class_images(rng, labels, 32)
        rows = rgb.transpose(0, 3, 1, 2).reshape(n, 3072)  # R plane, G plane, B plane, each row-major
        entry = {"batch_label": f"{name} of 6", "labels": labels.tolist(), "data": rows,
                 "filenames": [f"img_{name}_{i:05d}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {"label_names": list(CIFAR_CLASSES), "num_cases_per_batch": per_batch, "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return Path(root)


def places_categories() -> list[str]:
    """The official category names ('/a/airfield', ...) from the categories file the package ships."""
    text = (ROOT / "lib" / "dka" / "data" / "resources" / "categories_places365.txt").read_text()
    rows = sorted((int(i), name) for name, i in (line.split() for line in text.splitlines() if line.strip()))
    return [name for _, name in rows]


def _places_pick(classes: int) -> list[tuple[int, str]]:
    """`classes` categories spread over the list, nested names (apartment_building/outdoor) included."""
    names = places_categories()
    nested = [i for i, n in enumerate(names) if n.count("/") > 2][:2]
    spread = np.linspace(0, len(names) - 1, max(1, classes - len(nested))).astype(int).tolist()
    return [(i, names[i]) for i in sorted(set(spread + nested))]


def _jpeg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=90)


def write_places365(root: str | os.PathLike, classes: int = 8, train: int = 4, val: int = 2, seed: int = 0) -> Path:
    """The easy format: root/places365_standard/{train,val}/<category path>/<n>.jpg, 256 px."""
    base = Path(root) / "places365_standard"
    rng = np.random.default_rng(seed)
    for index, name in _places_pick(classes):
        folder = name[3:]  # '/a/apartment_building/outdoor' -> 'apartment_building/outdoor'
        for split, count in (("train", train), ("val", val)):
            for k, img in enumerate(_class_images(rng, np.full(count, index), 256)):
                _jpeg(base / split / folder / f"{k:08d}.jpg", img)
    return Path(root)


def write_places365_torchvision(root: str | os.PathLike, classes: int = 4, train: int = 2, val: int = 1,
                                seed: int = 0) -> Path:
    """torchvision's layout: categories/file lists, data_256/<a>/<category>/*.jpg, val_256/*.jpg."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "lib/dka/data/resources/categories_places365.txt", root / "categories_places365.txt")
    train_rows, val_rows = [], []
    for index, name in _places_pick(classes):
        for k, img in enumerate(_class_images(rng, np.full(train, index), 256)):
            rel = f"{name}/{k:08d}.jpg"
            _jpeg(root / "data_256" / rel.lstrip("/"), img)
            train_rows.append(f"{rel} {index}")
        for k, img in enumerate(_class_images(rng, np.full(val, index), 256)):
            rel = f"Places365_val_{index * 100 + k + 1:08d}.jpg"
            _jpeg(root / "val_256" / rel, img)
            val_rows.append(f"{rel} {index}")
    (root / "places365_train_standard.txt").write_text("\n".join(train_rows) + "\n")
    (root / "places365_val.txt").write_text("\n".join(val_rows) + "\n")
    return root


def broden_meta() -> Path | None:
    """The real broden1_224 metadata folder (../shared/data or $DKA_SHARED_DATA), or None where absent."""
    shared = Path(os.environ.get("DKA_SHARED_DATA") or ROOT.parent / "shared" / "data")
    return shared / "broden1_224_meta" if (shared / "broden1_224_meta" / "label.csv").is_file() else None


def _numbers(meta: Path, category: str) -> list[int]:
    with open(meta / f"c_{category}.csv", newline="") as f:
        return [int(r["number"]) for r in csv.DictReader(f)]


def _label_png(path: Path, labels: np.ndarray) -> None:
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def write_broden(root: str | os.PathLike, meta: str | os.PathLike, images: int = 24, seed: int = 0) -> Path:
    """broden1_224 at toy size: the real metadata files, `images` generated rows in index.csv.

    Three quarters of the rows are ADE20K-like (pixel colour, object and part maps, an image-level scene),
    the rest DTD-like (a colour map and an image-level texture), as in the real index.
    """
    root, meta = Path(root), Path(meta)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("category.csv", "label.csv", *(f"c_{c}.csv" for c in
                                                 ("color", "object", "material", "part", "scene", "texture"))):
        shutil.copyfile(meta / name, root / name)
    rng = np.random.default_rng(seed)
    labels = {c: _numbers(meta, c)[:12] for c in ("color", "object", "part", "scene", "texture")}
    rows = []
    for i in range(images):
        source = "ade20k" if i % 4 else "dtd"
        stem = f"{source}/{'ADE_train' if source == 'ade20k' else 'g'}_{i:08d}"
        row = dict.fromkeys(BRODEN_COLUMNS, "")
        row.update(image=f"{stem}.jpg", split="train" if i % 3 else "val", ih=224, iw=224, sh=112, sw=112)
        maps = {}
        for category in ("color", "object", "part") if source == "ade20k" else ("color",):
            seg = np.zeros((112, 112), np.int64)
            for _ in range(3):  # three rectangles of labels of this category
                y, x = rng.integers(0, 84, 2)
                h, w = rng.integers(12, 40, 2)
                seg[y:y + h, x:x + w] = rng.choice(labels[category])
            maps[category] = seg
            _label_png(root / "images" / f"{stem}_{category}.png", seg)
            row[category] = f"{stem}_{category}.png"
        if source == "ade20k":
            row["scene"] = str(rng.choice(labels["scene"]))
        else:
            row["texture"] = ";".join(str(v) for v in rng.choice(labels["texture"], 2, replace=False))
        picture = np.repeat(np.repeat(maps["color"], 2, 0), 2, 1)  # 224 px image drawn from its colour map
        rgb = np.stack([(picture * 53) % 256, (picture * 97) % 256, (picture * 11) % 256], -1).astype(np.uint8)
        _jpeg(root / "images" / f"{stem}.jpg", rgb)
        rows.append(row)
    with open(root / "index.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=BRODEN_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


def archive(folder: str | os.PathLike, path: str | os.PathLike, arcname: str | None = None) -> Path:
    """`folder` packed as `path` (.zip, .tar or .tar.gz by suffix), its members under `arcname/`."""
    folder, path = Path(folder), Path(path)
    arcname = arcname if arcname is not None else folder.name
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as z:
            for file in sorted(folder.rglob("*")):
                if file.is_file():
                    z.write(file, (Path(arcname) / file.relative_to(folder)).as_posix())
    else:
        with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as t:
            if arcname:
                t.add(folder, arcname)
            else:  # the folder's entries at the archive's top level
                for entry in sorted(folder.iterdir()):
                    t.add(entry, entry.name)
    return path
