"""Forward+backward time and peak extra memory of Dynamic-K vs the direct formula vs a dense layer.

    python bench/layers.py            # all shapes of the foundation issue (a few minutes on 2 cores)
    python bench/layers.py --quick    # two shapes, fewer repeats

Methods: `direct` (the formula with autograd through topk), `dka PyTorch` (dka.layers with
DKA_DISABLE_CPU_KERNEL=1: the chunked autograd function of dka._core), `dka kernel` (dka.layers as
users get it: the fused CPU kernel of dka.kernels.cpu, built before timing), `dense` (F.linear).
Each (shape, method) runs in its own subprocess so that its peak resident memory (ru_maxrss minus
the resident size just before the first forward) belongs to it alone. Times are the median of
`--repeats` forward+backward passes after one warm-up. All numbers come from this run; the ratios
compare methods measured side by side. Nothing here asserts: it prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

SHAPES = [  # (label, rows, out, in, k)
    ("final layer, CIFAR", 256, 10, 512, 5),
    ("final layer, Places365", 256, 365, 512, 5),
    ("final layer, Res50-d25a", 256, 365, 2048, 25),
    ("1x1 internal, 32x14x14 rows", 6272, 256, 128, 32),
    ("1x1 internal, 256x14x14 rows", 50176, 256, 128, 32),
]
METHODS = ("direct", "dka-pytorch", "dka", "dense")
# The direct formula at 50,176 rows would hold a 6.6 GB product tensor plus its backward copies.
DIRECT_MAX_ELEMENTS = 1_000_000_000


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(method: str, rows: int, out: int, inp: int, k: int, repeats: int, threads: int) -> dict:
    import resource

    if method == "dka-pytorch":
        os.environ["DKA_DISABLE_CPU_KERNEL"] = "1"
    import torch

    from dka.layers import dynamic_k_linear

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inp, generator=g).relu_().requires_grad_()  # post-ReLU features, as in a ResNet
    w = (torch.randn(out, inp, generator=g) * inp**-0.5).requires_grad_()
    b = torch.zeros(out, requires_grad=True)
    grad = torch.randn(rows, out, generator=g)

    node = []

    def step():
        if method == "direct":
            y = (x[:, None, :] * w).topk(k, -1).values.sum(-1) + b
        elif method.startswith("dka"):
            y = dynamic_k_linear(x, w, b, k)
        else:
            y = torch.nn.functional.linear(x, w, b)
        node.append(type(y.grad_fn).__name__)
        y.backward(grad)
        x.grad = w.grad = b.grad = None

    base = _rss_bytes()
    step()  # warm-up, and the memory high-water mark
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"ms": 1000 * times[len(times) // 2], "peak_mib": max(peak, 0) / 2**20, "node": node[-1]}


def _run_case(method, rows, out, inp, k, repeats, threads) -> dict | None:
    if method == "direct" and rows * out * inp > DIRECT_MAX_ELEMENTS:
        return None
    cmd = [sys.executable, __file__, "--worker", json.dumps([method, rows, out, inp, k, repeats, threads])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} at {(rows, out, inp, k)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes, 3 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(*json.loads(args.worker))))
        return 0

    import torch
    from tqdm import tqdm

    shapes = SHAPES[1:2] + SHAPES[3:4] if args.quick else SHAPES
    repeats = 3 if args.quick else args.repeats
    kernel_note = _build_cpu_kernel()
    print(f"# Dynamic-K layer benchmark (forward+backward, float32)\n")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"median of {repeats}; peak = resident memory above the inputs; {kernel_note}\n")
    header = ("| shape | rows x out x in, k | direct ms | dka PyTorch ms | dka kernel ms | dense ms "
              "| kernel / direct | kernel / dense | PyTorch / direct "
              "| direct MiB | dka PyTorch MiB | dka kernel MiB | dense MiB |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for label, rows, out, inp, k in tqdm(shapes, desc="shapes", file=sys.stderr):
        res = {m: _run_case(m, rows, out, inp, k, repeats, args.threads) for m in METHODS}
        d, p, y, n = res["direct"], res["dka-pytorch"], res["dka"], res["dense"]
        if y["node"] != "_CpuDynamicKFunctionBackward":
            y = None  # the kernel did not run (no compiler, or disabled): no kernel column
        ms = {name: r and r["ms"] for name, r in (("d", d), ("p", p), ("y", y))}
        lines.append(
            f"| {label} | {rows} x {out} x {inp}, {k} | {_fmt(ms['d'], '.1f')} | {p['ms']:.1f} | "
            f"{_fmt(ms['y'], '.1f')} | {n['ms']:.2f} | {_fmt(_ratio(ms['y'], ms['d']), '.3f')} | "
            f"{_fmt(_ratio(ms['y'], n['ms']), '.1f')} | {_fmt(_ratio(ms['p'], ms['d']), '.3f')} | "
            f"{_fmt(d and d['peak_mib'], '.0f')} | {p['peak_mib']:.0f} | {_fmt(y and y['peak_mib'], '.0f')} | "
            f"{n['peak_mib']:.0f} |"
        )
    print("\n".join(lines))
    print("\n— : the direct formula is not run where its product tensor alone exceeds "
          f"{DIRECT_MAX_ELEMENTS:,} elements (it would need tens of GB).")
    return 0


def _ratio(a, b):
    return a / b if a is not None and b else None


def _build_cpu_kernel() -> str:
    """Build the CPU kernel before timing anything (the first use in a process would build it)."""
    from dka.kernels import cpu

    start = time.perf_counter()
    try:
        path = cpu.build_cpu_kernel()
    except cpu.CpuKernelUnavailable as err:
        return f"CPU kernel unavailable ({err})"
    return f"CPU kernel {path.name} ready in {time.perf_counter() - start:.1f} s (0 = cached build)"


if __name__ == "__main__":
    sys.exit(main())
