"""GPU benchmark of the fused Dynamic-K kernel against the PyTorch paths, at the paper's shapes.

Two tables, each measured in one run so the ratios compare like with like:

1. Layer: forward and forward+backward time (CUDA events, warm-up, median) and peak extra memory
   of one Dynamic-K layer computed by
     - `dense`   F.linear of the same shape (a floor, not the same function),
     - `direct`  `(x[:, None, :] * W).topk(k).values.sum(-1) + b` (autograd through topk),
     - `pytorch` the chunked autograd function of `dka.layers` (the CPU / fallback path),
     - `fused`   `dka.kernels.fused_dynamic_k_linear` (Triton),
   at the final layer (256, 365, 512, 5), (256, 365, 2048, 25) and the internal 1x1 layers of
   res18-d[32,32,5]a at batch 256, 224 px (layer3: 256*14*14 rows, 256 out, 128 in, K 32;
   layer4: 256*7*7 rows, 512 out, 256 in, K 32).
2. Training step (forward, backward, SGD step) of res18, res18-d5a and res18-d[32,32,5]a at batch
   256, 224 px, 365 classes, ImageNet stem, bf16 autocast + channels_last; dynamic models both with
   the fused kernel and with DKA_DISABLE_TRITON=1 (PyTorch path). Ratios are against res18.

Usage:  python bench/kernels.py [--quick] [--skip-models] [--out bench/results]
        python bench/kernels.py --interpret   # CPU smoke of the code path in Triton's interpreter
The Markdown table is printed and written to bench/results/<gpu>-<date>.md. Timings are printed,
never asserted. Issue targets (H100): fused fwd+bwd < 0.2 ms at (256, 365, 512, 5); res18-d5a step
<= 1.02x res18; res18-d[32,32,5]a <= 1.3x.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

if "--interpret" in sys.argv:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LAYER_SHAPES = [  # (label, rows, out, in, K)
    ("head d5a", 256, 365, 512, 5),
    ("head res50-d25a", 256, 365, 2048, 25),
    ("layer3 1x1 (K32)", 256 * 14 * 14, 256, 128, 32),
    ("layer4 1x1 (K32)", 256 * 7 * 7, 512, 256, 32),
]
INTERPRET_SHAPES = [("tiny", 4, 6, 40, 5), ("tiny K32", 3, 4, 48, 32)]
MODELS = ["res18", "res18-d5a", "res18-d[32,32,5]a"]


def _methods(interpret: bool):
    from dka.kernels import fused_dynamic_k_linear
    from dka._core import DynamicKFunction

    def dense(x, w, b, k):
        return F.linear(x, w, b)

    def direct(x, w, b, k):
        return (x[:, None, :] * w).topk(k, -1).values.sum(-1) + b

    def pytorch(x, w, b, k):
        return DynamicKFunction.apply(x, w, b, k)

    return {"dense": dense, "direct": direct, "pytorch": pytorch, "fused": fused_dynamic_k_linear}


class _Timer:
    """Median milliseconds of `fn()` over `reps` runs after `warmup` runs (CUDA events on GPU)."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                import time

                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def _peak_mib(device: torch.device, fn) -> float | None:
    """Peak memory allocated by one call of `fn` beyond what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _is_oom(err: Exception) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def bench_layers(device, dtype, shapes, timer, interpret) -> list[dict]:
    methods = _methods(interpret)
    rows = []
    for label, n_rows, n_out, n_in, k in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        x0 = torch.randn(n_rows, n_in, device=device, generator=gen).relu().to(dtype)
        w0 = (torch.randn(n_out, n_in, device=device, generator=gen) / n_in**0.5).to(dtype)
        b0 = torch.zeros(n_out, device=device, dtype=dtype)
        g = torch.randn(n_rows, n_out, device=device, generator=gen).to(dtype)
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        outputs = {}
        for name, fn in methods.items():
            row = {"layer": label, "shape": f"({n_rows}, {n_out}, {n_in}, {k})", "dtype": str(dtype).split(".")[-1],
                   "method": name}

            def forward(fn=fn):
                with torch.no_grad():
                    return fn(x, w, b, k)

            def step(fn=fn):
                x.grad = w.grad = b.grad = None
                fn(x, w, b, k).backward(g)

            try:
                outputs[name] = forward().float()
                row["fwd_ms"] = timer(forward)
                row["fwd_bwd_ms"] = timer(step)
                row["peak_mib"] = _peak_mib(device, step)
            except (RuntimeError, torch.OutOfMemoryError) as err:
                if not _is_oom(err):
                    raise
                row["fwd_ms"] = row["fwd_bwd_ms"] = row["peak_mib"] = None
                row["note"] = "out of memory"
                x.grad = w.grad = b.grad = None
                torch.cuda.empty_cache()
            rows.append(row)
        ref = outputs.get("pytorch")
        for row in rows[-len(methods):]:
            out = outputs.get(row["method"])
            if ref is not None and out is not None and row["method"] != "dense":
                row["max_abs_diff_vs_pytorch"] = (out - ref).abs().max().item()
        del outputs, x, w, b, x0, w0, b0, g
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_models(device, timer, batch: int, size: int) -> list[dict]:
    from dka.models import build

    rows = []
    variants = [("res18", "fused")] + [(m, path) for m in MODELS[1:] for path in ("fused", "pytorch")]
    for name, path in variants:
        os.environ["DKA_DISABLE_TRITON"] = "1" if path == "pytorch" else ""
        model = build(name, 365, stem="imagenet").to(device).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        gen = torch.Generator(device=device).manual_seed(0)
        images = torch.randn(batch, 3, size, size, device=device, generator=gen).contiguous(
            memory_format=torch.channels_last)
        labels = torch.randint(0, 365, (batch,), device=device, generator=gen)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()

        row = {"model": name, "path": path if name != "res18" else "-"}
        try:
            row["step_ms"] = timer(step)
            row["img_per_s"] = batch / row["step_ms"] * 1e3
            row["peak_mib"] = _peak_mib(device, step)
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not _is_oom(err):
                raise
            row["step_ms"] = row["img_per_s"] = row["peak_mib"] = None
            row["note"] = "out of memory"
        rows.append(row)
        del model, opt, images, labels
        if device.type == "cuda":
            torch.cuda.empty_cache()
    os.environ.pop("DKA_DISABLE_TRITON", None)
    base = rows[0]["step_ms"]
    for row in rows:
        row["x_res18"] = row["step_ms"] / base if row.get("step_ms") and base else None
    return rows


def _fmt(value, digits=3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def layer_table(rows: list[dict]) -> str:
    lines = ["| layer | shape (rows, out, in, K) | dtype | method | fwd ms | fwd+bwd ms | x direct | "
             "x pytorch | peak MiB | max abs diff vs pytorch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        same = [r for r in rows if r["layer"] == row["layer"] and r["dtype"] == row["dtype"]]
        ref = {r["method"]: r.get("fwd_bwd_ms") for r in same}
        t = row.get("fwd_bwd_ms")
        x_direct = t / ref["direct"] if t and ref.get("direct") else None
        x_pytorch = t / ref["pytorch"] if t and ref.get("pytorch") else None
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(
            f"| {row['layer']} | {row['shape']} | {row['dtype']} | {row['method']}{note} | {_fmt(row.get('fwd_ms'))} | "
            f"{_fmt(t)} | {_fmt(x_direct)} | {_fmt(x_pytorch)} | {_fmt(row.get('peak_mib'), 4)} | "
            f"{_fmt(row.get('max_abs_diff_vs_pytorch'), 2)} |"
        )
    return "\n".join(lines)


def model_table(rows: list[dict]) -> str:
    lines = ["| model | Dynamic-K path | step ms | img/s | x res18 | peak MiB |", "|---|---|---|---|---|---|"]
    for row in rows:
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(f"| {row['model']}{note} | {row['path']} | {_fmt(row.get('step_ms'))} | "
                     f"{_fmt(row.get('img_per_s'), 4)} | {_fmt(row.get('x_res18'))} | {_fmt(row.get('peak_mib'), 4)} |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    return {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda or "-", "triton": triton_version,
            "date": dt.date.today().isoformat()}


def write_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
        fh.write(text)
    os.replace(fh.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a few minutes in all)")
    parser.add_argument("--skip-models", action="store_true", help="only the layer table")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU smoke of the code path through Triton's interpreter (tiny shapes, no file)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for <gpu>-<date>.md (default: bench/results)")
    parser.add_argument("--batch", type=int, default=256, help="training-step batch size (paper: 256)")
    args = parser.parse_args(argv)

    if args.interpret:
        device, shapes, timer = torch.device("cpu"), INTERPRET_SHAPES, _Timer(torch.device("cpu"), 0, 1)
    else:
        from dka.kernels import fused_available

        if not torch.cuda.is_available():
            print("bench/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False). "
                  "Run it on a GPU machine, or pass --interpret for a CPU smoke of the code path.",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda")
        if not fused_available(torch.zeros(1, device=device)):
            print("triton is not usable here (not installed, DKA_DISABLE_TRITON=1, or no driver): "
                  "install triton (pip install 'dka[kernels]') to benchmark the fused kernel.", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True
        shapes = LAYER_SHAPES
        timer = _Timer(device, warmup=3 if args.quick else 10, reps=10 if args.quick else 50)

    env = environment(device)
    layer_rows = []
    for dtype in (torch.float32, torch.bfloat16):
        layer_rows += bench_layers(device, dtype, shapes, timer, args.interpret)
    sections = [
        f"# Dynamic-K kernel benchmark — {env['gpu']}",
        "",
        f"{env['date']} · torch {env['torch']} · CUDA {env['cuda']} · triton {env['triton']} · "
        f"`python bench/kernels.py{' --quick' if args.quick else ''}` · median of {timer.reps} runs after "
        f"{timer.warmup} warm-up runs (CUDA events); peak MiB = extra memory allocated during one fwd+bwd.",
        "",
        "## One layer: forward and forward+backward",
        "",
        layer_table(layer_rows),
    ]
    if not args.interpret and not args.skip_models:
        steps = _Timer(device, warmup=3, reps=10) if args.quick else _Timer(device, warmup=5, reps=20)
        model_rows = bench_models(device, steps, args.batch, 224)
        sections += ["", f"## Training step, batch {args.batch}, 224 px, 365 classes, bf16 autocast + channels_last",
                     "", model_table(model_rows)]
    text = "\n".join(sections) + "\n"
    print(text)
    if not args.interpret:
        slug = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")
        path = args.out / f"{slug}-{env['date']}{'-quick' if args.quick else ''}.md"
        write_atomic(text, path)
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
