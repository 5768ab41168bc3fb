"""Speed and memory of a CoDA-Net training step against a ResNet, measured side by side.

    python bench/coda_train_step.py                         # res18 w16 vs coda-s w8 and coda-cifar w16, 32 px
    python bench/coda_train_step.py --models res18:16,res18:8,coda-s:8 --batch 128
    python bench/coda_train_step.py --device cuda --batch 256 --out results/related/coda

One step is what `dka.train` runs for each model's recipe: forward under bf16 autocast where bf16 is
fast (channels_last), the recipe's loss (cross-entropy for ResNets, binary cross-entropy for CoDA-Nets),
backward, and the recipe's optimiser step (SGD with momentum; Adam). Models are timed in interleaved
rounds so that load from other processes hits all alike; a time is the median over rounds of the mean
step time within a round. Memory: the bytes of the tensors autograd saves for the backward pass (the
activation memory, counted once per storage) and of the parameters with their optimiser state; on CUDA
also the peak allocated memory of one step. Every ratio is against the first model, measured in this
run. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from dka import models
from dka.atomic import atomic_write
from dka.train import bf16_is_fast, classification_loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs its forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _variant(spec: str, args, device, fmt, images, labels):
    name, _, width = spec.partition(":")
    coda = name.startswith("coda")
    torch.manual_seed(0)
    model = models.build(name, args.classes, stem="cifar", width=int(width) if width else None,
                         **({"temperature": args.temperature} if coda else {}))
    model = model.to(device, memory_format=fmt).train()
    if coda:
        opt, loss_kind = torch.optim.Adam(model.parameters(), lr=1e-3), "bce"
    else:
        opt, loss_kind = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4), "cross-entropy"

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = model(images)
        return classification_loss(logits, labels, loss_kind)

    def step():
        loss = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    label = f"{name} w{model.build_kwargs['width']}"
    params = sum(p.numel() for p in model.parameters())
    return label, step, forward, params, model, opt


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="res18:16,coda-s:8,coda-cifar:16",
                   help="comma-separated NAME:WIDTH; the first is the baseline of the ratios")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--temperature", type=float, default=1000.0)
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: where bf16 is fast, dka.train.bf16_is_fast)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=None, help="also write train_step.{md,json} into this folder")
    args = p.parse_args(argv)
    if args.amp is None:
        args.amp = bf16_is_fast(args.device)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device, memory_format=fmt)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)

    variants = [_variant(s.strip(), args, device, fmt, images, labels) for s in args.models.split(",")]
    memory = {}
    for label, step, forward, params, model, opt in variants:
        for _ in range(args.warmup):
            step()
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device)
        memory[label] = {"params": params, "saved_bytes": _saved_bytes(forward),
                         "param_state_bytes": params * 4 + state, "cuda_peak_bytes": peak}
    _sync(device)
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    for _ in range(args.rounds):
        for label, step, *_ in variants:
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            _sync(device)
            times[label].append((time.perf_counter() - start) / args.steps)

    header = (f"Training step: {args.size} px, batch {args.batch}, {args.classes} classes, device {device} "
              f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads), bf16 autocast {'on' if args.amp else 'off'}, channels_last; "
              f"median of {args.rounds} rounds x {args.steps} steps; load average before/after "
              f"{load_before:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch {torch.__version__}")
    base = variants[0][0]
    rows = []
    for label, *_ in variants:
        t = statistics.median(times[label])
        mem = memory[label]
        rows.append({"model": label, "params": mem["params"], "ms_per_step": 1000 * t, "img_per_s": args.batch / t,
                     "time_vs_baseline": t / statistics.median(times[base]),
                     "saved_mib": mem["saved_bytes"] / 2**20,
                     "saved_vs_baseline": mem["saved_bytes"] / memory[base]["saved_bytes"],
                     "param_state_mib": mem["param_state_bytes"] / 2**20,
                     "cuda_peak_mib": None if mem["cuda_peak_bytes"] is None else mem["cuda_peak_bytes"] / 2**20,
                     "round_spread": (max(times[label]) - min(times[label])) / t})
    lines = [f"# {header}", "",
             f"| model | params | ms/step | img/s | time vs {base} | saved for backward MiB | vs {base} | "
             "params + optimiser MiB | CUDA peak MiB | round spread |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = "–" if r["cuda_peak_mib"] is None else f"{r['cuda_peak_mib']:.0f}"
        lines.append(f"| {r['model']} | {r['params']:,} | {r['ms_per_step']:.1f} | {r['img_per_s']:,.0f} | "
                     f"{r['time_vs_baseline']:.2f}x | {r['saved_mib']:.1f} | {r['saved_vs_baseline']:.2f}x | "
                     f"{r['param_state_mib']:.1f} | {peak} | {100 * r['round_spread']:.0f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    result = {"header": header, "baseline": base, "rows": rows, "command": "python bench/coda_train_step.py "
              + " ".join(argv if argv is not None else os.sys.argv[1:])}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.out / "train_step.md") as handle:
            handle.write(text)
        with atomic_write(args.out / "train_step.json") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
