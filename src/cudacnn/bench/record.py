"""`cudacnn bench record --preset fast94 --runs N [--set KEY=VALUE]`: a record preset's seeded runs in one process,
timed as the recipe times them (device events from the whitening init through the final TTA evaluation; the
compile warm-up and decoding excluded), with each run's training FLOPs and the fraction of the GPU's dense
fp16 peak that reached."""

from __future__ import annotations

import json
import logging
import statistics
import time

import torch
import torch.nn.functional as F

from cudacnn.atomic import write_text_atomic
from cudacnn.bench.harness import environment
from cudacnn.errors import ConfigError
from cudacnn.tables import md_table
from cudacnn.train.fast.config import RecordConfig

log = logging.getLogger(__name__)

# Dense fp16/bf16 tensor-core peaks (vendor datasheets, without sparsity), by part of the device's name (the H100
# PCIe card has a lower peak and is not listed)
DENSE_FP16_PEAK = {"H100 80GB HBM3": 989.4e12, "H100 SXM": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def add_options(p) -> None:
    from cudacnn.train.presets import RECORD_PRESETS

    p.add_argument("--preset", choices=RECORD_PRESETS, required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="first seed; runs use seed, seed+1, ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change a recipe setting")
    p.add_argument("--data", help="data source (default: CUDACNN_DATA, else official CIFAR-10)")
    p.add_argument("--cache-dir", help="decoded-cache folder (default: CUDACNN_CACHE)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--budget-s", type=float, help="start no new run after this many wall-clock seconds")
    p.add_argument("--out", help="write record-<preset>.json and .md into this folder")


def run(args) -> int:
    from cudacnn.data import load_dataset
    from cudacnn.train.fast.config import parse_settings
    from cudacnn.train.fast.recipe import resolve_config, train_fast, warmup
    from cudacnn.train.setup import pick_device
    from cudacnn.train.sweep import summarize

    started = time.perf_counter()
    if args.runs < 1:
        raise ConfigError("--runs must be at least 1")
    overrides = parse_settings(args.set)
    cfg = resolve_config(args.preset, overrides)
    device = pick_device(args.device)
    compile = not args.no_compile
    dataset = load_dataset(args.data, cache_dir=args.cache_dir, quiet=True)
    flops = training_flops(cfg, dataset)
    peak = dense_fp16_peak(device)
    if compile and device.type == "cuda":
        t0 = time.perf_counter()
        warmup(args.preset, dataset, str(device), **overrides)
        log.info("%s compile warm-up %.1f s", args.preset, time.perf_counter() - t0)
    label = args.preset + "".join(f" {k}={v}" for k, v in overrides.items())
    rows = []
    for i in range(args.runs):
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            log.info("budget reached after %d runs", i)
            break
        result = train_fast(args.preset, dataset, seed=args.seed + i, device=str(device), compile=compile,
                            log=log.info, **overrides)
        rows.append(dict(setting=label, seed=args.seed + i, test_acc=result.test_acc,
                         test_acc_plain=result.test_acc_plain, train_time_s=result.train_time_s,
                         eval_time_s=result.eval_time_s, pflops=flops / 1e15,
                         peak_fraction=flops / result.train_time_s / peak if peak else None))
    if not rows:
        return 1
    table = summarize(rows)[0]
    table.update(pflops=flops / 1e15, median_peak_fraction=median_of(rows, "peak_fraction"),
                 acc_plain_mean=sum(r["test_acc_plain"] for r in rows) / len(rows))
    text = markdown(table, rows)
    print(text)
    if args.out:
        doc = {"suite": "record", "preset": args.preset, "recipe": {**cfg.__dict__}, "environment": environment(),
               "summary": table, "rows": rows}
        write_text_atomic(f"{args.out}/record-{args.preset}.json", json.dumps(doc, indent=2))
        write_text_atomic(f"{args.out}/record-{args.preset}.md", text)
    return 0


def training_flops(cfg: RecordConfig, dataset) -> float:
    """FLOPs of the whole timed run, counted by PyTorch's FlopCounterMode on the net's forward and backward of
    one training step and one evaluation forward (convolutions and matrix products; elementwise work and the
    optimizers' own arithmetic are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode  # heavy: kept off the CLI's start-up

    from cudacnn.evaluate.tta import TTA_VIEWS
    from cudacnn.models import create_model
    from cudacnn.models.commands import count_flops

    # on the meta device: shapes only, no arithmetic
    model = create_model(cfg.model, num_classes=dataset.num_classes, activation=cfg.activation).to("meta")
    images = torch.empty(cfg.examples_per_step, 3, 32, 32, device="meta")
    labels = torch.zeros(len(images), dtype=torch.long, device="meta")
    step_flops = {}
    for bias_grad in (True, False):  # once the whitening bias stops learning, backward skips the first conv's dx
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(images, whiten_bias_grad=bias_grad), labels, reduction="sum").backward()
        step_flops[bias_grad] = counter.get_total_flops()
    steps_per_epoch = len(dataset.train) // cfg.batch_size
    steps = cfg.total_steps(steps_per_epoch)
    learning = min(steps, cfg.whiten_bias_steps(steps_per_epoch))
    views = TTA_VIEWS[cfg.tta_level]
    # selective TTA: one plain pass over every test image, the views over the least confident fraction
    per_image = views if cfg.tta_fraction == 1 or views == 1 else 1 + cfg.tta_fraction * views
    return (learning * step_flops[True] + (steps - learning) * step_flops[False]
            + per_image * len(dataset.test) * count_flops(model))


def dense_fp16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DENSE_FP16_PEAK.items() if key in name), None)


def median_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def markdown(table: dict, rows: list[dict]) -> str:
    per_run = md_table(["seed", "TTA acc", "plain acc", "time (s)", "of it eval (s)", "PFLOPs", "of fp16 peak"],
                       [[r["seed"], f"{r['test_acc']:.4f}", f"{r['test_acc_plain']:.4f}", f"{r['train_time_s']:.3f}",
                         f"{r['eval_time_s']:.3f}", f"{r['pflops']:.3f}",
                         "-" if r["peak_fraction"] is None else f"{r['peak_fraction']:.1%}"] for r in rows])
    fraction = table["median_peak_fraction"]
    summary = md_table(["setting", "runs", "TTA acc mean", "std", "min", "max", "median time (s)", "PFLOPs",
                        "of fp16 peak"],
                       [[table["setting"], table["runs"], f"{table['acc_mean']:.4f}", f"{table['acc_std']:.4f}",
                         f"{table['acc_min']:.4f}", f"{table['acc_max']:.4f}", f"{table['train_time_median_s']:.3f}",
                         f"{table['pflops']:.3f}", "-" if fraction is None else f"{fraction:.1%}"]])
    return per_run + "\n\n" + summary + "\n"
