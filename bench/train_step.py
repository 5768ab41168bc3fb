"""Training-step throughput of res18, res18-d5a, res18-d[32,32,5]a and res18-d[8,8,5]a, side by side.

    python bench/train_step.py                          # width 16, 32 px, batch 128 (bf16 where fast)
    python bench/train_step.py --width 64 --size 224 --stem imagenet --classes 365 --device cuda

One step = forward, cross-entropy, backward and an SGD step (momentum, weight decay), exactly as
`dka.train` runs it (autocast bf16 and channels_last unless disabled). The "+ routing" column adds the
trainer's `never_routed` bookkeeping (dka.train.RoutingTracker). On CPU the dynamic models run the fused
CPU kernel (dka.kernels.cpu) as users get them, and once more with DKA_DISABLE_CPU_KERNEL=1 (the PyTorch
path; --no-pytorch-path skips those rows). Models are timed in interleaved rounds so
that load from other processes on a shared machine hits all of them alike; each number is the median
over rounds of the mean step time within a round. Ratios are against res18 measured in this run.
Targets: a res18-d5a step at most 1.05x a res18 step; on CPU (issue 18) res18-d[8,8,5]a at most 1.5x.
Nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from dka import models
from dka.train import RoutingTracker, bf16_is_fast

MODELS = ("res18", "res18-d5a", "res18-d[32,32,5]a", "res18-d[8,8,5]a")
DISABLE_CPU_KERNEL = "DKA_DISABLE_CPU_KERNEL"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--stem", default="cifar")
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: where bf16 is fast, dka.train.bf16_is_fast)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--routing", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the step with the never_routed hooks")
    p.add_argument("--pytorch-path", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPU, also time the dynamic models with the CPU kernel off")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    if args.amp is None:
        args.amp = bf16_is_fast(args.device)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device, memory_format=fmt)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)

    if device.type == "cpu":  # build (or load) the kernel before timing: the first use would
        from dka.kernels import cpu  # noqa: E402 (a bench script)

        cpu.cpu_kernel_available(images)
    pytorch_path = args.pytorch_path and device.type == "cpu"
    variants = []  # (label, model name, step function)
    for name in MODELS:
        options = [(False, False)] + ([(True, False)] if args.routing else [])
        options += [(False, True)] if pytorch_path and name != "res18" else []
        for routing, kernel_off in options:
            torch.manual_seed(0)
            model = models.build(name, args.classes, stem=args.stem, width=args.width)
            model = model.to(device, memory_format=fmt).train()
            if routing:
                if not model.dynamic_layers():
                    continue
                RoutingTracker(model.dynamic_layers())
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

            def step(model=model, opt=opt, kernel_off=kernel_off):
                before = os.environ.get(DISABLE_CPU_KERNEL)
                if kernel_off:
                    os.environ[DISABLE_CPU_KERNEL] = "1"
                try:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                        logits = model(images)
                    loss = F.cross_entropy(logits.float(), labels)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                finally:
                    if kernel_off and before is None:
                        os.environ.pop(DISABLE_CPU_KERNEL, None)
                    elif kernel_off:
                        os.environ[DISABLE_CPU_KERNEL] = before

            label = name + (" + routing" if routing else "") + (" (PyTorch path)" if kernel_off else "")
            variants.append((label, name, step))

    for _, _, step in variants:
        for _ in range(args.warmup):
            step()
    _sync(device)
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    for _ in range(args.rounds):
        for label, _, step in variants:
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            _sync(device)
            times[label].append((time.perf_counter() - start) / args.steps)

    print(f"# Training step: width {args.width}, {args.size} px, batch {args.batch}, {args.classes} classes, "
          f"stem {args.stem}, device {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), bf16 autocast {'on' if args.amp else 'off'}, "
          f"channels_last {'on' if args.channels_last else 'off'}; median of {args.rounds} rounds x {args.steps} steps; "
          f"load average before/after {load_before:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print()
    print("| model | ms/step | img/s | vs res18 | round spread |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(times["res18"])
    for label, _, _ in variants:
        t = statistics.median(times[label])
        spread = (max(times[label]) - min(times[label])) / t
        print(f"| {label} | {1000 * t:.1f} | {args.batch / t:,.0f} | {t / base:.3f}x | {100 * spread:.0f}% |")


if __name__ == "__main__":
    main()
