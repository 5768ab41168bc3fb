"""The readers of the paper profile's datasets on data written in the real formats (tests/paper_formats.py)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

import paper_formats
from dka import data
from dka.data import cifar, places
from dka.data.broden import BrodenDataset


def test_torchvision_cifar10_batches_are_read_pixel_for_pixel(tmp_path):
    root = paper_formats.write_cifar10(tmp_path, per_batch=10, test=6)
    images, labels, classes, skipped = cifar.load_split(root, "train")
    assert skipped == []
    assert images.shape == (50, 32, 32, 3) and images.dtype == np.uint8 and classes == list(paper_formats.CIFAR_CLASSES)
    with open(root / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        row = pickle.load(f)["data"][3]  # the file's own bytes: R plane, G plane, B plane
    assert np.array_equal(images[13, 5, 7], [row[5 * 32 + 7], row[1024 + 5 * 32 + 7], row[2048 + 5 * 32 + 7]])
    assert labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    bundle = data.build_loaders("cifar10", root, batch_size=8, workers=0)
    assert (bundle.num_classes, bundle.image_size, bundle.stem) == (10, (32, 32), "cifar")
    assert len(bundle.test.dataset) == 6


def test_a_cifar_batch_that_asks_for_code_is_refused(tmp_path):
    root = paper_formats.write_cifar10(tmp_path, per_batch=2, test=2)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(FileNotFoundError, match=r"refusing to load .*system"):
        cifar.load_split(root, "test")
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch is missing; get it with"):
        cifar.load_split(root, "test")


def test_places365_easy_folders_map_to_the_official_indices(tmp_path):
    root = paper_formats.write_places365(tmp_path, classes=6, train=2, val=1)
    train, val, names = places.datasets(root)
    picked = dict(paper_formats._places_pick(6))
    assert len(names) == 365 and names == paper_formats.places_categories()
    assert sorted(set(train.targets)) == sorted(picked) and len(val) == len(picked)
    assert any(picked[i].count("/") > 2 for i in set(train.targets))  # a nested category (name/outdoor) is read
    x, y = val[0]
    assert x.shape == (3, 224, 224) and int(y) in picked
    bundle = data.build_loaders("places365", root, batch_size=4, workers=0)
    assert (bundle.num_classes, bundle.image_size, bundle.stem) == (365, (224, 224), "imagenet")


def test_places365_torchvision_layout_is_written_as_torchvision_lists_it(tmp_path):
    root = paper_formats.write_places365_torchvision(tmp_path, classes=3, train=2, val=1)
    assert places.find_layout(root) == ("torchvision", root)
    for line in (root / "places365_train_standard.txt").read_text().split("\n")[:-1]:
        rel, index = line.split()
        assert (root / "data_256" / rel.lstrip("/")).is_file() and rel.startswith(paper_formats.places_categories()[int(index)])


@pytest.mark.shared
def test_broden_from_the_real_metadata_with_generated_images(shared_data, tmp_path):
    root = paper_formats.write_broden(tmp_path / "broden1_224", shared_data / "broden1_224_meta", images=8)
    ds = BrodenDataset(root)
    assert len(ds) == 8 and ds.seg_size == (112, 112) and ds.image_size == (224, 224)
    ade, dtd = ds[1], ds[0]
    assert ade["image"].shape == (3, 224, 224) and ade["seg"].shape == (3, 112, 112)  # colour, object, part maps
    assert dtd["seg"].shape == (1, 112, 112) and len(dtd["image_labels"]) == 2  # colour map, two textures
    labels = set(ade["seg"].unique().tolist()) - {0}
    category = {ds.categories[ds.primary_category[label]] for label in labels}
    assert category <= {"color", "object", "part"} and labels
    batch = BrodenDataset.collate([ds[i] for i in range(4)])
    assert batch["seg"].shape[0] == 4 and batch["image"].dtype == torch.float32
