"""Concept scenes: determinism, masks that agree with the pixels, class structure, the Broden export."""

from __future__ import annotations

import csv
import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dka.data import scenes
from dka.data.broden import BrodenDataset
from dka.data.scenes import PIXEL_CATEGORIES, Part, SceneMaker, decode_label_png


@pytest.fixture(scope="module")
def smoke_export(tmp_path_factory) -> Path:
    return scenes.generate("smoke", tmp_path_factory.mktemp("scenes") / "smoke", seed=0, progress=False)


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_same_seed_same_images_other_seed_differs():
    a, b, c = SceneMaker("demo32", 0), SceneMaker("demo32", 0), SceneMaker("demo32", 1)
    assert a.classes == b.classes
    differs = 0
    for i in range(6):
        sa, sb, sc = a.sample("train", i), b.sample("train", i), c.sample("train", i)
        ia, ib, ic = (m.final_image(s, m.render(s)[0]) for m, s in ((a, sa), (b, sb), (c, sc)))
        np.testing.assert_array_equal(ia, ib)
        differs += not np.array_equal(ia, ic)
    assert differs == 6
    assert a.classes != c.classes


def test_export_is_byte_identical_whatever_the_process_count(smoke_export, tmp_path):
    single = scenes.generate("smoke", tmp_path / "single", seed=0, processes=1, progress=False)
    names = ["index.csv", "label.csv", "category.csv", "image_classes.csv", "class_concepts.csv",
             "c_color.csv", "c_object.csv", "c_part.csv", "c_scene.csv", "c_texture.csv"]
    for row in _read(smoke_export / "index.csv")[::37]:
        names.append(f"images/{row['image']}")
        names += [f"images/{row[c]}" for c in PIXEL_CATEGORIES if row[c]]
    match, mismatch, errors = filecmp.cmpfiles(smoke_export, single, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names)


@pytest.mark.parametrize("preset", ["smoke", "demo32", "demo64"])
def test_every_mask_agrees_with_the_pixels_drawn(preset):
    maker = SceneMaker(preset, 3)
    size = maker.preset.size
    for i in range(12):
        scene = maker.sample("train" if i % 2 else "test", i)
        image, labels, owner = maker.render(scene)
        background = scene.background.paint(size)
        unlabelled = np.all([labels[c] == 0 for c in PIXEL_CATEGORIES], axis=0)
        np.testing.assert_array_equal(image[unlabelled], background[unlabelled])
        for el in scene.elements:
            mask, layer = el.paint(size)  # redrawn on its own
            shown = labels[el.category] == el.label
            if el.category == "object":  # an object's label also covers its parts
                parts = [j for j, e in enumerate(scene.elements) if isinstance(e, Part) and e.host is el]
                shown &= ~np.isin(owner, parts)
            assert shown.sum() >= 0.6 * mask.sum() > 0, (preset, i, el.concept)
            assert np.all(mask[shown])
            np.testing.assert_array_equal(image[shown], layer[shown])
        present = {el.concept for el in scene.elements} | {scene.background.concept}
        assert present == set(scene.concepts)


def test_classes_share_concepts_and_images_never_complete_another_class():
    maker = SceneMaker("demo64", 0)
    sets = maker.class_sets
    assert len(sets) == 32 and all(2 <= len(s) <= 4 for s in sets)
    assert not any(a <= b for i, a in enumerate(sets) for j, b in enumerate(sets) if i != j)
    assert all(any(a & b for j, b in enumerate(sets) if j != i) for i, a in enumerate(sets))
    near_miss = 0
    for i in range(150):
        scene = maker.sample("train", i)
        own = sets[scene.class_index]
        assert own <= scene.concepts
        assert not any(s <= scene.concepts for j, s in enumerate(sets) if j != scene.class_index)
        near_miss += any(len(s - scene.concepts) == 1 and len(s) > 1 for j, s in enumerate(sets)
                         if j != scene.class_index)
    assert near_miss > 50  # most images are one concept short of some other class


def test_export_files_match_the_render(smoke_export):
    maker = SceneMaker("smoke", 0)
    rows = _read(smoke_export / "index.csv")
    assert list(rows[0]) == scenes.INDEX_COLUMNS
    assert len(rows) == maker.preset.n_train + maker.preset.n_test
    classes = {r["image"]: int(r["class"]) for r in _read(smoke_export / "image_classes.csv")}
    for row in rows[::23]:
        split, index = row["split"], int(Path(row["image"]).stem)
        scene = maker.sample(split, index)
        clean, labels, _ = maker.render(scene)
        assert classes[row["image"]] == scene.class_index
        assert row["scene"] == str(scene.background.label)
        jpeg = np.asarray(Image.open(smoke_export / "images" / row["image"]), np.float32)
        assert np.abs(jpeg - maker.final_image(scene, clean)).mean() < 4  # JPEG error only
        for cat in PIXEL_CATEGORIES:
            if labels[cat].any():
                png = np.asarray(Image.open(smoke_export / "images" / row[cat]).convert("RGB"))
                np.testing.assert_array_equal(decode_label_png(png), labels[cat])
            else:
                assert row[cat] == ""
    truth = [(f"class{i:02d}", n, maker.by_name[n].category) for i, cl in enumerate(maker.classes) for n in cl]
    assert [(r["class"], r["concept"], r["category"]) for r in _read(smoke_export / "class_concepts.csv")] == truth
    cats = _read(smoke_export / "category.csv")
    assert [c["name"] for c in cats] == ["color", "object", "part", "scene", "texture"]
    labels_csv = {int(r["number"]): r for r in _read(smoke_export / "label.csv")}
    scene_counts = {}
    for r in rows:
        scene_counts[int(r["scene"])] = scene_counts.get(int(r["scene"]), 0) + 1
    for number, n in scene_counts.items():  # an image-level label's coverage is its image count
        assert int(labels_csv[number]["frequency"]) == n and float(labels_csv[number]["coverage"]) == n


def test_broden_round_trip(smoke_export):
    maker = SceneMaker("smoke", 0)
    ds = BrodenDataset(smoke_export)
    assert ds.categories == ["color", "object", "part", "scene", "texture"]
    assert ds.seg_size == ds.image_size == (24, 24) and len(ds) == 320
    for c in maker.concepts:
        assert ds.label_names[c.label] == c.name
        assert ds.categories[ds.primary_category[c.label]] == c.category
    assert ds.primary_category[0] == -1
    for i in range(0, len(ds), 29):
        item = ds[i]
        split, index = ds.rows[i][1].split("/")[0], int(Path(ds.rows[i][1]).stem)
        scene = maker.sample(split, index)
        _, labels, _ = maker.render(scene)
        expected = [labels[c] for c in ("color", "object", "part", "texture") if labels[c].any()]
        np.testing.assert_array_equal(item["seg"].numpy(), np.stack(expected))
        assert item["image_labels"].tolist() == [scene.background.label]
        assert item["image"].shape == (3, 24, 24)
    batch = BrodenDataset.collate([ds[0], ds[1], ds[2]])
    assert batch["seg"].shape[0] == 3 and batch["image_labels"].shape == (3, 1)


def test_cache_regenerates_only_when_params_change(smoke_export, tmp_path):
    params_file = smoke_export / scenes.PARAMS_FILE
    before = params_file.stat().st_mtime_ns
    assert scenes.generate("smoke", smoke_export, seed=0, progress=False) == smoke_export
    assert params_file.stat().st_mtime_ns == before
    out = scenes.generate("smoke", tmp_path / "s", seed=0, processes=1, progress=False)
    scenes.generate("smoke", out, seed=5, processes=1, progress=False)
    assert json.loads((out / scenes.PARAMS_FILE).read_text())["seed"] == 5
    assert not list(tmp_path.glob(".s.*"))  # no temporary directory left behind


def test_refuses_to_replace_a_directory_that_is_not_an_export(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a concept-scenes export"):
        scenes.generate("smoke", tmp_path, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="valid presets: smoke, demo32, demo64"):
        scenes.preset_by_name("demo128")
