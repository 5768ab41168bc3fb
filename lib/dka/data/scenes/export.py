"""`generate`: write a concept-scenes export in Broden's on-disk format, or reuse the one already there.

The export is a pure function of (preset, seed): the same bytes whatever the number of processes. It is
written into a scratch folder beside the output and renamed into place, with a manifest of every file
(size and sha256). An existing export is reused only when its parameters are the ones asked for and its
files match the manifest; a damaged one is written again (it is generated data). Scratch folders left
by a killed run are removed at the next run for the same output.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import shutil
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dka.data.broden import DEFAULT_CATEGORIES
from dka.data.scenes.maker import SPLITS, SceneMaker
from dka.data.scenes.manifest import MANIFEST_FILE, DamagedExportError, FileRecord, check_export, \
    record_bytes, record_file, regenerate_advice, write_manifest
from dka.data.scenes.scratch import die_with_parent, remove_stale, scratch_dir
from dka.data.scenes.vocabulary import Preset, preset_by_name

__all__ = ["generate", "params_for", "is_export", "read_params", "read_classes", "require_intact", "encode_label_png",
           "decode_label_png",
           "GENERATOR_VERSION", "PARAMS_FILE", "INDEX_COLUMNS", "JPEG_QUALITY"]

GENERATOR_VERSION = 1
PARAMS_FILE = "scenes_params.json"
INDEX_COLUMNS = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "material", "part", "scene", "texture"]
JPEG_QUALITY = 95


def encode_label_png(labels: np.ndarray) -> np.ndarray:
    """Broden's segmentation encoding: label = R + 256 * G."""
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    rgb[..., 0] = labels & 0xFF
    rgb[..., 1] = (labels >> 8) & 0xFF
    return rgb


def decode_label_png(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0].astype(np.int32) + 256 * rgb[..., 1].astype(np.int32)


def params_for(preset: Preset, seed: int) -> dict:
    """The parameters file's content (less the generation time) for (preset, seed)."""
    params = {"generator_version": GENERATOR_VERSION, "seed": int(seed), "preset": asdict(preset)}
    return json.loads(json.dumps(params))  # tuples -> lists, exactly as read back from the file


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` holds a concept-scenes export (intact or not): it has the parameters or the manifest."""
    path = Path(path)
    return (path / PARAMS_FILE).is_file() or (path / MANIFEST_FILE).is_file()


def read_params(path: str | os.PathLike) -> dict:
    """The export's parameters; DamagedExportError, with what to do, when they cannot be read."""
    file = Path(path) / PARAMS_FILE
    try:
        params = json.loads(file.read_text())
        int(params["seed"]), str(params["preset"]["name"]), int(params["preset"]["size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DamagedExportError(f"{file} is missing or unreadable ({err}); {regenerate_advice(Path(path))}") from None
    return params


def read_classes(path: str | os.PathLike) -> list[tuple[str, tuple[str, ...]]]:
    """(name, true concepts) of each class of an export, in class order (its classes.csv)."""
    file = Path(path) / "classes.csv"
    if not file.is_file():
        raise FileNotFoundError(f"no classes.csv in {path}: not a concept-scenes export (write one with "
                                "dka.data.scenes.generate(preset, DIR))")
    with open(file, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "concepts" not in rows[0]:
        raise ValueError(f"{file} has no `concepts` column (columns: {sorted(rows[0])})")
    return [(r["name"], tuple(c for c in r["concepts"].split(";") if c)) for r in rows]


def require_intact(path: str | os.PathLike, full: bool = False, cause: str | None = None) -> dict:
    """The parameters of the export at `path` after checking its files against the manifest (`check_export`);
    DamagedExportError naming the damaged files and the command that writes them again otherwise. `cause`
    (a decode error) is named when the check finds nothing."""
    root = Path(path)
    params = read_params(root)
    check = check_export(root, full=full)
    if not check.ok or cause is not None:
        what = check.describe() if not check.ok else cause
        raise DamagedExportError(f"{what}; {regenerate_advice(root, params['preset']['name'], int(params['seed']))}")
    return params


# --- one image ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRecord:
    """What the metadata needs from one written image."""

    row: dict  # its index.csv row
    class_index: int
    pixels: tuple  # (category, label, pixel count) of every concept in it; a scene covers the whole image
    files: tuple[FileRecord, ...]


_worker: tuple[SceneMaker, Path] | None = None  # this process's maker and scratch root


def _init_worker(preset: Preset, seed: int, root: str, parent_pid: int | None = None) -> None:
    global _worker
    if parent_pid is not None:
        die_with_parent(parent_pid)
    _worker = (SceneMaker(preset, seed), Path(root))


def _save(root: Path, path: str, image: Image.Image, fmt: str, **options) -> FileRecord:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    data = buffer.getvalue()
    (root / path).write_bytes(data)
    return record_bytes(path, data)


def _export_chunk(tasks: list[tuple[str, int]]) -> list[ImageRecord]:
    maker, root = _worker
    size = maker.preset.size
    out = []
    for split, index in tasks:
        scene = maker.sample(split, index)
        clean, labels, _ = maker.render(scene)
        stem = f"{split}/{index:06d}"
        files = [_save(root, f"images/{stem}.jpg", Image.fromarray(maker.final_image(scene, clean)), "JPEG",
                       quality=JPEG_QUALITY, subsampling=0)]  # 4:4:4 keeps small colour blobs
        row = {"image": f"{stem}.jpg", "split": split, "ih": size, "iw": size, "sh": size, "sw": size,
               "color": "", "object": "", "material": "", "part": "", "scene": str(scene.background.label),
               "texture": ""}
        pixels = [("scene", scene.background.label, size * size)]
        for cat, lab in labels.items():
            if lab.any():
                files.append(_save(root, f"images/{stem}_{cat}.png", Image.fromarray(encode_label_png(lab)), "PNG"))
                row[cat] = f"{stem}_{cat}.png"
                values, counts = np.unique(lab[lab > 0], return_counts=True)
                pixels += [(cat, int(v), int(n)) for v, n in zip(values, counts)]
        out.append(ImageRecord(row, scene.class_index, tuple(pixels), tuple(files)))
    return out


# --- metadata -----------------------------------------------------------------------------------------
def _write_csv(root: Path, name: str, header: list[str], rows: list) -> str:
    with open(root / name, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return name


def _write_metadata(root: Path, maker: SceneMaker, images: list[ImageRecord]) -> list[str]:
    """Broden's index/label/category tables, the class ground truth and a README; the names written."""
    size = maker.preset.size
    written = [
        _write_csv(root, "index.csv", INDEX_COLUMNS, [[r.row[c] for c in INDEX_COLUMNS] for r in images]),
        _write_csv(root, "image_classes.csv", ["image", "split", "class"],
                   [[r.row["image"], r.row["split"], r.class_index] for r in images]),
    ]
    class_names = [f"class{i:02d}" for i in range(len(maker.classes))]
    written.append(_write_csv(root, "classes.csv", ["class", "name", "concepts"],
                              [[i, n, ";".join(maker.classes[i])] for i, n in enumerate(class_names)]))
    written.append(_write_csv(root, "class_concepts.csv", ["class", "concept", "category"],
                              [[class_names[i], n, maker.by_name[n].category]
                               for i, cl in enumerate(maker.classes) for n in cl]))

    frequency: Counter = Counter()  # images showing the label
    coverage: Counter = Counter()  # summed share of the image it covers
    cat_frequency: Counter = Counter()  # images showing the category
    for r in images:
        for _, label, n in r.pixels:
            frequency[label] += 1
            coverage[label] += n / (size * size)
        cat_frequency.update({cat for cat, _, _ in r.pixels})
    written.append(_write_csv(root, "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
                              [[c.label, c.name, f"{c.category}({frequency[c.label]})", frequency[c.label],
                                f"{coverage[c.label]:.6f}", ""] for c in maker.concepts]))
    category_rows = []
    for cat in DEFAULT_CATEGORIES:
        members = [c for c in maker.concepts if c.category == cat]
        category_rows.append([cat, members[0].label, members[-1].label, len(members), cat_frequency[cat]])
        ranked = sorted(members, key=lambda c: (-frequency[c.label], c.label))
        written.append(_write_csv(root, f"c_{cat}.csv", ["code", "number", "name", "frequency", "coverage"],
                                  [[code, c.label, c.name, frequency[c.label], f"{coverage[c.label]:.6f}"]
                                   for code, c in enumerate(ranked, start=1)]))
    written.append(_write_csv(root, "category.csv", ["name", "first", "last", "count", "frequency"], category_rows))
    p = maker.preset
    (root / "README.txt").write_text(
        f"concept scenes ({p.name}, seed {maker.seed}) in Broden format, made by dka.data.scenes\n"
        f"size: ({size}, {size})\nsegmentation_size: ({size}, {size})\n"
        f"images: {p.n_train} train, {p.n_test} test; classes: {p.n_classes}\n\n"
        "index.csv, label.csv, category.csv, c_<category>.csv: Broden's formats (see broden1_224/README.txt);\n"
        "segmentation PNGs encode label = R + 256*G; scene is an image-level label.\n"
        "image_classes.csv: image,split,class (class index into classes.csv).\n"
        "classes.csv: class,name,concepts; class_concepts.csv: class,concept,category (the ground truth).\n")
    return written + ["README.txt"]


# --- the export -----------------------------------------------------------------------------------------
def _stored_params(out: Path) -> dict | None:
    """The export's parameters less the generation time; None when they cannot be read."""
    try:
        stored = read_params(out)
    except DamagedExportError:
        return None
    stored.pop("generation_seconds", None)
    return stored


def _write_images(preset: Preset, seed: int, tmp: Path, processes: int, progress: bool) -> list[ImageRecord]:
    tasks = [("train", i) for i in range(preset.n_train)] + [("test", i) for i in range(preset.n_test)]
    chunk = max(1, min(250, len(tasks) // (8 * max(1, processes)) or 1))
    chunks = [tasks[i:i + chunk] for i in range(0, len(tasks), chunk)]
    from dka.progress import tqdm

    images: list[ImageRecord] = []
    with tqdm(total=len(tasks), desc=f"concept scenes {preset.name}", unit="img", disable=not progress) as bar:
        if processes > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ctx.Pool(processes, initializer=_init_worker,
                          initargs=(preset, seed, str(tmp), os.getpid())) as pool:
                for part in pool.imap(_export_chunk, chunks):
                    images += part
                    bar.update(len(part))
        else:
            _init_worker(preset, seed, str(tmp))
            for c in chunks:
                part = _export_chunk(c)
                images += part
                bar.update(len(part))
    return images


def generate(preset: Preset | str, out: str | os.PathLike, seed: int = 0, processes: int = 2,
             progress: bool = True, force: bool = False) -> Path:
    """Write the concept-scenes export of (preset, seed) to `out`; reuse it when `out` already holds it intact.

    Reuse needs the same parameters and every file matching the manifest by size (`check_export`;
    `python -m dka data scenes --verify` compares hashes); a damaged export is written again with a
    warning, and `force=True` writes it again anyway. `out` is never half-written, and only an existing
    concept-scenes export (or an empty folder) is ever replaced."""
    preset = preset_by_name(preset) if isinstance(preset, str) else preset
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    out = Path(out).expanduser().resolve()
    params = params_for(preset, seed)
    remove_stale(out)
    if is_export(out):
        stored = None if force else _stored_params(out)
        if stored == params:
            check = check_export(out)
            if check.ok:
                return out
            warnings.warn(f"{check.describe()}; writing it again", RuntimeWarning, stacklevel=2)
        elif stored is None and not force:
            warnings.warn(f"{out / PARAMS_FILE} is missing or unreadable; writing the export again",
                          RuntimeWarning, stacklevel=2)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists, is not empty and is not a concept-scenes export (no {PARAMS_FILE}); "
                              "choose a new or empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch_dir(out, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    started = time.perf_counter()
    try:
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
        images = _write_images(preset, seed, tmp, processes, progress)
        written = _write_metadata(tmp, SceneMaker(preset, seed), images)
        write_manifest(tmp, [f for r in images for f in r.files] + [record_file(tmp, name) for name in written])
        params["generation_seconds"] = round(time.perf_counter() - started, 2)
        (tmp / PARAMS_FILE).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        if out.exists():
            old = scratch_dir(out, "old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
