"""Network Dissection with NetDissect-Lite's definitions, streaming and vectorised.

Why a re-implementation: the paper's interpretability numbers come from NetDissect-Lite
(Bau et al. 2017, the "Lite" code), whose tally loops over units x images in Python and keeps all
features in a float32 memmap. Here the same numbers come from two streaming passes:

1. features of the chosen layer (forward hook, any module by qualified name, e.g. ``layer4`` or the
   internal dynamic layer ``layer3.0.conv1``) are stored once, in memory when they fit the budget,
   else in a float32 memmap file; the per-unit threshold is the 994/999 quantile of the unit's raw
   (not upsampled) activations, computed exactly (see :func:`quantile_thresholds_sorted` and the
   bounded-memory :func:`quantile_thresholds_streaming`, which is also exact);
2. per batch, the (image, unit) maps whose max exceeds the unit's threshold (the only ones that
   can have active pixels) are upsampled (bilinear, pixel centres) to the segmentation size and
   thresholded; the labels under their active pixels, gathered from every label layer at once, are
   counted with index_add (:class:`TallyAccumulator`, a pure function of maps, thresholds and
   segmentations, so it is testable without any dataset). Work is proportional to the active
   pixels, as in NetDissect-Lite's loop, but with no Python loop over units or images.

The counting rules (see DESIGN.md, "Network Dissection, as NetDissect-Lite defines it"):
truth[label] pools pixel labels of all selected categories (label 0 excluded) and adds sh*sw per
image-level label; intersect[unit, label] counts active pixels carrying the label (all active pixels
for an image-level label); activation[unit, category] adds an image's active-pixel count only if
some active pixel carries a label whose primary category is that category, or the image has an
image-level label of it. IoU = intersect / (activation[primary(label)] + truth - intersect + 1e-10).

Two rule sets (`rules=`, see rules.py): "dka" (the default) takes the exact 994/999 quantile and
reads the definition above literally; "netdissect" reproduces NetDissect-Lite's output exactly —
its quantile sketch and readout (lite_quantile.py), label 0 from `0` entries of image-level fields,
an empty name for label 0, PIL's resize arithmetic (pil_resize.py), the stale category vector its
loop gives an image without label maps, and its order of units with equal scores. Use "netdissect"
wherever results are compared with the paper or the authors' released tally.

Memory (paper scale: Broden 63,305 images, ResNet18 layer4 = 512 units x 7 x 7): the feature store
is 63,305 x 512 x 49 x 4 B = 6.4 GB, so it goes to an unnamed memmap file in ``cache_dir`` (freed by
the kernel when the process ends, even by SIGKILL); the sorted
threshold then needs N*h*w*4 B = 12 MB per unit of working memory (units are processed in chunks),
the streaming threshold O(units x bins) = 2 x 512 x 2048 x 8 B = 17 MB plus the few values that fall
into the final bin. The tally upsamples the firing maps in chunks sized to a budget (~256 MB) and
keeps int64 counters of (units x labels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dka.data.broden import DEFAULT_CATEGORIES
from dka.dissection.features import FeatureStore, LayerCapture
from dka.dissection.lite_quantile import netdissect_thresholds
from dka.dissection.rules import RULES, DissectionRules, get_rules
from dka.dissection.tally import (FIELDS, IOU_EPS, TallyAccumulator, TallyCounts, compute_iou, reference_tally_loop,
                               tally_frame)
from dka.dissection.tally_io import (INTERPRETABLE_IOU, read_tally, tally_categories, tally_columns, tally_summary,
                                  tally_differences, unit_labels, write_tally, summary_row)
from dka.dissection.thresholds import (QUANTILE, StreamingQuantileStats, quantile_thresholds_sorted,
                                    quantile_thresholds_streaming)

__all__ = [
    "dissect", "DissectionDetails", "pick_device",
    "DEFAULT_CATEGORIES", "QUANTILE", "IOU_EPS", "INTERPRETABLE_IOU", "FIELDS",
    "quantile_thresholds_sorted", "quantile_thresholds_streaming", "StreamingQuantileStats", "netdissect_thresholds",
    "RULES", "DissectionRules", "get_rules",
    "TallyAccumulator", "TallyCounts", "compute_iou", "tally_frame", "tally_columns", "reference_tally_loop",
    "LayerCapture", "FeatureStore",
    "read_tally", "write_tally", "tally_categories", "tally_summary", "summary_row", "unit_labels", "tally_differences",
]

BRODEN_HINT = (
    "Download Broden (broden1_224, ~1 GB) from http://netdissect.csail.mit.edu/data/broden1_224.zip and "
    "unzip it, or generate the built-in concept scenes in Broden format with "
    "`dka.data.scenes.generate('demo32', DIR)`"
)


def _open_dataset(dataset_root, categories, caffe, rules: DissectionRules, split: str | None = None):
    if not isinstance(dataset_root, (str, os.PathLike)):
        # an already built BrodenDataset (or compatible): it must read `0` entries as the rules do
        built = getattr(dataset_root, "zero_image_labels", rules.zero_image_labels)
        if built != rules.zero_image_labels:
            raise ValueError(f"the dataset was built with zero_image_labels={built} but rules={rules.name!r} need "
                             f"{rules.zero_image_labels}; pass the dataset's root instead, or rebuild it")
        return dataset_root
    root = Path(dataset_root)
    if not (root / "index.csv").is_file():
        raise FileNotFoundError(f"no Broden dataset at {root} (index.csv missing). {BRODEN_HINT}.")
    from dka.data import scenes
    from dka.data.broden import BrodenDataset

    if scenes.is_export(root):
        scenes.require_intact(root)  # generated data: a damaged export is refused with the command that rewrites it
    return BrodenDataset(root, categories=tuple(categories), caffe=caffe,
                         zero_image_labels=rules.zero_image_labels, split=split)


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from dka.progress import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def pick_device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def dissect(
    model: nn.Module,
    layer: str,
    dataset_root,
    batch_size: int = 64,
    device=None,
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    caffe: bool = False,
    quantile: float = QUANTILE,
    threshold_method: str = "auto",
    memory_budget: int = 2 << 30,
    cache_dir: str | Path | None = None,
    workers: int = 0,
    progress: bool = True,
    return_details: bool = False,
    rules: str | DissectionRules = "dka",
    split: str | None = None,
):
    """Network Dissection of ``layer`` of ``model`` on a Broden-format dataset -> tally DataFrame.

    ``rules``: "dka" (exact quantile, the definition read literally) or "netdissect" (NetDissect-Lite's
    output exactly: use it to compare with the paper or the released tally); rules.py lists the
    differences. ``threshold_method`` (dka rules only): "sorted" (exact selection over stored
    features), "streaming" (exact histogram refinement, bounded memory) or "auto" (sorted when
    features fit ``memory_budget``); NetDissect-Lite's rule is its own sketch ("netdissect").
    With ``return_details`` returns (tally, DissectionDetails) with thresholds and raw counts.
    ``split``: dissect only the index rows of that split (e.g. "test": images the model never trained on,
    when the Broden-format data is also its training set, as with concept scenes); None: every row.
    """
    rules = get_rules(rules)
    if threshold_method not in ("auto", "sorted", "streaming"):
        raise ValueError(f"threshold_method must be 'auto', 'sorted' or 'streaming', got {threshold_method!r}")
    if rules.threshold == "netdissect" and threshold_method != "auto":
        raise ValueError(f"rules={rules.name!r} take NetDissect-Lite's own threshold; leave threshold_method='auto'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = pick_device(device)
    dataset = _open_dataset(dataset_root, categories, caffe, rules, split)
    cats = list(dataset.categories)
    n = len(dataset)
    if n == 0:
        raise ValueError(f"the dataset has no image with a label in categories {cats}")
    collate = getattr(type(dataset), "collate", None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
        pin_memory=dev.type == "cuda",
    )
    capture = LayerCapture(model, layer)
    was_training = model.training
    model.eval()
    store: FeatureStore | None = None
    try:
        # pass 1: features of the layer
        for batch in _progress(loader, len(loader), f"features {layer}", progress):
            images = batch["image"].to(dev, non_blocking=True)
            feats = capture(model, images)
            if store is None:
                store = FeatureStore(n, tuple(feats.shape[1:]), memory_budget, cache_dir)
            store.append(feats)
        method = threshold_method
        if rules.threshold == "netdissect":
            method = "netdissect"
        elif method == "auto":
            method = "sorted" if store.in_memory else "streaming"
        if method == "netdissect":
            thresholds = netdissect_thresholds(lambda: store.batches(256), quantile)
        elif method == "sorted":
            thresholds = quantile_thresholds_sorted(store.data, quantile, device=dev)
        else:
            thresholds = quantile_thresholds_streaming(lambda: store.batches(256), quantile, device=dev)
        # pass 2: the tally
        acc = TallyAccumulator(thresholds, dataset.primary_category, len(cats), dataset.seg_size, device=dev,
                               rules=rules)
        start = 0
        for batch in _progress(loader, len(loader), f"tally {layer}", progress):
            b = batch["seg"].shape[0]
            acc.update(store.batch(start, start + b), batch["seg"], batch.get("image_labels"), batch.get("has_maps"))
            start += b
    finally:
        if store is not None:
            store.close()
        model.train(was_training)
    counts = acc.counts()
    tally = tally_frame(counts, dataset.primary_category, dataset.label_names, cats, rules=rules)
    if return_details:
        return tally, DissectionDetails(thresholds=thresholds, counts=counts, threshold_method=method,
                                        rules=rules.name)
    return tally


@dataclass
class DissectionDetails:
    thresholds: np.ndarray  # (units,) float64, unit i-1 for tally unit i
    counts: TallyCounts
    threshold_method: str
    rules: str = "dka"
