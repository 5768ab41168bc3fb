"""Benchmark Network Dissection: images/s on a concept-scenes export, and the threshold's cost.

Prints three tables (numbers measured in this run; ratios against a baseline measured in the same run):

1. concept scenes end to end (dka.data.broden.BrodenDataset on a scenes export): feature pass,
   threshold, tally pass, in images/s; baseline = NetDissect-Lite's per-unit, per-image loop tally
   (PIL bilinear resize + bincount) on the same features for the first images;
2. the tally alone at paper shape (512 units, 7x7 maps -> 112x112 segmentations, 6 label layers):
   vectorised vs the loop, images/s;
3. the threshold: exact selection over stored features ("sorted") vs the bounded-memory streaming
   histogram refinement (also exact), seconds and max |difference|.

    .venv/bin/python bench/dissect.py [--preset smoke|demo32] [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dka import dissection as D


def loop_tally(features: np.ndarray, thresholds: np.ndarray, seg: np.ndarray, image_labels: np.ndarray,
               primary: np.ndarray, n_cat: int) -> float:
    """Seconds taken by NetDissect-Lite's tally loop (dka.dissection.reference_tally_loop)."""
    start = time.perf_counter()
    D.reference_tally_loop(features, thresholds, seg, image_labels, primary, n_cat)
    return time.perf_counter() - start


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_scenes(preset: str, device: torch.device, batch_size: int, loop_images: int) -> None:
    from dka.data.broden import BrodenDataset
    from dka.data.scenes import generate
    from dka.models import build

    root = Path(tempfile.gettempdir()) / f"dka-bench-scenes-{preset}"
    t0 = time.perf_counter()
    generate(preset, root, progress=False)
    print(f"concept scenes {preset} at {root} (generated/cached in {time.perf_counter() - t0:.1f} s)")
    ds = BrodenDataset(root)
    n = len(ds)
    model = build("res18", num_classes=10, stem="cifar", width=16).to(device).eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=BrodenDataset.collate)
    capture = D.LayerCapture(model, "layer4")
    t0 = time.perf_counter()
    store = None
    segs = []
    with torch.no_grad():
        for batch in loader:
            f = capture(model, batch["image"].to(device))
            if store is None:
                store = D.FeatureStore(n, tuple(f.shape[1:]), 1 << 31, None)
            store.append(f)
            segs.append((batch["seg"], batch["image_labels"]))
    _sync(device)
    t_feat = time.perf_counter() - t0
    t0 = time.perf_counter()
    thr = D.quantile_thresholds_sorted(store.data, device=device)
    t_thr = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc = D.TallyAccumulator(thr, ds.primary_category, len(ds.categories), ds.seg_size, device=device)
    start = 0
    for seg, il in segs:
        acc.update(store.batch(start, start + seg.shape[0]), seg, il)
        start += seg.shape[0]
    _sync(device)
    t_tally = time.perf_counter() - t0
    t0 = time.perf_counter()
    tally = D.dissect(model, "layer4", ds, batch_size=batch_size, device=device, progress=False)
    _sync(device)
    t_total = time.perf_counter() - t0
    # loop baseline on the first images (same features, same thresholds)
    k = min(loop_images, n)
    seg_np = torch.cat([s for s, _ in segs])[:k].numpy().astype(np.int64)
    il_list = [il for _, il in segs]
    m = max(x.shape[1] for x in il_list)
    il_np = torch.cat([torch.nn.functional.pad(x, (0, m - x.shape[1]), value=-1) for x in il_list])[:k].numpy()
    t_loop = loop_tally(store.batch(0, k).numpy(), thr, seg_np, il_np, ds.primary_category, len(ds.categories))
    units, h, w = store.shape[1:]
    print(f"{n} images, layer4 = {units} units x {h}x{w}, seg {ds.seg_size}, {len(ds.label_names) - 1} labels, "
          f"device {device}")
    print(f"{'phase':<34}{'seconds':>9}{'images/s':>11}")
    for name, t, imgs in [("feature pass (res18 w16)", t_feat, n), ("threshold (sorted, exact)", t_thr, n),
                          ("tally pass (vectorised)", t_tally, n), (f"tally loop baseline ({k} images)", t_loop, k),
                          ("dissect() end to end", t_total, n)]:
        print(f"{name:<34}{t:>9.3f}{imgs / t:>11.0f}")
    print(f"tally: vectorised / loop = {(n / t_tally) / (k / t_loop):.1f}x images/s; "
          f"{D.tally_summary(tally)['interpretable_units']}/{units} units IoU >= 0.04 (untrained model)")
    store.close()


def bench_paper_shape(device: torch.device, images: int, loop_images: int) -> None:
    rng = np.random.default_rng(0)
    units, h, sh, n_lab, n_cat = 512, 7, 112, 1198, 5
    primary = rng.integers(0, n_cat, size=n_lab)
    primary[0] = -1
    feats = np.maximum(rng.normal(size=(images, units, h, h)), 0).astype(np.float32)
    # ~20 labels per image over 6 layers, as in Broden (object, part x2, color, plus blanks)
    seg = np.zeros((images, 6, sh, sh), dtype=np.int64)
    for i in range(images):
        for layer in range(4):
            labs = rng.choice(np.arange(1, n_lab), size=5, replace=False)
            blocks = rng.integers(0, 5, size=(sh // 16, sh // 16))
            seg[i, layer] = np.kron(labs[blocks], np.ones((16, 16), dtype=np.int64))
    image_labels = rng.integers(0, n_lab, size=(images, 2))
    thr = D.quantile_thresholds_sorted(torch.from_numpy(feats))
    acc = D.TallyAccumulator(thr, primary, n_cat, (sh, sh), device=device)
    f_t, s_t, i_t = torch.from_numpy(feats), torch.from_numpy(seg), torch.from_numpy(image_labels)
    acc.update(f_t[:2], s_t[:2], i_t[:2])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, images, 64):
        acc.update(f_t[s : s + 64], s_t[s : s + 64], i_t[s : s + 64])
    _sync(device)
    t_vec = time.perf_counter() - t0
    k = min(loop_images, images)
    t_loop = loop_tally(feats[:k], thr, seg[:k], image_labels[:k], primary, n_cat)
    print(f"\npaper shape tally: {units} units, {h}x{h} -> {sh}x{sh}, 6 label layers, {n_lab} labels, device {device}")
    print(f"{'method':<34}{'images':>8}{'seconds':>9}{'images/s':>11}")
    print(f"{'vectorised (TallyAccumulator)':<34}{images:>8}{t_vec:>9.2f}{images / t_vec:>11.1f}")
    print(f"{'loop (NetDissect-Lite)':<34}{k:>8}{t_loop:>9.2f}{k / t_loop:>11.1f}")
    print(f"ratio vectorised / loop: {(images / t_vec) / (k / t_loop):.1f}x")


def bench_thresholds(device: torch.device, images: int) -> None:
    rng = np.random.default_rng(1)
    units, h = 512, 7
    feats = torch.from_numpy(np.maximum(rng.normal(size=(images, units, h, h)), 0).astype(np.float32))
    t0 = time.perf_counter()
    exact = D.quantile_thresholds_sorted(feats, device=device)
    t_sorted = time.perf_counter() - t0
    stats: list = []
    t0 = time.perf_counter()
    streamed = D.quantile_thresholds_streaming(lambda: (feats[s : s + 256] for s in range(0, images, 256)),
                                               device=device, stats=stats)
    t_stream = time.perf_counter() - t0
    values = images * units * h * h
    print(f"\nthresholds: {images} images x {units} units x {h}x{h} = {values / 1e6:.1f} M activations, device {device}")
    print(f"{'method':<34}{'seconds':>9}{'M values/s':>12}{'work memory':>14}")
    print(f"{'sorted (exact selection)':<34}{t_sorted:>9.2f}{values / 1e6 / t_sorted:>12.1f}"
          f"{'%.0f MB' % (min(values, 256 << 18) * 4 / 1e6):>14}")
    print(f"{'streaming (histogram refinement)':<34}{t_stream:>9.2f}{values / 1e6 / t_stream:>12.1f}"
          f"{'%.0f MB' % ((2 * units * 2048 * 8 * 3 + 256 * h * h * 2 * units * 8) / 1e6):>14}")
    print(f"streaming: {stats[0].passes} passes, {stats[0].collected} values collected; "
          f"max |streaming - sorted| = {np.abs(streamed - exact).max():.3g}; "
          f"time ratio streaming / sorted = {t_stream / t_sorted:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo32")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="smaller synthetic sizes (for 2-core machines)")
    p.add_argument("--skip-scenes", action="store_true")
    args = p.parse_args()
    dev = D.pick_device(args.device)
    torch.manual_seed(0)
    if not args.skip_scenes:
        bench_scenes(args.preset, dev, args.batch_size, loop_images=32 if args.quick else 128)
    bench_paper_shape(dev, images=64 if args.quick else 256, loop_images=2 if args.quick else 8)
    bench_thresholds(dev, images=500 if args.quick else 4000)


if __name__ == "__main__":
    main()
