"""Network Dissection: counting rules on hand-built cases, thresholds, tie rules, tally format."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from dka import dissection as D
from dka.cli.dissect import main as dissect_main

SHARED = Path(os.environ.get("DKA_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
REFERENCE_TALLY = SHARED / "reference" / "dka_resnet18_d5a_places365_layer4_tally.csv"


@pytest.fixture
def reference_tally() -> Path:
    if not REFERENCE_TALLY.is_file():
        pytest.skip(f"shared data not found at {SHARED} (set DKA_SHARED_DATA)")
    return REFERENCE_TALLY


# ------------------------------------------------------------------------------------- counting rules

def _acc(thresholds, primary, n_cat, seg_size):
    return D.TallyAccumulator(np.asarray(thresholds, float), np.asarray(primary), n_cat, seg_size)


def test_iou_hand_built_pixel_labels():
    # 4x4 seg, 1 unit, map at seg size (no upsampling); labels: 1 (cat 0), 2 (cat 1)
    primary = [-1, 0, 1]
    seg = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    seg[0, 0, :2, :] = 1  # 8 pixels of label 1 (top half)
    seg[0, 0, 3, 3] = 2  # 1 pixel of label 2
    fmap = torch.zeros(1, 1, 4, 4)
    fmap[0, 0, :2, :2] = 1.0  # 4 active pixels, all on label 1
    fmap[0, 0, 2, 0] = 1.0  # 1 active pixel on no label
    acc = _acc([0.5], primary, 2, (4, 4))
    acc.update(fmap, seg)
    c = acc.counts()
    np.testing.assert_array_equal(c.truth, [0, 8, 1])
    np.testing.assert_array_equal(c.intersect, [[0, 4, 0]])
    # active pixels touch label 1 (cat 0) only: category 1 gets nothing although label 2 is in the image
    np.testing.assert_array_equal(c.activation, [[5, 0]])
    iou = D.compute_iou(c, np.asarray(primary))
    assert iou[0, 1] == pytest.approx(4 / (5 + 8 - 4))
    assert iou[0, 2] == 0.0


def test_category_denominator_rule_over_images():
    primary = [-1, 0, 1]
    seg = torch.zeros(2, 1, 2, 2, dtype=torch.long)
    seg[0, 0, 0, 0] = 1
    seg[0, 0, 1, 1] = 2  # image 0: both categories annotated
    seg[1, 0, 0, 0] = 2  # image 1: category 1 only
    fmap = torch.zeros(2, 1, 2, 2)
    fmap[0, 0, 0, :] = 1.0  # image 0: 2 active pixels, touching label 1 only
    fmap[1, 0] = 1.0  # image 1: 4 active pixels, touching label 2
    acc = _acc([0.5], primary, 2, (2, 2))
    acc.update(fmap, seg)
    c = acc.counts()
    np.testing.assert_array_equal(c.activation, [[2, 4]])  # image 0 not counted toward category 1
    np.testing.assert_array_equal(c.intersect, [[0, 1, 1]])
    np.testing.assert_array_equal(c.truth, [0, 1, 2])


def test_image_level_label_rule():
    # label 3 is an image-level (scene) label of category 2
    primary = [-1, 0, 1, 2]
    seg = torch.zeros(1, 1, 3, 3, dtype=torch.long)
    seg[0, 0, 0, 0] = 1
    fmap = torch.zeros(1, 2, 3, 3)
    fmap[0, 0, 1:, 1:] = 1.0  # unit 0: 4 active pixels, none on label 1
    image_labels = torch.tensor([[3]])
    acc = _acc([0.5, 0.5], primary, 3, (3, 3))
    acc.update(fmap, seg, image_labels)
    c = acc.counts()
    assert c.truth[3] == 9  # the whole image
    assert c.intersect[0, 3] == 4  # every active pixel
    np.testing.assert_array_equal(c.activation[0], [0, 0, 4])  # only the image-level category
    np.testing.assert_array_equal(c.intersect[1], [0, 0, 0, 0])  # unit 1 never fires
    np.testing.assert_array_equal(c.activation[1], [0, 0, 0])
    iou = D.compute_iou(c, np.asarray(primary))
    assert iou[0, 3] == pytest.approx(4 / (4 + 9 - 4))


def test_multiple_layers_count_per_layer():
    # a pixel labelled in two layers (e.g. object and part) counts once for each label
    primary = [-1, 0, 1]
    seg = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    seg[0, 0] = 1
    seg[0, 1, 0, 0] = 2
    fmap = torch.ones(1, 1, 2, 2)
    acc = _acc([0.5], primary, 2, (2, 2))
    acc.update(fmap, seg)
    c = acc.counts()
    np.testing.assert_array_equal(c.truth, [0, 4, 1])
    np.testing.assert_array_equal(c.intersect, [[0, 4, 1]])
    np.testing.assert_array_equal(c.activation, [[4, 4]])


def _pil_upsample(fmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What NetDissect-Lite does: scipy's imresize(mode='F') = PIL bilinear on a float image."""
    return np.asarray(Image.fromarray(fmap.astype(np.float32), mode="F").resize(size[::-1], Image.BILINEAR))


def test_vectorised_tally_matches_loop_reference():
    rng = np.random.default_rng(0)
    n, units, h, sh = 6, 5, 4, 12
    primary = np.array([-1, 0, 0, 1, 1, 2, 2])
    features = rng.normal(size=(n, units, h, h)).astype(np.float32)
    seg = np.zeros((n, 2, sh, sh), dtype=np.int64)
    seg[:, 0] = rng.integers(0, 3, size=(n, sh, sh))  # labels 1, 2 (category 0)
    seg[:, 1] = rng.choice([0, 3, 4], size=(n, sh, sh))  # labels 3, 4 (category 1)
    image_labels = rng.choice([0, 5, 6], size=(n, 2))  # image-level labels 5, 6 (category 2)
    thresholds = np.quantile(features.transpose(1, 0, 2, 3).reshape(units, -1), 0.8, axis=1)
    acc = D.TallyAccumulator(thresholds, primary, 3, (sh, sh), chunk_bytes=2000)  # forces chunking
    acc.update(torch.from_numpy(features[:4]), torch.from_numpy(seg[:4]), torch.from_numpy(image_labels[:4]))
    acc.update(torch.from_numpy(features[4:]), torch.from_numpy(seg[4:]), torch.from_numpy(image_labels[4:]))
    c = acc.counts()
    truth, both, units_cat = D.reference_tally_loop(features, thresholds, seg, image_labels, primary, 3)
    np.testing.assert_array_equal(c.truth, truth)
    np.testing.assert_array_equal(c.intersect, both)
    np.testing.assert_array_equal(c.activation, units_cat)
    assert c.images == n


def test_torch_upsampling_equals_pil_bilinear():
    rng = np.random.default_rng(1)
    fmap = rng.normal(size=(7, 7)).astype(np.float32)
    ours = torch.nn.functional.interpolate(
        torch.from_numpy(fmap)[None, None], size=(112, 112), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(ours, _pil_upsample(fmap, (112, 112)), atol=1e-5)


# ------------------------------------------------------------------------------------------ thresholds

def _distributions():
    rng = np.random.default_rng(2)
    n, units = 40, 6
    x = rng.normal(size=(n, units, 3, 3)).astype(np.float32)
    x[:, 1] = np.maximum(x[:, 1], 0)  # ReLU: most of the mass on one value
    x[:, 2] = 0.25  # constant unit
    x[:, 3] = rng.integers(0, 4, size=(n, 3, 3))  # heavy ties
    x[:, 4] = rng.exponential(size=(n, 3, 3)) * 1e3  # wide range
    x[:, 5] = rng.uniform(size=(n, 3, 3))
    return x


@pytest.mark.parametrize("q", [D.QUANTILE, 0.5, 0.0, 1.0, 0.123])
def test_sorted_threshold_is_exact_numpy_quantile(q):
    x = _distributions()
    expected = np.quantile(x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).astype(np.float64), q, axis=1)
    got = D.quantile_thresholds_sorted(torch.from_numpy(x), q, chunk_bytes=3000)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("collect_limit,bins", [(1 << 16, 2048), (5, 4), (1, 2)])
def test_streaming_threshold_is_exact(collect_limit, bins):
    x = _distributions()
    expected = np.quantile(x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).astype(np.float64), D.QUANTILE, axis=1)
    stats = []
    got = D.quantile_thresholds_streaming(
        lambda: (torch.from_numpy(x[s : s + 7]) for s in range(0, len(x), 7)),
        D.QUANTILE, bins=bins, collect_limit=collect_limit, max_passes=64, stats=stats,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    if collect_limit < 10:
        assert stats[0].passes > 2  # refinement actually happened
        assert stats[0].passes < 64  # stops when an interval cannot shrink further
        assert stats[0].collected < x.size // 10  # only a few values (ties) are ever held


def test_streaming_threshold_error_bound_after_one_histogram():
    """With max_passes=2 (min/max + one histogram) the error is at most one bin width."""
    x = _distributions()
    flat = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).astype(np.float64)
    expected = np.quantile(flat, D.QUANTILE, axis=1)
    bins = 8
    got = D.quantile_thresholds_streaming(lambda: iter([torch.from_numpy(x)]), D.QUANTILE, bins=bins,
                                          collect_limit=0, max_passes=2)
    bound = (flat.max(axis=1) - flat.min(axis=1)) / bins
    assert np.all(np.abs(got - expected) <= bound + 1e-6)


def test_threshold_on_known_distribution():
    # uniform 0..999 per unit: the 994/999 quantile of 1000 equally spaced values is exactly 994
    x = torch.arange(1000, dtype=torch.float32).reshape(10, 1, 10, 10).repeat(1, 3, 1, 1)
    np.testing.assert_allclose(D.quantile_thresholds_sorted(x), [994.0] * 3)
    np.testing.assert_allclose(D.quantile_thresholds_streaming(lambda: iter([x]), bins=16, collect_limit=4), [994.0] * 3)


def test_strict_float32_threshold():
    thr = np.array([0.1, 1.0, 1 / 3, -0.7])
    t32 = D.thresholds.strict_float32_threshold(thr)
    for t, t64 in zip(t32, thr):
        up = np.nextafter(t, np.float32(np.inf))
        assert float(t) <= t64 < float(up) or float(t) == t64


# --------------------------------------------------------------------------------- tally frame / rules

def test_tie_rules_and_sorting():
    primary = np.array([-1, 0, 0, 1])
    names = ["-", "a", "b", "c"]
    counts = D.TallyCounts(
        truth=np.array([0, 10, 10, 10.0]),
        intersect=np.array([[0, 5, 5, 5.0], [0, 0, 0, 0], [0, 1, 8, 0]]),
        activation=np.array([[10, 10.0], [0, 0], [10, 10]]),
        images=1,
    )
    df = D.tally_frame(counts, primary, names, ["color", "scene"])
    assert list(df.columns) == D.tally_columns(["color", "scene"])
    assert list(df["unit"]) == [3, 1, 2]  # sorted by score, 1-based
    u1 = df.set_index("unit").loc[1]
    assert u1["color-label"] == "a"  # tie between labels 1 and 2 -> lowest label number
    assert u1["category"] == "scene"  # tie between categories -> the later one
    assert u1["label"] == "c" and u1["score"] == pytest.approx(5 / 15)
    u2 = df.set_index("unit").loc[2]
    assert u2["score"] == 0 and u2["label"] == "-"  # a dead unit
    u3 = df.set_index("unit").loc[3]
    assert (u3["label"], u3["color-intersect"], u3["color-truth"], u3["color-activation"]) == ("b", 8, 10, 10)


class _ToyBroden(torch.utils.data.Dataset):
    """In-memory stand-in for BrodenDataset: channel 0 of each image is the mask of concept 'disk'.

    The disk (4x4 of 32x32) is in every 4th image: 0.39% of all pixels, under the 0.5% that
    NetDissect's 994/999 threshold lets fire, so a unit that is exactly the disk mask fires exactly
    on it.
    """

    categories = ["color", "object"]
    label_names = ["-", "red-c", "disk", "square"]
    primary_category = np.array([-1, 0, 1, 1])
    seg_size = (32, 32)

    def __init__(self, n=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            seg = torch.zeros(2, 32, 32, dtype=torch.int32)
            seg[0] = 1  # colour everywhere
            y2, x2 = torch.randint(0, 26, (2,), generator=g).tolist()
            seg[1, y2 : y2 + 6, x2 : x2 + 6] = 3  # a square in every image
            if i % 4 == 0:
                y, x = torch.randint(0, 28, (2,), generator=g).tolist()
                seg[1, y : y + 4, x : x + 4] = 2  # the disk, on top
            img = torch.rand(3, 32, 32, generator=g)
            img[0] = (seg[1] == 2).float()
            self.items.append(dict(image=img, seg=seg, image_labels=torch.zeros(0, dtype=torch.long), index=i))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    @staticmethod
    def collate(batch):
        return dict(
            image=torch.stack([b["image"] for b in batch]),
            seg=torch.stack([b["seg"] for b in batch]),
            image_labels=torch.zeros(len(batch), 0, dtype=torch.long),
            index=torch.tensor([b["index"] for b in batch]),
        )


class _PlantedNet(nn.Module):
    """layer4 = the image itself: unit 1 is the disk mask, units 2 and 3 are noise; then a head."""

    def __init__(self, pool: int = 1):
        super().__init__()
        self.layer4 = nn.AvgPool2d(pool)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        f = self.layer4(x)
        return self.head(f.mean(dim=(2, 3)))


def test_planted_unit_gets_its_concept():
    ds = _ToyBroden()
    tally, details = D.dissect(_PlantedNet(), "layer4", ds, batch_size=6, device="cpu", progress=False,
                               return_details=True)
    assert list(tally.columns) == D.tally_columns(["color", "object"])
    top = tally.iloc[0]
    assert top["unit"] == 1 and top["label"] == "disk" and top["category"] == "object"
    assert top["score"] == pytest.approx(1.0, abs=1e-6)
    assert top["object-truth"] == 160 and top["object-intersect"] == 160 and top["object-activation"] == 160
    assert tally["score"].iloc[1:].max() < 0.1  # the noise units
    assert details.thresholds.shape == (3,)
    # same answer with the streaming threshold and with a memmap feature store
    tally2 = D.dissect(_PlantedNet(), "layer4", ds, batch_size=7, device="cpu", progress=False,
                       threshold_method="streaming", memory_budget=0)
    pd.testing.assert_frame_equal(tally.reset_index(drop=True), tally2.reset_index(drop=True))


def test_planted_unit_through_upsampling():
    # the map at half resolution: bilinear upsampling smears the disk's edge, but the label holds
    tally = D.dissect(_PlantedNet(pool=2), "layer4", _ToyBroden(), batch_size=8, progress=False)
    top = tally.iloc[0]
    assert top["unit"] == 1 and top["label"] == "disk" and top["score"] > 0.3


def test_unknown_layer_and_missing_dataset(tmp_path):
    with pytest.raises(KeyError, match="no module 'layer9'"):
        D.dissect(_PlantedNet(), "layer9", _ToyBroden(2), progress=False)
    with pytest.raises(ValueError, match="needs a \\(B, C, h, w\\) map"):
        D.dissect(_PlantedNet(), "head", _ToyBroden(2), progress=False)
    with pytest.raises(FileNotFoundError, match="broden1_224.zip"):
        D.dissect(_PlantedNet(), "layer4", tmp_path / "nowhere", progress=False)


# ---------------------------------------------------------------------------------------- tally files

def test_write_and_read_tally_roundtrip(tmp_path):
    ds = _ToyBroden(6)
    tally = D.dissect(_PlantedNet(), "layer4", ds, progress=False)
    path = D.write_tally(tally, tmp_path / "out" / "tally.csv")
    back = D.read_tally(path)
    pd.testing.assert_frame_equal(back, tally, check_dtype=False)
    assert not [p for p in path.parent.iterdir() if p.name != "tally.csv"]  # no temp file left
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"unit": [1], "x": [2]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="not a NetDissect tally"):
        D.read_tally(bad)


@pytest.mark.shared
def test_reference_tally_format_and_summary(reference_tally):
    ref = D.read_tally(reference_tally)
    assert list(ref.columns) == D.tally_columns(D.DEFAULT_CATEGORIES)
    assert D.tally_categories(ref) == list(D.DEFAULT_CATEGORIES)
    s = D.tally_summary(ref)
    assert (s["units"], s["interpretable_units"], s["unique_concepts"]) == (512, 441, 230)
    # our writer produces the same header line as the released file
    ours = D.tally_frame(
        D.TallyCounts(np.zeros(2), np.zeros((1, 2)), np.zeros((1, 5)), 0), np.array([-1, 0]), ["-", "x"],
        D.DEFAULT_CATEGORIES,
    )
    assert ",".join(ours.columns) == reference_tally.read_text().splitlines()[0]


def test_tally_differences_counts_cells_labels_and_headline():
    primary = np.array([-1, 0, 0, 1])
    names = ["-", "a", "b", "c"]
    counts = D.TallyCounts(truth=np.array([0, 10, 10, 10.0]),
                           intersect=np.array([[0, 5, 1, 0], [0, 0, 0, 0], [0, 1, 8, 0.0]]),
                           activation=np.array([[10, 10.0], [0, 0], [10, 10]]), images=1)
    before = D.tally_frame(counts, primary, names, ["color", "scene"])
    counts.intersect[0, 3] = 9  # unit 1 now prefers c (scene) over a
    after = D.tally_frame(counts, primary, names, ["color", "scene"], rules="netdissect")
    diff = D.tally_differences(before, after)
    assert diff["units"] == 3 and diff["cells_total"] == 3 * 13
    # unit 1: a (color) -> c (scene); the never-firing unit 2: label 0 named "-" -> "" (netdissect rules)
    assert diff["labels"] == 2 and diff["categories"] == 1
    assert diff["category_labels"] == 3  # every unit's scene column named label 0 before
    assert diff["by_field"]["<cat>-intersect"] == 1 and diff["by_field"]["<cat>-label"] == 4
    assert diff["headline"]["interpretable_units"] == (2, 2)
    assert diff["headline"]["mean_score"][1] > diff["headline"]["mean_score"][0]
    assert diff["row_order"] == 2
    assert D.tally_differences(before, before)["cells"] == 0
    with pytest.raises(ValueError, match="different units"):
        D.tally_differences(before, before.iloc[:2])


# ------------------------------------------------------------------ end to end through BrodenDataset

@pytest.fixture(scope="module")
def scenes_smoke(tmp_path_factory):
    scenes = pytest.importorskip("dka.data.scenes")
    pytest.importorskip("dka.data.broden")
    return scenes.generate("smoke", tmp_path_factory.mktemp("scenes") / "smoke", processes=1, progress=False)


@pytest.mark.slow
def test_end_to_end_on_scenes_smoke_matches_loop(scenes_smoke):
    from dka.data.broden import BrodenDataset
    from dka.models import build

    torch.manual_seed(0)
    model = build("res18-d[4,4,2]a", num_classes=4, stem="cifar", width=4).eval()
    ds = BrodenDataset(scenes_smoke)
    tally, details = D.dissect(model, "layer4", str(scenes_smoke), batch_size=64, progress=False, return_details=True)
    assert list(tally.columns) == D.tally_columns(ds.categories)
    assert sorted(tally["unit"]) == list(range(1, model.num_features + 1))
    assert tally["score"].is_monotonic_decreasing
    # the same counts as NetDissect-Lite's loop on the same features and thresholds
    loader = torch.utils.data.DataLoader(ds, batch_size=64, collate_fn=BrodenDataset.collate)
    cap = D.LayerCapture(model, "layer4")
    feats, segs, ils = [], [], []
    with torch.no_grad():
        for b in loader:
            feats.append(cap(model, b["image"]))
            segs.append(b["seg"])
            ils.append(b["image_labels"])
    feats = torch.cat(feats).numpy()
    layers = max(s.shape[1] for s in segs)
    seg = torch.cat([torch.nn.functional.pad(s, (0, 0, 0, 0, 0, layers - s.shape[1])) for s in segs]).long().numpy()
    m = max(i.shape[1] for i in ils)
    il = torch.cat([torch.nn.functional.pad(i, (0, m - i.shape[1])) for i in ils]).numpy()
    np.testing.assert_allclose(
        details.thresholds,
        np.quantile(feats.transpose(1, 0, 2, 3).reshape(feats.shape[1], -1).astype(np.float64), D.QUANTILE, axis=1),
        rtol=1e-6,
    )
    truth, both, units_cat = D.reference_tally_loop(feats, details.thresholds, seg, il, ds.primary_category,
                                                   len(ds.categories))
    np.testing.assert_array_equal(details.counts.truth, truth)
    np.testing.assert_array_equal(details.counts.intersect, both)
    np.testing.assert_array_equal(details.counts.activation, units_cat)
    # an internal dynamic layer, chosen by name
    inner = D.dissect(model, "layer3.0.conv1", ds, batch_size=128, progress=False)
    assert len(inner) == model.layer3[0].conv1.out_channels


@pytest.mark.slow
def test_cli_writes_tally(scenes_smoke, tmp_path):
    from dka.checkpoint import model_payload, save_atomic
    from dka.models import build

    model = build("res18-d2a", num_classes=4, stem="cifar", width=4)
    save_atomic(model_payload(model), tmp_path / "final.pt")
    rc = dissect_main(["--checkpoint", str(tmp_path / "final.pt"), "--layer", "layer4", "--data", str(scenes_smoke),
                 "--out", str(tmp_path / "dissect"), "--workers", "0", "--device", "cpu"])
    assert rc == 0
    tally = D.read_tally(tmp_path / "dissect" / "tally.csv")
    assert len(tally) == model.num_features
    thr = pd.read_csv(tmp_path / "dissect" / "thresholds.csv")
    assert list(thr.columns) == ["unit", "threshold"] and len(thr) == model.num_features
    assert sorted(p.name for p in (tmp_path / "dissect").iterdir()) == ["tally.csv", "thresholds.csv"]
    rc = dissect_main(["--checkpoint", str(tmp_path / "final.pt"), "--data", str(scenes_smoke), "--rules",
                       "netdissect", "--out", str(tmp_path / "nd"), "--workers", "0", "--device", "cpu"])
    assert rc == 0
    nd = D.read_tally(tmp_path / "nd" / "tally.csv")
    assert len(nd) == model.num_features and not nd.filter(like="label").isin(["-"]).any().any()
    nd_thr = pd.read_csv(tmp_path / "nd" / "thresholds.csv")["threshold"].to_numpy()
    assert not np.array_equal(nd_thr, thr["threshold"].to_numpy())  # NetDissect-Lite's sketch, not numpy's quantile


def test_feature_scratch_file_has_no_name_so_a_kill_leaves_nothing(tmp_path):
    """The memmap store used to be a named file in --out (6 GB at Broden scale) that SIGKILL left behind."""
    store = D.FeatureStore(10, (3, 2, 2), memory_budget=0, cache_dir=tmp_path)
    assert not store.in_memory
    x = torch.arange(10 * 12, dtype=torch.float32).view(10, 3, 2, 2)
    store.append(x[:6])
    store.append(x[6:])
    assert list(tmp_path.iterdir()) == []  # unnamed while in use: the kernel frees it with the process
    assert torch.equal(store.batch(0, 10), x)
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_cli_checks_arguments_before_out_and_cleans_leftovers(scenes_smoke, tmp_path, capsys):
    from dka.checkpoint import model_payload, save_atomic
    from dka.dirlock import exclusive
    from dka.models import build

    save_atomic(model_payload(build("res18", num_classes=4, stem="cifar", width=4)), tmp_path / "final.pt")
    out = tmp_path / "new" / "dissect"
    base = ["--checkpoint", str(tmp_path / "final.pt"), "--data", str(scenes_smoke), "--out", str(out),
            "--workers", "0", "--device", "cpu"]
    for extra, message in ((["--layer", "layer5"], "no module 'layer5'"),
                           (["--categories", "colour"], "categories ['colour'] are not in"),
                           (["--batch-size", "0"], "--batch-size must be >= 1")):
        with pytest.raises(SystemExit) as info:
            dissect_main([*base, *extra])
        assert info.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "new").exists()
    out.mkdir(parents=True)
    leftovers = [out / ".tally.csv.abcd1234.tmp", out / "dka-features-x1y2z3.f32"]  # what a killed run left
    for path in leftovers:
        path.write_bytes(b"\0" * 64)
    with exclusive(out):
        with pytest.raises(RuntimeError, match="holds its lock"):
            dissect_main(base)
    assert dissect_main(base) == 0
    assert sorted(p.name for p in out.iterdir()) == ["tally.csv", "thresholds.csv"]
