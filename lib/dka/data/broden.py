"""Broden (broden1_224 and the concept-scenes export): images with per-category concept labels.

Follows NetDissect-Lite's reading of the format: rows are the `index.csv` rows with a non-empty, non-zero
entry in some selected category (the split column is ignored); a field holds `;`-separated entries, a
number being an image-level label and a file name a PNG whose label at a pixel is R + 256*G; a label's
primary category is the selected category where its `c_<cat>.csv` coverage is largest, ties going to the
later category. A `0` entry of an image-level field is dropped ("no label"), or kept as label 0 with
`zero_image_labels=True`, as NetDissect-Lite's loader keeps it (see dka.dissection.rules).

Checked when the dataset is built, so a bad file fails before any feature is computed: every
index.csv row has as many fields as the header (a short row would drop the image, a row missing one
field would shift its columns), and every image-level label is a row of label.csv. Pixel labels are
checked as each PNG is decoded.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dka.data.images import IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, load_rgb

__all__ = ["BrodenDataset", "DEFAULT_CATEGORIES", "CAFFE_BGR_MEAN", "CAFFE_SCALE", "how_to_get"]

DEFAULT_CATEGORIES = ("color", "object", "part", "scene", "texture")
# NetDissect-Lite: images are turned to BGR, this BGR mean is subtracted, the channels are flipped back to
# RGB and the result is divided by 255 * 0.224 (loadseg.normalize_image + feature_operation).
CAFFE_BGR_MEAN = (109.5388, 118.6897, 124.6901)
CAFFE_SCALE = 255.0 * 0.224


def how_to_get(root: Path) -> str:
    return (f"get broden1_224 with `python -m dka data download broden --root {root.parent}`, or write the built-in "
            f"concept scenes there with `python -m dka data scenes --preset demo64 --out {root}`")


def _read_csv(path: Path) -> list[dict]:
    """Rows of a Broden CSV as dicts; a row with too few or too many fields is an error naming its line."""
    return [row for _, row in _csv_rows(path)]


def _csv_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row dict) for each non-blank data row of a CSV, checking every row's field count."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; a Broden directory holds index.csv, label.csv, category.csv "
                                "and c_<category>.csv")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path} is empty; it needs a header line")
        rows = []
        for fields in reader:
            if not fields:  # a blank line (csv and NetDissect-Lite skip it)
                continue
            if len(fields) != len(header):
                raise ValueError(f"{path} line {reader.line_num}: {len(fields)} fields, expected {len(header)} "
                                 f"({','.join(header)}); fix or remove the row")
            rows.append((reader.line_num, dict(zip(header, fields))))
    return rows


class BrodenDataset(Dataset):
    """Broden images with the label maps of the selected categories.

    `ds[i]` -> dict(image=(3, H, W) float, seg=(L, sh, sw) int32 pixel label maps, image_labels=(M,) long,
    index=i). `caffe=True` reproduces NetDissect-Lite's preprocessing (needed to match published tallies);
    otherwise images are normalised with `mean`/`std` (ImageNet's by default, as dka trains its models)."""

    def __init__(self, root: str | Path, categories=DEFAULT_CATEGORIES, caffe: bool = False,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, zero_image_labels: bool = False, split: str | None = None):
        self.root = Path(root).expanduser()
        self.split = split  # None: every row (NetDissect-Lite ignores the column); else only that split's rows
        if not (self.root / "index.csv").is_file():
            what = "does not exist" if not self.root.exists() else "has no index.csv"
            raise FileNotFoundError(f"Broden root {self.root} {what}; {how_to_get(self.root)}")
        self.caffe = bool(caffe)
        self.zero_image_labels = bool(zero_image_labels)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

        available = [row["name"] for row in _read_csv(self.root / "category.csv")]
        unknown = [c for c in categories if c not in available]
        if unknown:
            raise ValueError(f"categories {unknown} are not in {self.root / 'category.csv'}; available: {available}")
        self.categories = [c for c in available if c in categories]

        labels = _csv_rows(self.root / "label.csv")
        numbers = []
        for line, r in labels:
            try:
                numbers.append(int(r["number"]))
            except (KeyError, ValueError) as err:
                raise ValueError(f"{self.root / 'label.csv'} line {line}: no label number ({err})") from err
        if not numbers:
            raise ValueError(f"{self.root / 'label.csv'} lists no labels")
        n_labels = max(numbers) + 1
        names = [""] * n_labels
        names[0] = "-"
        self.known_labels = np.zeros(n_labels, dtype=bool)  # label numbers with a row in label.csv (and 0)
        self.known_labels[0] = True
        for number, (_, r) in zip(numbers, labels):
            names[number] = r["name"]
            self.known_labels[number] = True
        self.label_names = names
        coverage = np.zeros((len(self.categories), n_labels))
        for ci, cat in enumerate(self.categories):
            path = self.root / f"c_{cat}.csv"
            for line, r in _csv_rows(path):
                number = int(r["number"])
                if not (0 < number < n_labels and self.known_labels[number]):
                    raise ValueError(f"{path} line {line} names label {number}, absent from "
                                     f"{self.root / 'label.csv'}")
                coverage[ci, number] = float(r["coverage"])
        self.primary_category = self._primary(coverage)

        self.rows = self._read_index()
        if self.rows:
            sizes = {(r[2], r[3]) for r in self.rows}
            segs = {(r[4], r[5]) for r in self.rows}
            if len(segs) > 1:
                raise ValueError(f"{self.root / 'index.csv'} mixes segmentation sizes {sorted(segs)}; dissection "
                                 "needs one size")
            self.seg_size = segs.pop()
            self.image_size = sizes.pop() if len(sizes) == 1 else max(sizes)
        else:
            self.seg_size = self.image_size = (0, 0)

    @staticmethod
    def _primary(coverage: np.ndarray) -> np.ndarray:
        """Per label: the category with the largest coverage (ties -> later category), -1 when none."""
        n_cat = coverage.shape[0]
        later_first = coverage[::-1]
        primary = (n_cat - 1 - np.argmax(later_first, axis=0)).astype(np.int64)
        primary[coverage.max(axis=0) <= 0] = -1
        primary[0] = -1
        return primary

    def _entries(self, path: Path, line: int, cat: str, text: str) -> list[str]:
        """A field's entries; `0` kept only in an all-number field under zero_image_labels (NetDissect-Lite
        reads a number in a field that also names PNGs as a label map, where 0 counts nothing)."""
        entries = [e for e in text.split(";") if e]
        numeric = all(e.isdigit() for e in entries)
        for e in entries:
            if e.isdigit() and not (int(e) < len(self.known_labels) and self.known_labels[int(e)]):
                raise ValueError(f"{path} line {line}, column {cat}: label {e} is not in {self.root / 'label.csv'}")
        if self.zero_image_labels and numeric:
            return [str(int(e)) for e in entries]
        return [e for e in entries if not (e.isdigit() and int(e) == 0)]

    def _read_index(self) -> list[tuple]:
        path = self.root / "index.csv"
        with open(path, newline="") as f:
            header = next(csv.reader(f), None) or []
        missing = [c for c in ("image", "ih", "iw", "sh", "sw", *self.categories) if c not in header]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {missing}; Broden's columns are "
                             "image,split,ih,iw,sh,sw,color,object,material,part,scene,texture")
        if self.split is not None and "split" not in header:
            raise ValueError(f"{path} has no split column, so split={self.split!r} cannot select rows; "
                             "pass split=None to use every image")
        rows = []
        for line, r in _csv_rows(path):
            if self.split is not None and r["split"] != self.split:
                continue
            fields = {c: self._entries(path, line, c, r[c]) for c in self.categories}
            if not any(e != "0" for entries in fields.values() for e in entries):
                continue
            try:
                dims = tuple(int(r[k]) for k in ("ih", "iw", "sh", "sw"))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path} line {line} (image {r['image']}): bad size columns ({err})") from err
            rows.append((line, r["image"], *dims, fields))
        if self.split is not None and not rows:
            raise ValueError(f"{path} has no labelled image of split {self.split!r}; check the split name")
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def image_names(self) -> list[str]:
        return [r[1] for r in self.rows]

    def _file(self, row: tuple, name: str) -> Path:
        path = self.root / "images" / name
        if not path.is_file():
            raise FileNotFoundError(f"index.csv row at line {row[0]} (image {row[1]}) references a missing file {path}")
        return path

    def _image(self, row: tuple) -> torch.Tensor:
        rgb = load_rgb(self._file(row, row[1]))
        ih, iw = row[2], row[3]
        if rgb.shape[:2] != (ih, iw):  # NetDissect-Lite rescales to the size index.csv states
            rgb = np.asarray(Image.fromarray(rgb).resize((iw, ih), Image.BILINEAR))
        x = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).float()
        if self.caffe:
            bgr_mean = torch.tensor(CAFFE_BGR_MEAN).view(3, 1, 1)
            return (x - bgr_mean.flip(0)) / CAFFE_SCALE
        return (x / 255.0 - self.mean) / self.std

    def _segmentation(self, row: tuple, name: str) -> np.ndarray:
        path = self._file(row, name)
        try:
            with Image.open(path) as img:
                img.load()
                arr = np.asarray(img.convert("RGB") if img.mode in ("P", "RGBA") else img)
        except (OSError, SyntaxError, ValueError) as err:
            raise CorruptImageError(f"cannot decode segmentation {path} (index.csv line {row[0]}): {err}") from err
        if arr.ndim != 3:
            raise CorruptImageError(f"segmentation {path} is not an RGB PNG (mode {img.mode}); Broden encodes "
                                    "label = R + 256*G")
        if arr.shape[:2] != (row[4], row[5]):
            raise CorruptImageError(f"segmentation {path} is {arr.shape[1]}x{arr.shape[0]} but index.csv line "
                                    f"{row[0]} says {row[5]}x{row[4]}")
        labels = arr[..., 0].astype(np.int32) + 256 * arr[..., 1].astype(np.int32)
        known = self.known_labels
        if int(labels.max()) >= len(known) or not known[labels].all():
            found = np.unique(labels)
            bad = [int(v) for v in found if v >= len(known) or not known[v]]
            raise ValueError(f"segmentation {path} (index.csv line {row[0]}) holds label(s) {bad[:8]} that "
                             f"{self.root / 'label.csv'} does not list")
        return labels

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        maps, image_labels = [], []
        for cat in self.categories:
            for entry in row[6][cat]:
                if entry.isdigit():
                    image_labels.append(int(entry))
                else:
                    maps.append(self._segmentation(row, entry))
        sh, sw = row[4], row[5]
        seg = torch.from_numpy(np.stack(maps)) if maps else torch.zeros((0, sh, sw), dtype=torch.int32)
        return {"image": self._image(row), "seg": seg, "image_labels": torch.tensor(image_labels, dtype=torch.long),
                "has_maps": bool(maps), "index": i}

    @staticmethod
    def collate(batch: list[dict]) -> dict:
        """Stack a batch, padding label maps with 0 (no label) and image-level labels with -1 (none:
        0 is a label number NetDissect-Lite's rules count)."""
        n_maps = max(b["seg"].shape[0] for b in batch)
        n_img = max(b["image_labels"].shape[0] for b in batch)
        sh, sw = batch[0]["seg"].shape[1:]
        seg = torch.zeros((len(batch), n_maps, sh, sw), dtype=torch.int32)
        image_labels = torch.full((len(batch), n_img), -1, dtype=torch.long)
        for k, b in enumerate(batch):
            seg[k, : b["seg"].shape[0]] = b["seg"]
            image_labels[k, : b["image_labels"].shape[0]] = b["image_labels"]
        return {"image": torch.stack([b["image"] for b in batch]), "seg": seg, "image_labels": image_labels,
                "has_maps": torch.tensor([b.get("has_maps", b["seg"].shape[0] > 0) for b in batch]),
                "index": torch.tensor([b["index"] for b in batch], dtype=torch.long)}
