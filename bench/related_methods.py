"""Interpretable CNNs and network decoupling on dka's data: train, then measure each paper's checks.

    python bench/related_methods.py train res18-icnn --data scenes-demo32 --seed 0   # one run (resumable)
    python bench/related_methods.py icnn --data scenes-demo32                      # checks -> results/related/icnn/
    python bench/related_methods.py decouple --data scenes-demo32                  # checks -> results/related/decouple/
    python bench/related_methods.py icnn --data scenes-demo32 --seeds 1            # one seed's checks (cached)

Runs live in runs/related/<data>/<model>/seed<S>/ (`dka.train.run`: an interrupted run resumes from its
checkpoint.pt, a finished one is returned as is). The checks read the finished runs of all seeds
given and compare each method with plain res18 trained by the same recipe (RECIPES) on the same
seeds; results/related/<method>/<data>.json and .md hold the numbers (mean +- sd over seeds).
Each seed's checks are cached next to its run (checks_<method>.json, redone when final.pt is newer or
with --recompute), so the checks can run seed by seed in short commands and then be summarised.
CIFAR-10 here is the JPEG copy (`--data-root`); the concept scenes are the stand-in with known masks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Subset

from dka import data, train
from dka.data.images import IMAGENET_MEAN, IMAGENET_STD
from dka.metrics import ConceptTruth
from dka.models import load_model
from dka.related import adversarial, filters, paths
from dka.results import markdown_table, save_json

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOTS = {"scenes-demo32": ROOT / "data" / "scenes-demo32", "cifar10": ROOT / "data" / "cifar10"}
# The recipes: the demo preset (cosine, 1 warm-up epoch, width 16), epochs to fit ~90 CPU-minutes for all runs.
RECIPES = {"scenes-demo32": dict(preset="demo", epochs=12), "cifar10": dict(preset="demo", epochs=4)}
# Method hyperparameters (build options), the recommended recipe; see the closing notes in the results.
OPTIONS = {
    "res18": {},
    "res18-icnn": dict(filter_weight=1.0, tau=0.5),
    "res18-decouple": dict(mi_weight=0.5, align_weight=0.01, sparsity_weight=0.02, open_target=0.5, ramp_steps=300),
}
OUT = ROOT / "results" / "related"


RUNS = ROOT / "runs" / "related"


def run_dir(data_name: str, model: str, seed: int) -> Path:
    return RUNS / data_name / model / f"seed{seed}"


def config(model: str, data_name: str, seed: int, data_root: Path, epochs: int | None = None,
           options: dict | None = None) -> train.TrainConfig:
    recipe = dict(RECIPES[data_name])
    if epochs is not None:
        recipe["epochs"] = epochs
    return train.TrainConfig(model=model, data=data_name, data_root=str(data_root), out=str(run_dir(data_name, model, seed)),
                             seed=seed, model_options={**OPTIONS[model], **(options or {})}, save_head_epochs="none",
                             save_checkpoint_epochs="last", progress=False, **recipe)


def cmd_train(args) -> None:
    started = time.perf_counter()
    options = {k.strip(): yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.option)}
    result = train.run(config(args.model, args.data, args.seed, args.data_root, args.epochs, options))
    last = result.metrics[-1]
    print(f"{args.model} {args.data} seed {args.seed}: epoch {last['epoch']} test top1 {last['test_top1']:.2f} "
          f"aux {last.get('aux_losses')} ({time.perf_counter() - started:.0f} s)")


def finished(data_name: str, model: str, seeds) -> list[tuple[int, dict, Path]]:
    out = []
    for seed in seeds:
        d = run_dir(data_name, model, seed)
        if not (d / "final.pt").is_file():
            sys.exit(f"{d}/final.pt is missing: train it first (python bench/related_methods.py train {model} "
                     f"--data {data_name} --seed {seed})")
        metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        out.append((seed, metrics[-1], d / "final.pt"))
    return out


CHECKS_VERSION = 2  # bump when a check changes: cached per-seed checks of another version are redone


def cached_checks(run: Path, method: str, recompute: bool, compute) -> dict:
    """One seed's checks from `run`/checks_<method>.json if it is current, else `compute()` (then cached)."""
    cache = run / f"checks_{method}.json"
    if cache.is_file() and not recompute and cache.stat().st_mtime >= (run / "final.pt").stat().st_mtime:
        saved = json.loads(cache.read_text())
        if saved.get("version") == CHECKS_VERSION:
            return saved["checks"]
    checks = compute()
    cache.write_text(json.dumps({"version": CHECKS_VERSION, "checks": checks}, indent=1, sort_keys=True))
    return checks


def mean_sd(values) -> dict:
    values = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def fmt(stat: dict, digits: int = 2, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['sd'] * scale:.{digits}f}"


# ------------------------------------------------------------------------------------------- test data


class _Images(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def scenes_test(root: Path):
    """Concept-scenes test images (normalised as in training), labels, per-concept masks, scene labels."""
    truth = ConceptTruth(root, split="test")
    images, labels, masks = [], [], []
    for index, label in truth.items:
        item = truth.broden[index]
        images.append(item["image"])
        labels.append(label)
        masks.append(truth.concept_masks(item["seg"], item["image_labels"], label))
    return _Images(torch.stack(images), torch.tensor(labels)), masks, truth


def materialise(dataset, indices=None) -> _Images:
    """(images, labels) of a dataset in memory (the dka loaders' datasets serve whole batches)."""
    indices = list(range(len(dataset))) if indices is None else list(indices)
    if hasattr(dataset, "__getitems__"):
        x, y = dataset.__getitems__(indices)
    else:
        items = [dataset[i] for i in indices]
        x, y = torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])
    return _Images(x, torch.as_tensor(y))


def test_images(data_name: str, data_root: Path):
    if data_name.startswith("scenes-"):
        images, masks, truth = scenes_test(data_root)
        return images, masks, truth.class_names, truth.scene_labels
    bundle = data.build_loaders(data_name, data_root, batch_size=256, workers=0, augment=False)
    return materialise(bundle.test.dataset), None, bundle.class_names, set()


def batches(dataset, batch_size: int = 256):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


def train_subset(data_name: str, data_root: Path, n: int = 2000, seed: int = 0):
    """Unaugmented training images (a fixed random subset): where the filters' categories are assigned."""
    bundle = data.build_loaders(data_name, data_root, batch_size=256, workers=0, augment=False)
    g = torch.Generator().manual_seed(seed)
    ds = bundle.train.dataset
    return materialise(ds, torch.randperm(len(ds), generator=g)[:n].tolist())


# ------------------------------------------------------------------------------------------- icnn


def icnn_checks(args) -> None:
    torch.set_num_threads(args.threads)
    test, masks, class_names, scene_labels = test_images(args.data, args.data_root)
    fit = train_subset(args.data, args.data_root)
    landmarks = filters.concept_landmarks(masks, exclude=scene_labels) if masks is not None else None
    rows, record = [], {"data": args.data, "recipe": RECIPES[args.data], "options": OPTIONS["res18-icnn"],
                        "seeds": list(args.seeds), "models": {}}
    for model_name in ("res18", "res18-icnn"):
        per_seed = []
        for seed, last, path in finished(args.data, model_name, args.seeds):
            one = cached_checks(path.parent, "icnn", args.recompute,
                                lambda: _icnn_seed(seed, last, path, fit, test, masks, landmarks, class_names))
            per_seed.append(one)
            print(model_name, one, flush=True)
        keys = [k for k in per_seed[0] if k != "seed"]
        summary = {k: mean_sd([s.get(k) for s in per_seed]) for k in keys}
        record["models"][model_name] = {"per_seed": per_seed, "summary": summary}
        rows.append({"model": model_name, "test top-1 (%)": fmt(summary["test_top1"]),
                     "category specificity": fmt(summary["specificity"], 3),
                     **({"location instability": fmt(summary["instability"], 3),
                         "(random peaks)": fmt(summary["instability_random_peaks"], 3),
                         "peak in a true concept": fmt(summary["hit_rate"], 3),
                         "(random cell)": fmt(summary["hit_chance"], 3),
                         "hits in modal concept": fmt(summary["hit_purity"], 3),
                         "peak in the filter's own concept": fmt(summary["concept_rate"], 3),
                         "(random cell, own concept)": fmt(summary["concept_chance"], 3)} if masks is not None else {})})
    plain, icnn = (record["models"][m]["per_seed"] for m in ("res18", "res18-icnn"))
    record["accuracy_cost"] = mean_sd([p["test_top1"] - i["test_top1"] for p, i in zip(plain, icnn)])
    write(OUT / "icnn", args.data, record, rows, title=f"Interpretable CNN vs plain res18 on {label(args.data)}",
          notes=[f"accuracy cost (plain - icnn, paired by seed): {fmt(record['accuracy_cost'])} points",
                 f"chance category specificity: {1 / len(class_names):.3f}"])


def _icnn_seed(seed, last, path, fit, test, masks, landmarks, class_names) -> dict:
    """One finished run's filter checks: categories assigned on training images, measured on test images."""
    model = load_model(path)
    fit_maps = filters.collect_filter_maps(model, batches(fit), progress=False)
    categories = filters.assign_categories(fit_maps.totals, fit_maps.labels, len(class_names))
    maps = filters.collect_filter_maps(model, batches(test), progress=False)
    one = {"seed": seed, "test_top1": last["test_top1"],
           "specificity": filters.category_specificity(maps, categories, len(class_names))["mean_share"],
           "classes_covered": int(categories.unique().numel())}
    if hasattr(model, "filter_classes"):
        one["trained_assignment_agrees"] = float((model.filter_classes.cpu() == categories).float().mean())
    if masks is not None:
        one["instability"] = filters.location_instability(maps, categories, landmarks)["instability"]
        one["instability_random_peaks"] = filters.location_instability(
            filters.random_peaks(maps, seed), categories, landmarks)["instability"]
        hits = filters.concept_hits(maps, categories, masks)
        one.update(hit_rate=hits["hit_rate"], hit_chance=hits["chance"], hit_purity=hits["purity"],
                   concept_rate=hits["concept_rate"], concept_chance=hits["concept_chance"])
    return one


# ------------------------------------------------------------------------------------------- decouple


def decouple_checks(args) -> None:
    torch.set_num_threads(args.threads)
    test, masks, class_names, _ = test_images(args.data, args.data_root)
    fit = train_subset(args.data, args.data_root)
    n_adv = min(args.adversarial, len(test))
    adv_set = Subset(test, range(n_adv))
    timing_set = Subset(test, range(min(args.timing, len(test))))
    record = {"data": args.data, "recipe": RECIPES[args.data], "options": OPTIONS["res18-decouple"],
              "seeds": list(args.seeds), "epsilon": args.epsilon, "models": {}}
    plain_runs = finished(args.data, "res18", args.seeds)
    per_seed = []
    for (seed, last, path), (_, plain_last, plain_path) in zip(finished(args.data, "res18-decouple", args.seeds),
                                                                plain_runs):
        def compute():
            model, plain = load_model(path), load_model(plain_path)
            rec = paths.collect_paths(model, batches(test), progress=False)
            sparsity = paths.gate_sparsity(rec.gates)
            one = {"seed": seed, "test_top1": last["test_top1"], "plain_top1": plain_last["test_top1"],
                   "closed_gates": sparsity["overall"],
                   **{f"closed_{stage}": statistics.fmean(v for k, v in sparsity["layers"].items()
                                                          if k.startswith(stage))
                      for stage in ("layer1", "layer2", "layer3", "layer4")}}
            one.update(_compute_cost(model, plain, timing_set))
            one.update(_timing_at_width({k: float(v.float().mean()) for k, v in rec.gates.items()}, 64,
                                        tuple(test[0][0].shape[1:])))
            one.update(_detection(model, plain, fit, adv_set, len(class_names), args.epsilon, seed))
            if seed == args.seeds[0] and masks is not None and not args.no_dissect:
                _path_table(model, rec, class_names, args, seed)
            return one

        one = cached_checks(path.parent, f"decouple_eps{args.epsilon:.5f}_n{n_adv}", args.recompute, compute)
        per_seed.append(one)
        print(one, flush=True)
    keys = [k for k in per_seed[0] if k != "seed"]
    summary = {k: mean_sd([s[k] for s in per_seed]) for k in keys}
    record["models"]["res18-decouple"] = {"per_seed": per_seed, "summary": summary}
    record["accuracy_cost"] = mean_sd([s["plain_top1"] - s["test_top1"] for s in per_seed])
    s = summary
    rows = [
        {"check": "test top-1 (%): plain res18 / decoupled", "value": f"{fmt(s['plain_top1'])} / {fmt(s['test_top1'])}"},
        {"check": "closed gates (all gated filters, test images)", "value": fmt(s["closed_gates"], 3)},
        {"check": "closed gates per stage (layer1 / 2 / 3 / 4)",
         "value": " / ".join(fmt(s[f"closed_layer{i}"], 2) for i in range(1, 5))},
        {"check": "MACs per image: executed sparse path / plain res18", "value": fmt(s["macs_ratio_vs_plain"], 3)},
        {"check": "MACs per image: executed sparse path / gated dense pass", "value": fmt(s["macs_ratio_vs_dense"], 3)},
        {"check": "max |logit difference| sparse path vs gated pass", "value": fmt(s["max_logit_diff"], 7)},
        {"check": "CPU ms per image (batch 1, 1 thread): plain / gated dense / sparse path",
         "value": f"{fmt(s['ms_plain'])} / {fmt(s['ms_dense'])} / {fmt(s['ms_sparse'])}"},
        {"check": "same, width 64 with gates fixed at the measured open rates (timing only)",
         "value": f"{fmt(s['ms_plain_w64'])} / {fmt(s['ms_dense_w64'])} / {fmt(s['ms_sparse_w64'])}"},
        {"check": f"FGSM eps={args.epsilon:g}: attack success on the decoupled net", "value": fmt(s["attack_success"], 3)},
        {"check": "detection AUC: path surprise (unsupervised)", "value": fmt(s["auc_path_surprise"], 3)},
        {"check": "detection AUC: linear probe on paths (cross-fitted)", "value": fmt(s["auc_path_probe"], 3)},
        {"check": "detection AUC: 1 - max softmax, decoupled / plain res18",
         "value": f"{fmt(s['auc_confidence'], 3)} / {fmt(s['auc_confidence_plain'], 3)}"},
    ]
    write(OUT / "decouple", args.data, record, rows, title=f"Network decoupling (res18-decouple) on {label(args.data)}",
          notes=[f"accuracy cost (plain - decoupled, paired by seed): {fmt(record['accuracy_cost'])} points",
                 f"FGSM on the first {n_adv} test images; timing on the first {len(timing_set)}"])


def _compute_cost(model, plain, images) -> dict:
    """Executed MACs of the sparse path vs the dense passes, output equality, CPU time per image."""
    x = torch.stack([images[i][0] for i in range(len(images))])
    model.eval()
    plain.eval()
    with torch.no_grad():
        gated = model(x)
        sparse, macs = model.sparse_forward(x)
    dense_macs, plain_macs = paths.forward_macs(model, x), paths.forward_macs(plain, x)
    timings = _time_per_image(plain, model, x)
    return {"macs_sparse": float(macs.double().mean()), "macs_dense": dense_macs, "macs_plain": plain_macs,
            "macs_ratio_vs_plain": float(macs.double().mean()) / plain_macs,
            "macs_ratio_vs_dense": float(macs.double().mean()) / dense_macs,
            "max_logit_diff": float((gated - sparse).abs().max()), **timings}


def _timing_at_width(open_rates: dict[str, float], width: int, image_size, n: int = 30) -> dict:
    """CPU ms per image of plain res18 / gated dense / sparse path at another width, the gates fixed to
    open each layer's measured share of filters (random filters, untrained weights: timing only)."""
    from dka.models import build

    g = torch.Generator().manual_seed(0)
    model = build("res18-decouple", 10, stem="cifar", width=width).eval()
    plain = build("res18", 10, stem="cifar", width=width).eval()
    with torch.no_grad():
        for name, block in model.blocks().items():
            for conv, control in (("conv1", block.control1), ("conv2", block.control2)):
                c = control.fc2.out_features
                opened = torch.randperm(c, generator=g)[:max(1, round(open_rates[f"{name}.{conv}"] * c))]
                control.fc2.weight.zero_()
                control.fc2.bias.fill_(-1.0)
                control.fc2.bias[opened] = 1.0
    x = torch.randn(n, 3, *image_size, generator=g)
    return {f"{k}_w{width}": v for k, v in _time_per_image(plain, model, x).items()}


def _time_per_image(plain, model, x) -> dict:
    """Best of 2 interleaved rounds of ms per image at batch 1, one thread: plain, gated dense, sparse path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    timings = {"ms_plain": [], "ms_dense": [], "ms_sparse": []}
    try:
        with torch.no_grad():
            for _ in range(2):  # interleaved rounds: load from other processes hits all three alike
                for name, fn in (("ms_plain", plain), ("ms_dense", model),
                                 ("ms_sparse", lambda z: model.sparse_forward(z)[0])):
                    started = time.perf_counter()
                    for i in range(x.shape[0]):
                        fn(x[i:i + 1])
                    timings[name].append((time.perf_counter() - started) / x.shape[0] * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {k: min(v) for k, v in timings.items()}


def _detection(model, plain, fit, adv_set, num_classes: int, epsilon: float, seed: int) -> dict:
    """FGSM on `adv_set`; AUCs of path surprise, a path probe and the confidence baselines."""
    fit_rec = paths.collect_paths(model, batches(fit), progress=False)
    rates = paths.class_open_rates(fit_rec.gates, fit_rec.labels, num_classes)
    x = torch.stack([adv_set[i][0] for i in range(len(adv_set))])
    y = torch.tensor([int(adv_set[i][1]) for i in range(len(adv_set))])
    out = {}
    for name, net in (("", model), ("_plain", plain)):
        adv = torch.cat([adversarial.fgsm(net, x[i:i + 256], y[i:i + 256], epsilon, IMAGENET_MEAN, IMAGENET_STD)
                         for i in range(0, len(y), 256)])
        with torch.no_grad():
            net.eval()
            clean_logits, adv_logits = net(x).float(), net(adv).float()
        out[f"attack_success{name}"] = float(((adv_logits.argmax(1) != y) & (clean_logits.argmax(1) == y)).float().sum()
                                             / (clean_logits.argmax(1) == y).float().sum().clamp_min(1))
        out[f"auc_confidence{name}"] = adversarial.roc_auc(adversarial.confidence_score(clean_logits),
                                                          adversarial.confidence_score(adv_logits))
        if net is model:
            clean_logits, clean_path = model.paths(x)
            adv_logits, adv_path = model.paths(adv)
            out["auc_path_surprise"] = adversarial.roc_auc(
                adversarial.path_surprise(clean_path, clean_logits.argmax(1), rates),
                adversarial.path_surprise(adv_path, adv_logits.argmax(1), rates))
            out["auc_path_probe"] = adversarial.probe_auc(paths.flatten_path(clean_path), paths.flatten_path(adv_path),
                                                          seed=seed)
    return out


def _path_table(model, rec, class_names, args, seed: int) -> None:
    """Per-class paths through layer3/layer4 with Network Dissection labels of each gated layer's output."""
    from dka.dissection import dissect

    tallies = {}
    for name in model.gated_layers():
        if not name.startswith(("layer3", "layer4")):
            continue
        block, conv = name.rsplit(".", 1)
        module = f"{block}.gate{conv[-1]}"
        tallies[name] = dissect(model, module, args.data_root, batch_size=256, progress=False)
    table = paths.class_paths({k: v for k, v in rec.gates.items() if k in tallies}, rec.labels, class_names,
                              tallies=tallies, top=2)
    out = OUT / "decouple"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"paths_{args.data}.md").write_text(
        f"**Per-class calculation paths of res18-decouple (seed {seed}) on {label(args.data)}**: per class and "
        "gated layer of layer3/layer4, the two filters most specific to the class (open for >= 50% of its test images, "
        "largest excess over the average image), with the Network Dissection concept of the filter (gated output, "
        "concept-scenes export; IoU).\n\n" + markdown_table(table, floatfmt={"open_in_class": ".2f", "open_overall": ".2f",
                                                                         "iou": ".3f"}))
    table.to_csv(out / f"paths_{args.data}.csv", index=False)


# ------------------------------------------------------------------------------------------- output


def label(data_name: str) -> str:
    return {"cifar10": "CIFAR-10 (JPEG copy)", "scenes-demo32": "concept scenes demo32 (stand-in data)"}.get(data_name,
                                                                                                          data_name)


def write(folder: Path, data_name: str, record: dict, rows: list[dict], title: str, notes: list[str]) -> None:
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    save_json(record, folder / f"{data_name}.json")
    recipe = ", ".join(f"{k}={v}" for k, v in {**RECIPES[data_name], "width": 16}.items())
    text = (f"**{title}** — mean ± sd over seeds {', '.join(map(str, record['seeds']))}; recipe: {recipe}; "
            f"options: {record['options']}.\n\n" + markdown_table(pd.DataFrame(rows)) + "\n"
            + "".join(f"- {n}\n" for n in notes))
    (folder / f"{data_name}.md").write_text(text)
    print(text)


def main(argv=None) -> None:
    global RUNS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (or resume) one run")
    t.add_argument("model", choices=sorted(OPTIONS))
    t.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (e.g. a quick check)")
    t.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a build option of OPTIONS (explorations; use another --runs folder)")
    for name in ("icnn", "decouple"):
        c = sub.add_parser(name, help=f"the {name} paper's checks over finished runs")
        c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        c.add_argument("--threads", type=int, default=2)
        c.add_argument("--recompute", action="store_true", help="redo cached per-seed checks")
        if name == "decouple":
            c.add_argument("--epsilon", type=float, default=4 / 255, help="FGSM step in [0, 1] pixels")
            c.add_argument("--adversarial", type=int, default=1000, help="test images attacked")
            c.add_argument("--timing", type=int, default=100, help="test images timed one by one")
            c.add_argument("--no-dissect", action="store_true", help="skip the dissection-labelled path table")
    for c in sub.choices.values():
        c.add_argument("--data", default="scenes-demo32", choices=sorted(RECIPES))
        c.add_argument("--data-root", type=Path, default=None)
        c.add_argument("--runs", type=Path, default=RUNS, help="where the runs live (default runs/related)")
    t.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.data_root = args.data_root or DATA_ROOTS[args.data]
    RUNS = args.runs.resolve()
    {"train": cmd_train, "icnn": icnn_checks, "decouple": decouple_checks}[args.cmd](args)


if __name__ == "__main__":
    main()
