"""Network Dissection under NetDissect-Lite's rules (rules="netdissect"), on hand-made Broden folders.

The four places where NetDissect-Lite's output differs from the definition read literally (the
threshold rule, `0` entries of image-level fields, the name of label 0, PIL's resize arithmetic),
plus its stale category vector and its order of tied units. Expected values are worked out by hand
from NetDissect-Lite's code (util/vecquantile.py, feature_operation.py, loader/data_loader.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from dka import dissection as D
from dka.data.broden import BrodenDataset
from dka.data.images import IMAGENET_MEAN, IMAGENET_STD
from dka.data.scenes import encode_label_png
from dka.dissection.legacy_sort import legacy_argsort, legacy_order_at
from dka.dissection.lite_quantile import LiteQuantileSketch, lite_readout, netdissect_thresholds
from dka.dissection.pil_resize import pil_bilinear

HEADER = "image,split,ih,iw,sh,sw,color,object,material,part,scene,texture\n"


# ------------------------------------------------------------------------------ hand-made Broden folders

def write_broden(root: Path, images: dict[str, np.ndarray], rows: list[str], seg_maps: dict[str, np.ndarray],
                 labels: list[tuple[int, str, str]]) -> Path:
    """A Broden folder with Broden's five categories; `labels` = (number, name, category); images
    (H, W) uint8 become the red channel of a PNG (lossless, unlike JPEG)."""
    (root / "images").mkdir(parents=True)
    cats = ("color", "object", "part", "scene", "texture")
    (root / "category.csv").write_text("name,first,last,count,frequency\n" + "".join(
        f"{c},1,9,1,1\n" for c in cats))
    (root / "label.csv").write_text("number,name,category,frequency,coverage,syns\n" + "".join(
        f"{n},{name},{cat}(1),1,1.0,\n" for n, name, cat in labels))
    for c in cats:
        (root / f"c_{c}.csv").write_text("code,number,name,frequency,coverage\n" + "".join(
            f"{k},{n},{name},1,1.0\n" for k, (n, name, cat) in enumerate([x for x in labels if x[2] == c], 1)))
    for name, px in images.items():
        rgb = np.zeros(px.shape + (3,), np.uint8)
        rgb[..., 0] = px
        Image.fromarray(rgb).save(root / "images" / name)
    for name, lab in seg_maps.items():
        Image.fromarray(encode_label_png(lab.astype(np.int32))).save(root / "images" / name)
    (root / "index.csv").write_text(HEADER + "".join(r + "\n" for r in rows))
    return root


class PixelNet(nn.Module):
    """layer4 = the exact 0..255 red values of the image (ImageNet normalisation undone), a unit per
    entry of `units`: ("red", scale) or ("zero",)."""

    def __init__(self, units=(("red", 1.0),)):
        super().__init__()
        self.units = units
        self.layer4 = nn.Identity()
        self.head = nn.Linear(len(units), 2)

    def forward(self, x):
        red = torch.round((x[:, :1] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255)
        maps = [red * u[1] if u[0] == "red" else torch.zeros_like(red) for u in self.units]
        f = self.layer4(torch.cat(maps, dim=1))
        return self.head(f.mean(dim=(2, 3)))


def _folder_of_values(root: Path, values: list[int]) -> Path:
    """One 1x1 image per value, in this order, each with a 1x1 colour map of label 1."""
    images = {f"i{k}.png": np.array([[v]], np.uint8) for k, v in enumerate(values)}
    maps = {"c.png": np.ones((1, 1))}
    rows = [f"i{k}.png,train,1,1,1,1,c.png,,,,," for k in range(len(values))]
    return write_broden(root, images, rows, maps, [(1, "red-c", "color")])


# ------------------------------------------------------------------- 1. NetDissect-Lite's threshold rule

def test_readout_worked_by_hand_small():
    """4 values [3, 1, 4, 2] (summary <= 16 entries: numpy's insertion sort, stable).

    Summary [min 1, max 4, 3, 1, 4, 2], weights [0, 0, 1, 1, 1, 1]; sorted: 1(extreme, w 0), 1, 2, 3,
    4(extreme, w 0), 4. cumsum - w/2 = [0, .5, 1.5, 2.5, 3, 3.5] -> / 3.5 = [0, 1/7, 3/7, 5/7, 6/7, 1].
    At q = 499/999 (between 3/7 and 5/7): 2 + (q - 3/7) * 7/2 = 2.2482482...; at 994/999 (> 6/7):
    4, the maximum — with at most 99 values per unit the threshold is always the maximum.
    """
    x = np.array([3, 1, 4, 2], np.float32).reshape(4, 1, 1, 1)
    assert netdissect_thresholds(x, q=499 / 999)[0] == pytest.approx(2 + (499 / 999 - 3 / 7) * 3.5, rel=1e-7)
    assert netdissect_thresholds(x)[0] == 4.0
    rng = np.random.default_rng(0)
    many = rng.normal(size=(99, 3, 1, 1)).astype(np.float32)
    np.testing.assert_array_equal(netdissect_thresholds(many), many.max(axis=(0, 2, 3)))


def test_readout_worked_by_hand_partition():
    """20 values, summary of 22 entries: one partition step of numpy's quicksort, then insertion sorts.

    a) values 1..20 in order. Summary s = [1, 20, 1, 2, ..., 20]; pivot = median of s[0], s[10], s[21]
       = 9; the scans swap s[1] (the max extreme) with s[9] and meet at place 9, where the pivot goes;
       the right part [10..21] holds 19, 10..18, max extreme, 20 and is insertion-sorted (stable):
       the max extreme ends *before* the data max. Positions (cumsum(w) - w/2) / 19.5: value j at
       (j - 0.5) / 19.5; q = 900/999 -> 18 + (19.5 q - 17.5) = 18.0675675...
    b) values 1..10, 20, 11..19: the same step leaves the data max (s[12]) before the max extreme
       (moved to place 20): the extreme ends *last*, positions (j - 0.5) / 20, q = 900/999 ->
       18 + (20 q - 17.5) = 18.518018...
    numpy's linear quantile (dka's rule) gives 1 + 19 q = 18.117117... in both.
    """
    a = np.arange(1, 21, dtype=np.float32)
    b = np.r_[np.arange(1, 11), 20, np.arange(11, 20)].astype(np.float32)
    q = 900 / 999
    assert legacy_argsort(np.r_[1.0, 20.0, a])[-2:].tolist() == [1, 21]  # extreme before the data max
    assert legacy_argsort(np.r_[1.0, 20.0, b])[-2:].tolist() == [12, 1]  # extreme last
    assert netdissect_thresholds(a.reshape(20, 1, 1, 1), q=q)[0] == pytest.approx(18 + 19.5 * q - 17.5, rel=1e-7)
    assert netdissect_thresholds(b.reshape(20, 1, 1, 1), q=q)[0] == pytest.approx(18 + 20 * q - 17.5, rel=1e-7)
    assert np.quantile(a, q) == pytest.approx(1 + 19 * q)


def _golden_features(images: int, h: int, w: int) -> np.ndarray:
    """Deterministic features of 3 units (a ReLU-like tie at 0, coarse values, uniform) from integer
    hashing, so they are the same on every platform."""
    n = images * h * w
    u = ((np.arange(n, dtype=np.uint64) * np.uint64(2654435761)) % np.uint64(1 << 32)).astype(np.float64) / 2**32
    u = u.reshape(images, 1, h, w)
    return np.concatenate([np.maximum(u - 0.6, 0), np.round(u * 8) / 8, u], axis=1).astype(np.float32)


@pytest.mark.parametrize("images,h,w,expected", [
    # 14,700 values per unit: inside the sketch's exact regime
    (300, 7, 7, ["0x1.9477800d9125dp-2", "0x1.0000000000000p+0", "0x1.fd6ef406c892fp-1"]),
    # 48,000 values per unit: beyond it (one compaction, random draws from RandomState(1))
    (3000, 4, 4, ["0x1.94766cbe2e6e3p-2", "0x1.0000000000000p+0", "0x1.fd6e6a0fca85dp-1"]),
])
def test_thresholds_equal_netdissect_lites_own_output(images, h, w, expected):
    """The expected values are NetDissect-Lite's: its util/vecquantile.py fed as quantile_threshold
    feeds it, run under numpy's scalar sort (bench/netdissect_crosscheck.py reproduces them)."""
    x = _golden_features(images, h, w)
    got = netdissect_thresholds(torch.from_numpy(x))
    assert [float(v).hex() for v in got] == expected
    chunks = netdissect_thresholds(lambda: (torch.from_numpy(x[s : s + 100]) for s in range(0, images, 100)))
    np.testing.assert_array_equal(chunks, got)  # regrouped into NetDissect-Lite's 64-image feeds
    linear = np.quantile(x.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64), D.QUANTILE, axis=1)
    assert not np.array_equal(got, linear)


def test_sketch_exact_regime_closed_form():
    """Up to 24,576 values per unit: threshold = linear interpolation of the sorted values at rank
    q*b - 1/2, b = n if the max extreme sorts last, else n - 1/2 (the min extreme always sorts first)."""
    rng = np.random.default_rng(3)
    x = np.maximum(rng.normal(size=(500, 4, 3, 3)), 0).astype(np.float32)  # 4,500 values, many zeros
    sketch = LiteQuantileSketch(4)
    sketch.add(x.transpose(0, 2, 3, 1).reshape(-1, 4).astype(np.float64))
    assert sketch.exact
    values, weights = sketch.summary()
    got = netdissect_thresholds(x)
    q = 994 / 999
    for u in range(4):
        order = legacy_argsort(values[u])
        assert order[0] == 0  # the min extreme
        b = 4500.0 if order[-1] == 1 else 4499.5
        s = np.sort(x[:, u].ravel().astype(np.float64))
        r = q * b - 0.5
        expected = s[int(r)] + (r - int(r)) * (s[int(r) + 1] - s[int(r)])
        assert got[u] == pytest.approx(expected, rel=1e-6)
        assert got[u] == lite_readout(values[u], weights, q)


def test_legacy_sort_order_at_agrees_with_full_sort():
    rng = np.random.default_rng(4)
    for n in (17, 200, 3000):
        v = rng.integers(0, 6, size=n).astype(float)
        full = legacy_argsort(v)
        picks = rng.integers(0, n, size=5)
        part = legacy_order_at(v, picks)
        np.testing.assert_array_equal(part[picks], full[picks])
        np.testing.assert_array_equal(v[part], np.sort(v))


def _scalar_numpy_env() -> dict | None:
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__  # type: ignore
    except ImportError:
        return None
    env = dict(os.environ)
    env["NPY_DISABLE_CPU_FEATURES"] = " ".join(f for f in __cpu_dispatch__ if __cpu_features__.get(f))
    return env


def _killer(n: int) -> np.ndarray:
    """A median-of-three adversary: drives the classic quicksort into its heapsort fallback."""
    d = np.arange(n)
    x = d
    while x.size > 3:
        mid = x.size // 2
        x[mid], x[-2] = x[-2], x[mid]
        x = x[:-2]
    return d.astype(float)


def test_legacy_argsort_equals_numpys_scalar_sort(tmp_path):
    """numpy's own scalar introsort (SIMD dispatch switched off) orders ties exactly as legacy_argsort."""
    env = _scalar_numpy_env()
    if env is None:
        pytest.skip("this numpy has no CPU-dispatch table")
    rng = np.random.default_rng(5)
    cases = [rng.integers(0, 4, size=n).astype(float) for n in (5, 16, 17, 40, 1000, 5000)]
    cases += [np.maximum(rng.normal(size=3000), 0), _killer(3000), _killer(2000) // 3]
    np.savez(tmp_path / "cases.npz", *cases)
    script = ("import numpy as np, sys; c = np.load(sys.argv[1]); "
              "np.savez(sys.argv[2], *[np.argsort(c[k]) for k in sorted(c.files, key=lambda s: int(s[4:]))])")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cases.npz"), str(tmp_path / "out.npz")],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"numpy refused NPY_DISABLE_CPU_FEATURES: {done.stderr[-300:]}")
    out = np.load(tmp_path / "out.npz")
    for k, case in enumerate(cases):
        np.testing.assert_array_equal(legacy_argsort(case), out[f"arr_{k}"], err_msg=f"case {k}")


def test_threshold_in_dissect_on_a_folder(tmp_path):
    """The 20 values of case (b) above as 20 one-pixel images: dissect picks the rule by `rules`."""
    values = [*range(1, 11), 20, *range(11, 20)]
    root = _folder_of_values(tmp_path / "b", values)
    q = 900 / 999
    _, nd = D.dissect(PixelNet(), "layer4", root, quantile=q, rules="netdissect", progress=False,
                      return_details=True)
    _, lin = D.dissect(PixelNet(), "layer4", root, quantile=q, progress=False, return_details=True)
    assert nd.threshold_method == "netdissect" and nd.rules == "netdissect"
    assert nd.thresholds[0] == pytest.approx(18 + 20 * q - 17.5, rel=1e-7)
    assert lin.thresholds[0] == pytest.approx(1 + 19 * q)
    tally, nd = D.dissect(PixelNet(), "layer4", root, rules="netdissect", progress=False, return_details=True)
    assert nd.thresholds[0] == 20.0 and tally["score"].iloc[0] == 0  # 20 values: nothing can fire
    with pytest.raises(ValueError, match="can only be read at i/999"):
        D.dissect(PixelNet(), "layer4", root, quantile=0.9, rules="netdissect", progress=False)
    with pytest.raises(ValueError, match="threshold_method"):
        D.dissect(PixelNet(), "layer4", root, rules="netdissect", threshold_method="sorted", progress=False)
    with pytest.raises(ValueError, match="unknown dissection rules 'lite'"):
        D.dissect(PixelNet(), "layer4", root, rules="lite", progress=False)


# ------------------------------------------------ 2 + 3. `0` in image-level fields; the name of label 0

def _zero_folder(root: Path) -> Path:
    """Six 2x2 images; the unit is the red channel (200 on 4 pixels, 0 elsewhere), cut at the median
    (0 under both rules), so the active pixels are exactly the 200s.

    image  red (row-major)  colour map (label 1)  scene  texture
    0      200 200 0 0      top row               2      0
    1      200 0 0 0        pixel 0               0
    2      0 0 0 0          everywhere            2      3
    3      0 0 0 200        nowhere               -      3
    4, 5   0 0 0 0          pixel 0
    """
    red = {0: [200, 200, 0, 0], 1: [200, 0, 0, 0], 2: [0] * 4, 3: [0, 0, 0, 200], 4: [0] * 4, 5: [0] * 4}
    colour = {0: [1, 1, 0, 0], 1: [1, 0, 0, 0], 2: [1] * 4, 3: [0] * 4, 4: [1, 0, 0, 0], 5: [1, 0, 0, 0]}
    scene = {0: "2", 1: "0", 2: "2"}
    texture = {0: "0", 2: "3", 3: "3"}
    images = {f"i{k}.png": np.array(v, np.uint8).reshape(2, 2) for k, v in red.items()}
    maps = {f"c{k}.png": np.array(v).reshape(2, 2) for k, v in colour.items()}
    rows = [f"i{k}.png,train,2,2,2,2,c{k}.png,,,,{scene.get(k, '')},{texture.get(k, '')}" for k in red]
    return write_broden(root, images, rows, maps, [(1, "red-c", "color"), (2, "sky-s", "scene"),
                                                   (3, "striped", "texture")])


def test_zero_image_labels_count_as_label_0_and_win_the_last_category(tmp_path):
    """Hand counts (categories color, object, part, scene, texture; label 0 counts toward texture, the last):
    truth: red-c 9, sky-s 8, striped 8, label 0 8 (two 2x2 images carry a `0`).
    The unit fires on image 0 (2 px, both red-c), 1 (1 px, red-c), 3 (1 px, no pixel label).
    intersect: red-c 3, sky-s 2, striped 1, label 0 3 (images 0 and 1).
    activation: color 3, scene 2, texture 4 (image 0: 2 via its `0`, image 1: 1, image 3: 1 via
    striped) — under dka's rules texture gets only image 3's 1 pixel.
    IoU: red-c 3/9, label 0 3/(4+8-3) = 3/9, striped 1/(4+8-1) = 1/11 (dka: 1/8), sky-s 2/8.
    A tie between colour and texture goes to the later category: label 0 wins the unit.
    """
    root = _zero_folder(tmp_path / "z")
    q = 500 / 999
    nd_tally, nd = D.dissect(PixelNet((("red", 1.0), ("zero",))), "layer4", root, quantile=q, rules="netdissect",
                             progress=False, return_details=True)
    np.testing.assert_array_equal(nd.counts.truth, [8, 9, 8, 8])
    np.testing.assert_array_equal(nd.counts.intersect[0], [3, 3, 2, 1])
    np.testing.assert_array_equal(nd.counts.activation[0], [3, 0, 0, 2, 4])
    unit = nd_tally.set_index("unit").loc[1]
    assert (unit["category"], unit["label"]) == ("texture", "")
    assert unit["score"] == pytest.approx(3 / 9)
    assert unit["texture-truth"] == 8 and unit["texture-truth"] % 4 == 0  # a multiple of sh*sw
    assert unit["color-label"] == "red-c" and unit["color-iou"] == pytest.approx(3 / 9)

    dka_tally, dk = D.dissect(PixelNet((("red", 1.0), ("zero",))), "layer4", root, quantile=q, progress=False,
                              return_details=True)
    np.testing.assert_array_equal(dk.counts.truth, [0, 9, 8, 8])
    np.testing.assert_array_equal(dk.counts.intersect[0], [0, 3, 2, 1])
    np.testing.assert_array_equal(dk.counts.activation[0], [3, 0, 0, 2, 1])
    unit = dka_tally.set_index("unit").loc[1]
    assert (unit["category"], unit["label"], unit["texture-label"]) == ("color", "red-c", "striped")
    assert unit["texture-iou"] == pytest.approx(1 / 8)


def test_label_0_is_written_as_an_empty_string(tmp_path):
    """Unit 2 never fires: every category's best label is label 0, named '' by NetDissect-Lite
    (label.csv has no row 0: its dense label array fills the gap with an empty name), '-' by dka."""
    root = _zero_folder(tmp_path / "z")
    model = PixelNet((("red", 1.0), ("zero",)))
    for rules, name in (("netdissect", ""), ("dka", "-")):
        tally = D.dissect(model, "layer4", root, quantile=500 / 999, rules=rules, progress=False)
        path = D.write_tally(tally, tmp_path / rules / "tally.csv")
        line = next(x for x in path.read_text().splitlines() if x.startswith("2,"))
        fields = line.split(",")
        assert fields[1:3] == ["texture", name]
        assert [fields[4 + 5 * c] for c in range(5)] == [name] * 5  # each category's label
        back = D.read_tally(path).set_index("unit").loc[2]
        assert back["label"] == name and back["scene-label"] == name


def test_broden_keeps_zero_only_in_number_fields(tmp_path):
    root = _zero_folder(tmp_path / "z")
    dka_ds, nd_ds = BrodenDataset(root), BrodenDataset(root, zero_image_labels=True)
    assert dka_ds[0]["image_labels"].tolist() == [2] and nd_ds[0]["image_labels"].tolist() == [2, 0]
    assert dka_ds[1]["image_labels"].tolist() == [] and nd_ds[1]["image_labels"].tolist() == [0]
    batch = BrodenDataset.collate([nd_ds[0], nd_ds[1], nd_ds[4]])
    assert batch["image_labels"].tolist() == [[2, 0], [0, -1], [-1, -1]]  # -1 pads: 0 is a label here
    # a row whose only entry is 0 is no image for either reader (NetDissect-Lite's index_has_any_data)
    index = (root / "index.csv").read_text() + "i5.png,train,2,2,2,2,,,,,0,0\n"
    (root / "index.csv").write_text(index)
    assert len(BrodenDataset(root)) == len(BrodenDataset(root, zero_image_labels=True)) == 6


# --------------------------------------------------------------------- 4. upsampling at non-integer scales

@pytest.mark.parametrize("h,w,sh,sw", [(7, 7, 112, 112), (3, 3, 7, 7), (5, 4, 37, 23), (2, 2, 64, 64),
                                       (13, 9, 7, 5), (1, 3, 4, 9)])
def test_pil_bilinear_equals_pil_bit_for_bit(h, w, sh, sw):
    rng = np.random.default_rng(h * 100 + sw)
    maps = rng.normal(size=(6, h, w)).astype(np.float32) * 3
    ours = pil_bilinear(torch.from_numpy(maps), (sh, sw)).numpy()
    for k in range(len(maps)):
        pil = np.asarray(Image.fromarray(maps[k], mode="F").resize((sw, sh), Image.BILINEAR))
        np.testing.assert_array_equal(ours[k], pil)


def test_torch_upsampling_differs_from_pil_in_the_last_bit():
    """The limit of the dka rules: torch's bilinear is PIL's only to float32 rounding (here at 3 -> 7)."""
    rng = np.random.default_rng(7)
    maps = rng.normal(size=(20, 3, 3)).astype(np.float32)
    torch_up = torch.nn.functional.interpolate(torch.from_numpy(maps)[None], size=(7, 7), mode="bilinear",
                                               align_corners=False)[0].numpy()
    pil_up = pil_bilinear(torch.from_numpy(maps), (7, 7)).numpy()
    assert (torch_up != pil_up).any()
    np.testing.assert_allclose(torch_up, pil_up, rtol=0, atol=1e-5)


def test_a_pixel_at_the_threshold_follows_pils_arithmetic():
    """A threshold set between torch's and PIL's value of one upsampled pixel: the netdissect rules
    count it as PIL (NetDissect-Lite's imresize) does; dka's torch upsampling does not."""
    rng = np.random.default_rng(8)
    for _ in range(100):
        fmap = rng.normal(size=(1, 1, 3, 3)).astype(np.float32)
        t = torch.nn.functional.interpolate(torch.from_numpy(fmap), size=(7, 7), mode="bilinear",
                                            align_corners=False)[0, 0].numpy()
        p = pil_bilinear(torch.from_numpy(fmap), (7, 7))[0, 0].numpy()
        diff = np.argwhere(t != p)
        if len(diff):
            break
    y, x = diff[0]
    thr = float(min(t[y, x], p[y, x]))  # exactly one of the two values is above it
    seg = torch.zeros(1, 1, 7, 7, dtype=torch.long)
    seg[0, 0, y, x] = 1
    counts = {}
    for rules in ("dka", "netdissect"):
        acc = D.TallyAccumulator(np.array([thr]), np.array([-1, 0]), 1, (7, 7), rules=rules)
        acc.update(torch.from_numpy(fmap), seg, torch.full((1, 1), -1))
        counts[rules] = acc.counts().intersect[0, 1]
    pil_full = np.asarray(Image.fromarray(fmap[0, 0], mode="F").resize((7, 7), Image.BILINEAR))
    assert counts["netdissect"] == float(pil_full[y, x] > thr)
    assert counts["dka"] != counts["netdissect"]


def test_non_integer_scale_folder_matches_netdissect_loop(tmp_path):
    """3x3 images, 7x7 label maps: dissect's counts under "netdissect" equal NetDissect-Lite's loop
    (PIL's own resize) count for count."""
    rng = np.random.default_rng(9)
    images, maps, rows = {}, {}, []
    for k in range(40):
        images[f"i{k}.png"] = rng.integers(0, 256, size=(3, 3)).astype(np.uint8)
        maps[f"c{k}.png"] = rng.integers(0, 3, size=(7, 7))
        rows.append(f"i{k}.png,train,3,3,7,7,c{k}.png,,,,{1 + 2 * (k % 2)},")
    root = write_broden(tmp_path / "s", images, rows, maps, [(1, "red-c", "color"), (2, "blue-c", "color"),
                                                              (3, "sky-s", "scene")])
    model = PixelNet((("red", 1.0), ("red", -1.0)))
    _, details = D.dissect(model, "layer4", root, rules="netdissect", quantile=900 / 999, progress=False,
                           return_details=True)
    ds = BrodenDataset(root, zero_image_labels=True)
    batch = BrodenDataset.collate([ds[i] for i in range(len(ds))])
    feats = D.LayerCapture(model, "layer4")(model, batch["image"]).numpy()
    truth, both, units_cat = D.reference_tally_loop(
        feats, details.thresholds, batch["seg"].long().numpy(), batch["image_labels"].numpy(),
        ds.primary_category, len(ds.categories), rules="netdissect", has_maps=batch["has_maps"].numpy())
    np.testing.assert_array_equal(details.counts.truth, truth)
    np.testing.assert_array_equal(details.counts.intersect, both)
    np.testing.assert_array_equal(details.counts.activation, units_cat)
    assert both.sum() > 0


# ----------------------------------------------------- NetDissect-Lite's loop state and its order of ties

def test_image_without_label_maps_reuses_the_stale_category_vector(tmp_path):
    """NetDissect-Lite's tally keeps `tally_cat` across pairs: image 1 has only a scene label, so its
    firing pair reuses image 0's vector (colour: its active pixel is red-c) plus its own scene.

    Unit = red channel, cut at the median (0): image 0 fires on 1 px (red-c), image 1 on 2 px, the
    two blank scene-only images not at all.
    activation (color, object, part, scene, texture): dka 1, 0, 0, 2, 0 (image 1 counts toward its
    own scene only); netdissect 1 + 2, 0, 0, 2, 0.
    """
    images = {"i0.png": np.array([[200, 0], [0, 0]], np.uint8), "i1.png": np.array([[200, 200], [0, 0]], np.uint8),
              "z.png": np.zeros((2, 2), np.uint8)}
    maps = {"c0.png": np.array([[1, 0], [0, 0]])}
    rows = ["i0.png,train,2,2,2,2,c0.png,,,,,", "i1.png,train,2,2,2,2,,,,,2,", "z.png,train,2,2,2,2,,,,,2,",
            "z.png,train,2,2,2,2,,,,,2,"]
    root = write_broden(tmp_path / "m", images, rows, maps, [(1, "red-c", "color"), (2, "sky-s", "scene")])
    q = 500 / 999
    _, nd = D.dissect(PixelNet(), "layer4", root, quantile=q, rules="netdissect", progress=False, return_details=True)
    _, dk = D.dissect(PixelNet(), "layer4", root, quantile=q, progress=False, return_details=True)
    np.testing.assert_array_equal(dk.counts.activation[0], [1, 0, 0, 2, 0])
    np.testing.assert_array_equal(nd.counts.activation[0], [3, 0, 0, 2, 0])
    # the same on NetDissect-Lite's loop, and an error where that loop fails
    fm = np.array([[[[200, 0], [0, 0]]], [[[200, 200], [0, 0]]]], np.float32)
    seg = np.array([[[[1, 0], [0, 0]]], [[[0, 0], [0, 0]]]])
    il = np.array([[-1], [2]])
    primary = np.array([-1, 0, 1])
    _, _, act = D.reference_tally_loop(fm, np.array([0.0]), seg, il, primary, 3, rules="netdissect",
                                       has_maps=np.array([True, False]))
    np.testing.assert_array_equal(act[0], [3, 2, 0])
    acc = D.TallyAccumulator(np.array([0.0]), primary, 3, (2, 2), rules="netdissect")
    with pytest.raises(ValueError, match="first firing image has no label map"):
        acc.update(torch.from_numpy(fm[1:]), torch.from_numpy(seg[1:]), torch.tensor([[2]]), torch.tensor([False]))


def test_units_with_equal_scores_in_netdissect_lites_order():
    units = 40
    counts = D.TallyCounts(truth=np.array([0, 10.0]), intersect=np.zeros((units, 2)),
                           activation=np.zeros((units, 1)), images=1)
    counts.intersect[5, 1] = counts.activation[5, 0] = 5  # one unit with a score; 39 tied at 0
    nd = D.tally_frame(counts, np.array([-1, 0]), ["-", "a"], ["color"], rules="netdissect")
    dk = D.tally_frame(counts, np.array([-1, 0]), ["-", "a"], ["color"])
    scores = np.zeros(units)
    scores[5] = 0.5
    assert list(nd["unit"]) == list(legacy_argsort(scores)[::-1] + 1)  # score.argsort()[::-1]
    assert list(dk["unit"]) == [6] + [u for u in range(1, units + 1) if u != 6]
    assert nd["unit"].iloc[0] == 6 and list(nd["unit"]) != list(dk["unit"])
    assert nd["label"].iloc[1] == "" and dk["label"].iloc[1] == "-"


@pytest.mark.shared
def test_released_tally_shows_label_0_from_zero_entries(shared_data):
    """The authors' tally (NetDissect-Lite on broden1_224): texture columns naming label 0 ('') with
    IoU > 0 and a truth that is a multiple of 112 x 112 — only `0` entries of index.csv give that."""
    ref = D.read_tally(shared_data / "reference" / "dka_resnet18_d5a_places365_layer4_tally.csv")
    empty = ref[ref["texture-label"] == ""]
    assert len(empty) > 0 and (empty["texture-iou"] > 0).any()
    assert (empty["texture-truth"] % (112 * 112) == 0).all() and (empty["texture-truth"] > 0).all()
    assert not (ref["label"] == "-").any()
