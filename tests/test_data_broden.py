"""BrodenDataset on the real broden1_224 metadata with generated images, and its error messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dka.data.broden import CAFFE_SCALE, BrodenDataset
from dka.data.images import CorruptImageError
from dka.data.scenes import encode_label_png

HEADER = "image,split,ih,iw,sh,sw,color,object,material,part,scene,texture\n"


def _png(path: Path, labels: np.ndarray) -> None:
    Image.fromarray(encode_label_png(labels.astype(np.int32))).save(path)


@pytest.fixture()
def real_meta(shared_data, tmp_path) -> Path:
    root = tmp_path / "broden1_224"
    shutil.copytree(shared_data / "broden1_224_meta", root)
    (root / "images" / "ade20k").mkdir(parents=True)
    Image.new("RGB", (224, 224), (200, 100, 50)).save(root / "images/ade20k/a.jpg", quality=100)
    Image.new("RGB", (224, 224), (10, 20, 30)).save(root / "images/ade20k/b.jpg")
    Image.new("RGB", (224, 224), (10, 20, 30)).save(root / "images/ade20k/c.jpg")
    color = np.zeros((112, 112), int)
    color[:56] = 10  # red-c
    obj = np.zeros((112, 112), int)
    obj[:, :30] = 12  # wall
    obj[:, 80:] = 300  # > 255: uses the G channel
    part = np.zeros((112, 112), int)
    part[5:9, 5:9] = 21  # head
    _png(root / "images/ade20k/a_color.png", color)
    _png(root / "images/ade20k/a_object.png", obj)
    _png(root / "images/ade20k/a_part.png", part)
    (root / "index.csv").write_text(
        HEADER
        + "ade20k/a.jpg,train,224,224,112,112,ade20k/a_color.png,ade20k/a_object.png,,ade20k/a_part.png,59,237;276\n"
        + "ade20k/b.jpg,val,224,224,112,112,,,ade20k/b_material.png,,,\n"  # material only: not selected
        + "ade20k/c.jpg,val,224,224,112,112,,,,,83,\n")
    return root


@pytest.mark.shared
def test_real_metadata_labels_and_primary_categories(real_meta):
    ds = BrodenDataset(real_meta)
    assert ds.categories == ["color", "object", "part", "scene", "texture"]
    assert len(ds) == 2 and ds.seg_size == (112, 112) and ds.image_size == (224, 224)
    assert len(ds.label_names) == 1198 and ds.label_names[0] == "-" and ds.label_names[12] == "wall"
    cat = {name: ds.primary_category[ds.label_names.index(name)] for name in
           ("red-c", "wall", "head", "street-s", "blotchy", "windowpane", "wood")}
    assert [ds.categories[cat[n]] for n in ("red-c", "wall", "head", "street-s", "blotchy")] == \
        ["color", "object", "part", "scene", "texture"]
    assert ds.categories[cat["windowpane"]] == "object"  # object coverage 714 > part coverage
    assert ds.categories[cat["wood"]] == "object"  # material is not selected
    assert ds.primary_category[0] == -1
    item = ds[0]
    assert item["seg"].shape == (3, 112, 112) and item["seg"].dtype == torch.int32
    assert item["seg"][0, 0, 0] == 10 and item["seg"][1, 0, 100] == 300 and item["seg"][2, 6, 6] == 21
    assert item["image_labels"].tolist() == [59, 237, 276]
    batch = BrodenDataset.collate([ds[0], ds[1]])
    assert batch["seg"].shape == (2, 3, 112, 112) and batch["seg"][1].abs().sum() == 0
    assert batch["image_labels"].tolist() == [[59, 237, 276], [83, -1, -1]]  # -1 pads (0 is a label number)
    assert batch["has_maps"].tolist() == [True, False]
    caffe = BrodenDataset(real_meta, caffe=True)[0]["image"]
    expected = (torch.tensor([200.0, 100.0, 50.0]) - torch.tensor([124.6901, 118.6897, 109.5388])) / CAFFE_SCALE
    torch.testing.assert_close(caffe[:, 100, 100], expected, atol=2 / CAFFE_SCALE, rtol=0)
    only = BrodenDataset(real_meta, categories=("scene",))
    assert only.categories == ["scene"] and len(only) == 2 and only[0]["seg"].shape == (0, 112, 112)


def _tiny(root: Path, c_object: str, c_part: str) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "category.csv").write_text("name,first,last,count,frequency\nobject,1,3,3,5\npart,1,3,2,5\n")
    (root / "label.csv").write_text("number,name,category,frequency,coverage,syns\n1,a,object(1),1,1,\n"
                                    "2,b,object(1);part(1),2,2,\n3,c,part(1),1,1,\n4,d,material(1),1,1,\n")
    (root / "c_object.csv").write_text("code,number,name,frequency,coverage\n" + c_object)
    (root / "c_part.csv").write_text("code,number,name,frequency,coverage\n" + c_part)
    Image.new("RGB", (8, 8)).save(root / "images/x.jpg")
    _png(root / "images/x_object.png", np.ones((4, 4), int))
    (root / "index.csv").write_text(HEADER + "x.jpg,train,8,8,4,4,,x_object.png,,,,\n"
                                    "y.jpg,train,8,8,4,4,,y_object.png,,,,\n")
    return root


def test_primary_category_ties_go_to_the_later_category(tmp_path):
    ds = BrodenDataset(_tiny(tmp_path / "b", "1,1,a,1,1.0\n2,2,b,1,0.5\n", "1,2,b,1,0.5\n2,3,c,1,0.2\n"),
                       categories=("object", "part"))
    assert ds.primary_category.tolist() == [-1, 0, 1, 1, -1]
    ds = BrodenDataset(_tiny(tmp_path / "c", "1,1,a,1,1.0\n2,2,b,1,0.9\n", "1,2,b,1,0.5\n2,3,c,1,0.2\n"),
                       categories=("object", "part"))
    assert ds.primary_category.tolist() == [-1, 0, 0, 1, -1]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist.*download broden"):
        BrodenDataset(tmp_path / "nowhere")
    root = _tiny(tmp_path / "b", "1,1,a,1,1.0\n", "1,3,c,1,0.2\n")
    with pytest.raises(ValueError, match=r"\['scene'\] are not in .*available: \['object', 'part'\]"):
        BrodenDataset(root, categories=("object", "scene"))
    ds = BrodenDataset(root, categories=("object", "part"))
    assert ds[0]["seg"].shape == (1, 4, 4)
    with pytest.raises(FileNotFoundError, match=r"line 3 \(image y.jpg\) references a missing file .*y_object.png"):
        ds[1]
    data = (root / "images/x_object.png").read_bytes()
    (root / "images/x_object.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    with pytest.raises(CorruptImageError, match="x_object.png"):
        ds[0]
    (root / "images/x_object.png").write_bytes(data)
    (root / "images/x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CorruptImageError, match="x.jpg"):
        ds[0]


# ---------------------------------------------------------------- malformed index.csv rows (issue 15, item 3)

@pytest.mark.parametrize("row,fields", [
    ("x.jpg,train,8,8,4,4,,x_object.png,,", 10),  # short: the image would be left out silently
    ("x.jpg,train,8,8,4,4,x_object.png,,,,", 11),  # one field missing: every later column shifts
    ("x.jpg,train,8,8,4,4,,x_object.png,,,,,", 13),  # one too many
])
def test_index_rows_with_the_wrong_number_of_fields_are_errors(tmp_path, row, fields):
    root = _tiny(tmp_path / "b", "1,1,a,1,1.0\n", "1,3,c,1,0.2\n")
    (root / "index.csv").write_text(HEADER + "x.jpg,train,8,8,4,4,,x_object.png,,,,\n" + row + "\n")
    with pytest.raises(ValueError, match=rf"index.csv line 3: {fields} fields, expected 12 "
                                         r"\(image,split,ih,iw,sh,sw,color,object,material,part,scene,texture\)"):
        BrodenDataset(root, categories=("object", "part"))


def test_blank_lines_in_index_are_skipped(tmp_path):
    root = _tiny(tmp_path / "b", "1,1,a,1,1.0\n", "1,3,c,1,0.2\n")
    (root / "index.csv").write_text(HEADER + "x.jpg,train,8,8,4,4,,x_object.png,,,,\n\n")
    assert len(BrodenDataset(root, categories=("object", "part"))) == 1


def test_label_numbers_absent_from_label_csv_fail_at_load(tmp_path):
    """An image-level label that label.csv does not list fails when the dataset is built (with its file,
    line and column); one in a label map fails as the map is decoded, naming the PNG and the row."""
    root = _tiny(tmp_path / "b", "1,1,a,1,1.0\n", "1,3,c,1,0.2\n")
    (root / "label.csv").write_text("number,name,category,frequency,coverage,syns\n1,a,object(1),1,1,\n"
                                    "2,b,object(1);part(1),2,2,\n3,c,part(1),1,1,\n6,f,scene(1),1,1,\n")
    (root / "category.csv").write_text("name,first,last,count,frequency\nobject,1,3,3,5\npart,1,3,2,5\n"
                                       "scene,6,6,1,1\n")
    (root / "c_scene.csv").write_text("code,number,name,frequency,coverage\n1,6,f,1,1.0\n")
    (root / "index.csv").write_text(HEADER + "x.jpg,train,8,8,4,4,,x_object.png,,,6,\n"
                                    "x.jpg,train,8,8,4,4,,x_object.png,,,5,\n")  # 5: a gap in label.csv
    with pytest.raises(ValueError, match=r"index.csv line 3, column scene: label 5 is not in .*label.csv"):
        BrodenDataset(root, categories=("object", "part", "scene"))
    (root / "index.csv").write_text(HEADER + "x.jpg,train,8,8,4,4,,x_object.png,,,6,\n"
                                    "x.jpg,train,8,8,4,4,,x_object.png,,,9,\n")  # 9: beyond the last label
    with pytest.raises(ValueError, match=r"line 3, column scene: label 9 is not in"):
        BrodenDataset(root, categories=("object", "part", "scene"))
    (root / "index.csv").write_text(HEADER + "x.jpg,train,8,8,4,4,,x_object.png,,,6,\n"
                                    "x.jpg,train,8,8,4,4,,y_object.png,,,6,\n")
    bad = np.ones((4, 4), int)
    bad[0, 0] = 4  # 4: not in label.csv
    _png(root / "images/y_object.png", bad)
    ds = BrodenDataset(root, categories=("object", "part", "scene"))
    assert ds[0]["image_labels"].tolist() == [6]
    with pytest.raises(ValueError, match=r"y_object.png \(index.csv line 3\) holds label\(s\) \[4\]"):
        ds[1]


def test_split_keeps_only_that_splits_rows(tmp_path):
    """Held-out dissection: with split="test" only the test rows are read; a split with no row, or an
    index without a split column, is an error naming the fix."""
    root = _tiny(tmp_path / "b", "1,1,a,1,1.0\n", "1,3,c,1,0.2\n")
    (root / "index.csv").write_text(HEADER + "x.jpg,train,8,8,4,4,,x_object.png,,,,\n"
                                    "y.jpg,test,8,8,4,4,,y_object.png,,,,\n")
    assert BrodenDataset(root, categories=("object", "part")).image_names == ["x.jpg", "y.jpg"]
    assert BrodenDataset(root, categories=("object", "part"), split="test").image_names == ["y.jpg"]
    with pytest.raises(ValueError, match="no labelled image of split 'val'"):
        BrodenDataset(root, categories=("object", "part"), split="val")
    (root / "index.csv").write_text("image,ih,iw,sh,sw,color,object,material,part,scene,texture\n"
                                    "x.jpg,8,8,4,4,,x_object.png,,,,\n")
    with pytest.raises(ValueError, match="no split column.*split=None"):
        BrodenDataset(root, categories=("object", "part"), split="test")
