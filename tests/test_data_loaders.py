"""build_loaders on small generated trees of each format, the in-memory augmentation, the errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dka.data import build_loaders, cifar, images, places
from dka.data.images import CorruptImageError, InMemoryImages


def _cifar_tree(root: Path, per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in cifar.CLASSES:
            (root / split / name).mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    root / split / name / f"{k:04d}.png")  # PNG: lossless, so pixels can be compared exactly
    return root


def test_cifar_folder_form_decodes_once_and_caches(tmp_path, monkeypatch):
    root = _cifar_tree(tmp_path / "cifar")
    bundle = build_loaders("cifar10", root, batch_size=7, workers=0, augment=False)
    assert bundle.num_classes == 10 and bundle.class_names == list(cifar.CLASSES)
    assert bundle.image_size == (32, 32) and bundle.stem == "cifar"
    assert len(list((root / images.CACHE_DIR).glob("cifar10-*.npz"))) == 2
    x, y = next(iter(bundle.test))
    assert x.shape == (7, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    first = np.asarray(Image.open(root / "test/airplane/0000.png"), np.float32) / 255
    mean, std = np.array(cifar.MEAN), np.array(cifar.STD)
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), (first - mean) / std, atol=1e-5)
    assert y.tolist() == [0, 0, 1, 1, 2, 2, 3]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is current")

    monkeypatch.setattr(images, "decode_files", no_decoding)
    again = build_loaders("cifar10", root, batch_size=7, workers=0)
    assert sum(len(b[1]) for b in again.train) == 20


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    root = _cifar_tree(tmp_path / "cifar")
    bad = root / "train/cat/0001.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(CorruptImageError, match="train/cat/0001.png"):
        build_loaders("cifar10", root, batch_size=4, workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle = build_loaders("cifar10", root, batch_size=4, workers=0, skip_corrupt=True)
    assert len(bundle.train.dataset) == 19
    assert any("skipped 1 corrupt image(s) of 20" in str(w.message) for w in caught)


def test_missing_roots_say_how_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-missing does not exist.*download cifar10"):
        build_loaders("cifar10", tmp_path / "cifar-missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no CIFAR-10 found in .*empty.*cifar10-jpg.tar.gz"):
        build_loaders("cifar10", tmp_path / "empty", 8)
    with pytest.raises(FileNotFoundError, match=r"places-missing does not exist.*download places365"):
        build_loaders("places365", tmp_path / "places-missing", 8)
    with pytest.raises(ValueError, match="valid names: cifar10, places365, scenes-smoke"):
        build_loaders("imagenet", tmp_path, 8)
    fake = tmp_path / "tv" / "cifar-10-batches-py"
    fake.mkdir(parents=True)
    (fake / "data_batch_1").write_bytes(b"junk")
    with pytest.raises(FileNotFoundError, match=r"batches.meta is missing; .*download cifar10"):
        build_loaders("cifar10", tmp_path / "tv", 8)
    (fake / "batches.meta").write_bytes(b"junk")
    with pytest.raises(FileNotFoundError, match=r"batches.meta is unreadable"):
        build_loaders("cifar10", tmp_path / "tv", 8)


def test_places365_easy_format_uses_official_indices(tmp_path):
    root = tmp_path / "places365_standard"
    names = places.categories()
    assert len(names) == 365 and names[0] == "/a/airfield"
    folders = {"airfield": 0, "apartment_building-outdoor": names.index("/a/apartment_building/outdoor"),
               "arena/hockey": names.index("/a/arena/hockey")}
    for split in ("train", "val"):
        for folder in folders:
            (root / split / folder).mkdir(parents=True)
            Image.new("RGB", (80, 60), (120, 30, 200)).save(root / split / folder / "00000001.jpg")
    bundle = build_loaders("places365", tmp_path, batch_size=3, workers=0)
    assert bundle.num_classes == 365 and bundle.stem == "imagenet" and bundle.image_size == (224, 224)
    x, y = next(iter(bundle.test))
    assert x.shape == (3, 3, 224, 224)
    assert sorted(y.tolist()) == sorted(folders.values())
    (root / "train" / "not_a_place").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "not_a_place" / "x.jpg")
    with pytest.raises(ValueError, match="not_a_place is not a Places365 category"):
        build_loaders("places365", root, batch_size=3, workers=0)


def test_augmentation_is_a_padded_crop_with_flip():
    torch.manual_seed(0)
    imgs = torch.randint(1, 256, (64, 8, 8, 3), dtype=torch.uint8)
    ds = InMemoryImages(imgs, torch.zeros(64), mean=(0, 0, 0), std=(1 / 255,) * 3, augment=True, pad=2)
    out, _ = ds.__getitems__(list(range(64)))
    out = out.round().to(torch.uint8).permute(0, 2, 3, 1)
    flips = 0
    for k in range(64):
        padded = torch.nn.functional.pad(imgs[k], (0, 0, 2, 2, 2, 2))
        found = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                 if torch.equal(out[k], (padded.flip(1) if f else padded)[dy:dy + 8, dx:dx + 8])]
        assert found, k
        flips += found[0][2]
    assert 15 < flips < 49


def test_scenes_root_is_generated_and_checked(tmp_path):
    bundle = build_loaders("scenes-smoke", tmp_path / "smoke", batch_size=32, workers=0)
    assert bundle.num_classes == 4 and bundle.image_size == (24, 24) and bundle.stem == "cifar"
    assert len(bundle.train.dataset) == 240 and len(bundle.test.dataset) == 80
    labels = torch.cat([y for _, y in bundle.test])
    assert torch.bincount(labels).tolist() == [20, 20, 20, 20]
    with pytest.raises(ValueError, match="holds the concept-scenes preset 'smoke', not 'demo32'"):
        build_loaders("scenes-demo32", tmp_path / "smoke", batch_size=32)


@pytest.mark.slow
def test_worker_processes_deliver_every_image_once(tmp_path):
    bundle = build_loaders("scenes-smoke", tmp_path / "smoke", batch_size=50, workers=2, seed=3)
    for _ in range(2):  # persistent workers survive the epoch
        seen = torch.cat([y for _, y in bundle.train])
        assert len(seen) == 240 and torch.bincount(seen).tolist() == [60, 60, 60, 60]
