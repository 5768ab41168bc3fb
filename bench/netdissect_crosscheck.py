"""Cross-check dka's NetDissect-Lite threshold rule against NetDissect-Lite's own sketch, bit for bit.

Loads `util/vecquantile.py` from a NetDissect-Lite checkout at run time (nothing of it is copied
into dka), feeds its QuantileVector as `feature_operation.quantile_threshold` does (depth = units,
seed 1, float64 rows (image, y, x) x units, 64 images per add, readout(1000)[:, 994]) and compares
with `dka.dissection.netdissect_thresholds` on synthetic features: inside the sketch's exact regime
(<= 24,576 values per unit) and beyond it (compaction with its random draws), with ReLU-like ties.

NetDissect-Lite ran on numpy's classic scalar sort; today's numpy dispatches argsort to SIMD code
whose order of ties differs. The script therefore re-runs itself with NPY_DISABLE_CPU_FEATURES set
to the machine's dispatchable features (numpy >= 2 names), which restores the scalar sort; it also
prints how many thresholds differ under the SIMD sort, for scale.

    python bench/netdissect_crosscheck.py --netdissect-lite PATH/TO/NetDissect-Lite
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dka.dissection import netdissect_thresholds

CASES = [  # (name, images, units, h, w): values per unit = images * h * w
    ("exact, 7x7", 300, 6, 7, 7),  # 14,700 values
    ("exact, at capacity", 24576 // 16, 5, 4, 4),  # exactly 24,576
    ("beyond, 2x2 (demo64 layer4)", 10000, 6, 2, 2),  # 40,000: one compaction
    ("beyond, 7x7", 2000, 4, 7, 7),  # 98,000: several levels
]


def _scalar_sort_env() -> dict:
    import numpy  # noqa: F401 - the features this numpy found

    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__  # type: ignore

    env = dict(os.environ)
    found = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    env["NPY_DISABLE_CPU_FEATURES"] = " ".join(found)
    return env


def _load_vecquantile(root: Path):
    path = root / "util" / "vecquantile.py"
    if not path.is_file():
        raise SystemExit(f"no util/vecquantile.py under {root}: pass the root of a NetDissect-Lite checkout")
    if not hasattr(np, "NaN"):
        np.NaN = np.nan  # the 2017 code spells it numpy.NaN (removed in numpy 2)
    spec = importlib.util.spec_from_file_location("netdissect_vecquantile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.QuantileVector


def _features(images, units, h, w, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(images, units, h, w)).astype(np.float32)
    x[:, 0] = np.maximum(x[:, 0], 0)  # ReLU: a large tie at the minimum
    x[:, 1] = np.round(np.maximum(x[:, 1], 0) * 4) / 4  # coarse values: ties everywhere
    return x


def _theirs(QuantileVector, features):
    quant = QuantileVector(depth=features.shape[1], seed=1)
    f64 = features.astype(np.float64)
    for i in range(0, f64.shape[0], 64):
        batch = np.transpose(f64[i : i + 64], axes=(0, 2, 3, 1)).reshape(-1, f64.shape[1])
        quant.add(batch)
    return quant.readout(1000)[:, int(1000 * (1 - 0.005) - 1)]


def run(root: Path) -> int:
    QuantileVector = _load_vecquantile(root)
    print(f"numpy {np.__version__}, NPY_DISABLE_CPU_FEATURES={os.environ.get('NPY_DISABLE_CPU_FEATURES', '')!r}")
    print("| case | values/unit | units | equal bit for bit | max abs diff | dka s | NetDissect-Lite s |")
    print("|---|---|---|---|---|---|---|")
    failures = 0
    for seed, (name, images, units, h, w) in enumerate(CASES):
        x = _features(images, units, h, w, seed)
        t0 = time.perf_counter()
        ours = netdissect_thresholds(x)
        t1 = time.perf_counter()
        theirs = _theirs(QuantileVector, x)
        t2 = time.perf_counter()
        same = int(np.sum(ours == theirs))
        failures += units - same
        print(f"| {name} | {images * h * w} | {units} | {same}/{units} | {np.max(np.abs(ours - theirs)):.3g} "
              f"| {t1 - t0:.2f} | {t2 - t1:.2f} |")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--netdissect-lite", required=True, type=Path, help="root of a NetDissect-Lite checkout")
    parser.add_argument("--simd", action="store_true", help="keep numpy's SIMD sort (for comparison)")
    args = parser.parse_args()
    if not args.simd and "NPY_DISABLE_CPU_FEATURES" not in os.environ:
        return subprocess.call([sys.executable, *sys.argv], env=_scalar_sort_env())
    failures = run(args.netdissect_lite)
    print(f"{'all equal' if failures == 0 else f'{failures} thresholds differ'}")
    return 0 if failures == 0 or args.simd else 1


if __name__ == "__main__":
    sys.exit(main())
