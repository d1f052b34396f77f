"""`cudacnn bench {ops,train,loader,kernels,cnn-kernels,all,compare}`: every suite prints a table and, with
--out DIR, writes DIR/<suite>.json (schema in report.py), DIR/<suite>.md and DIR/<suite>.png.
`cudacnn bench record`: the record presets' seeded runs (bench/record.py)."""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cudacnn.atomic import write_text_atomic
from cudacnn.bench import report
from cudacnn.bench.harness import set_threads
from cudacnn.errors import ConfigError
from cudacnn.train.setup import pick_device

log = logging.getLogger(__name__)
SUITES = ("loader", "ops", "train", "kernels")


def add_commands(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="CPU vs GPU benchmarks: ops, training, loader, kernels")
    sub = bench.add_subparsers(dest="bench_command", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, help="write <suite>.json/.md/.png into this folder")
    common.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: its own choice; stated in results)")
    common.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the CPU and, when present, the GPU; cpu or cuda: that side only")
    common.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    common.add_argument("--repeats", type=int, default=10, help="timed repeats (median and spread reported)")
    common.add_argument("--budget", type=float, default=5.0,
                        help="seconds per case after which repeating stops (at least 3 repeats)")

    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data", help="data source (default: CUDACNN_DATA, else official CIFAR-10)")
    data.add_argument("--cache-dir", type=Path, help="decoded-cache folder (default: CUDACNN_CACHE)")
    data.add_argument("--synthetic", type=int, metavar="N",
                      help="use N random images (and N//5 test images) instead of a data set")
    data.add_argument("--limit-train", type=int, metavar="N", help="use N training images (a seeded random subset)")
    data.add_argument("--limit-test", type=int, metavar="N", help="use N test images (a seeded random subset)")

    ops = sub.add_parser("ops", parents=[common], help="matmul, the zoo's conv layers, ResNet-18 fwd/fwd+bwd")
    add_ops_options(ops)
    ops.set_defaults(func=run_ops)

    train = sub.add_parser("train", parents=[common, data], help="training: CPU vs GPU, naive loop vs our pipeline")
    add_train_options(train)
    train.set_defaults(func=run_train)

    loader = sub.add_parser("loader", parents=[common, data], help="GpuLoader: one augmented epoch")
    add_loader_options(loader)
    loader.set_defaults(func=run_loader)

    kernels = sub.add_parser("kernels", parents=[common], help="custom Triton/CUDA kernels vs PyTorch")
    kernels.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    kernels.set_defaults(func=run_kernels)

    cnn = sub.add_parser("cnn-kernels", parents=[common],
                         help="fused BatchNorm + activation kernels: per op at the zoo's shapes, and per epoch")
    from cudacnn.bench.cnn_kernels import add_options as add_cnn_kernels_options

    add_cnn_kernels_options(cnn)
    cnn.set_defaults(func=run_cnn_kernels)

    every = sub.add_parser("all", parents=[common, data], help="loader, ops, train and kernels in one go")
    add_ops_options(every)
    add_train_options(every)
    add_loader_options(every)
    every.add_argument("--quick", action="store_true", help="kernels suite: small sizes, few repeats")
    every.set_defaults(func=run_all)

    from cudacnn.bench import record

    rec = sub.add_parser("record", help="a record preset's seeded runs: accuracy, device time, FLOPs")
    record.add_options(rec)
    rec.set_defaults(func=record.run)

    comp = sub.add_parser("compare", help="ratios between two result files (e.g. two machines)")
    comp.add_argument("a", type=Path, help="JSON result A")
    comp.add_argument("b", type=Path, help="JSON result B (ratio = A / B)")
    comp.add_argument("--out", type=Path, help="also write the table as markdown to this file")
    comp.set_defaults(func=run_compare)


def add_ops_options(p) -> None:
    p.add_argument("--batch", type=int, default=128, help="batch for conv layers and ResNet-18")
    p.add_argument("--models", default="simple,bn_dropout,smallnet,resnet18",
                   help="comma-separated zoo models whose conv shapes to time")
    p.add_argument("--matmul-size", type=int, default=1024)
    p.add_argument("--no-resnet", action="store_true", help="skip the ResNet-18 forward/backward rows")


def add_train_options(p) -> None:
    p.add_argument("--model", default="simple", help="zoo model to train (default: the Keras tutorial CNN)")
    p.add_argument("--epochs", type=int, default=15, help="epochs of the GPU naive loop and of the pipeline")
    p.add_argument("--cpu-epochs", type=int, default=1, help="epochs of the same loop on the CPU")
    p.add_argument("--cpu-batches", type=int, help="time only this many batches per CPU epoch and scale up")
    p.add_argument("--pipeline-batch", type=int, default=512, help="batch size of our pipeline")
    p.add_argument("--pipeline-lr", type=float, default=8e-3, help="OneCycle peak learning rate of our pipeline")
    p.add_argument("--pipeline-crop", type=int, default=2, help="pipeline: random-crop padding (0 = off)")
    p.add_argument("--pipeline-flip", choices=("none", "random", "alternate"), default="alternate",
                   help="pipeline: horizontal flip mode")
    p.add_argument("--pipeline-smoothing", type=float, default=0.1, help="pipeline: label smoothing")
    p.add_argument("--compile", action="store_true", help="pipeline: torch.compile the model")
    p.add_argument("--no-graph", action="store_true", help="pipeline: no CUDA graph (one launch per op)")
    p.add_argument("--ablation", action="store_true",
                   help="also time the pipeline eager, compiled, and compiled inside the CUDA graph")
    p.add_argument("--no-pipeline", action="store_true", help="only the CPU vs GPU comparison")


def add_loader_options(p) -> None:
    p.add_argument("--loader-batch", type=int, default=512)
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated output dtypes (fp32, bf16, fp16)")
    p.add_argument("--cutouts", default="0,8", help="comma-separated cutout sizes (0 = off)")


# -- helpers
def devices(args) -> list[str]:
    """`auto`: the CPU and, when there is one, the GPU (the suites compare them); else the one asked for."""
    if args.device != "auto":
        return [str(pick_device(args.device))]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def command_line() -> str:
    return "cudacnn " + shlex.join(sys.argv[1:])


def config_of(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}


def load_splits(args):
    """(train, test) splits from --synthetic or the data source, cut to --limit-* if given."""
    from cudacnn.bench.loader import synthetic_split

    if args.synthetic:
        train, test = synthetic_split(args.synthetic, seed=0), synthetic_split(max(args.synthetic // 5, 1), seed=1)
    else:
        from cudacnn.data import load_dataset

        dataset = load_dataset(args.data, cache_dir=args.cache_dir)
        train, test = dataset.train, dataset.test
    return random_subset(train, args.limit_train), random_subset(test, args.limit_test)


def random_subset(split, n: int | None, seed: int = 0):
    """n images drawn at random (seeded): folder-sourced splits are sorted by class, so a prefix is not."""
    if not n or n >= len(split):
        return split
    return split.subset(np.sort(np.random.default_rng(seed).permutation(len(split))[:n]))


def finish(suite: str, rows: list[dict], args) -> dict:
    doc = report.make_document(suite, rows, config_of(args), command_line())
    written = report.write_outputs(doc, args.out)
    for kind, path in written.items():
        log.info("wrote %s", path)
    return doc


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# -- suites
def run_ops(args) -> int:
    from cudacnn.bench import ops

    set_threads(args.threads)
    rows = ops.run(devices(args), _csv(args.models), args.batch, args.matmul_size, args.warmup, args.repeats,
                   args.budget, resnet=not args.no_resnet)
    finish("ops", rows, args)
    return 0


def run_loader(args) -> int:
    from cudacnn.bench import loader

    set_threads(args.threads)
    train, _ = load_splits(args)
    rows = loader.run(train, devices(args), args.loader_batch, _csv(args.dtypes),
                      [int(c) for c in _csv(args.cutouts)], warmup=max(args.warmup, 1),
                      repeats=max(args.repeats, 3), budget_s=args.budget)
    finish("loader", rows, args)
    return 0


def run_train(args) -> int:
    from cudacnn.bench import train as bt
    from cudacnn.bench.ops import build_zoo_model
    from cudacnn.bench.report import measurement, result_row
    from cudacnn.data import Augment

    set_threads(args.threads)
    train, test = load_splits(args)
    sides = devices(args)
    torch.manual_seed(0)
    initial = build_zoo_model(args.model)
    recipe_name = f"{args.model}: Adam 1e-3, batch 32, fp32, eager, per-batch copies from NumPy"
    runs = {}
    for device in sides:
        epochs = args.cpu_epochs if device == "cpu" else args.epochs
        log.info("naive loop on %s, %d epochs", device, epochs)
        runs[device] = bt.train_naive(bt.fresh(initial), train, test, device, epochs,
                                      max_batches=args.cpu_batches if device == "cpu" else None,
                                      eval_epochs={args.cpu_epochs}, label=f"naive {device}")
    # Sequential vs parallel: accuracies compared after the same number of epochs (the CPU's).
    cpu_vs_gpu = {d: measurement(r.stats, accuracy=r.extra["accuracy_at"].get(args.cpu_epochs), note=r.note)
                  for d, r in runs.items()}
    rows = [result_row(f"{args.model} epoch, CPU vs GPU", f"same recipe ({recipe_name}); accuracy after "
                       f"{args.cpu_epochs} epoch(s)", cpu_vs_gpu,
                       epochs={d: r.epochs for d, r in runs.items()},
                       batches_per_epoch=runs[sides[0]].batches_per_epoch)]
    if not args.no_pipeline:
        device = sides[-1]
        naive = runs[device]
        if naive.epochs != args.epochs:  # the CPU-only case: the naive side ran --cpu-epochs
            log.info("naive loop on %s for %d epochs, to compare accuracy", device, args.epochs)
            naive = bt.train_naive(bt.fresh(initial), train, test, device, args.epochs,
                                   max_batches=args.cpu_batches, label=f"naive {device}")
        base = bt.PipelineRecipe(batch_size=args.pipeline_batch, lr=args.pipeline_lr,
                                 label_smoothing=args.pipeline_smoothing,
                                 augment=Augment(crop_pad=args.pipeline_crop, flip=args.pipeline_flip),
                                 compile=args.compile, cuda_graph=not args.no_graph)
        recipes = [base]
        if args.ablation and device == "cuda":
            recipes += [replace(base, compile=c, cuda_graph=g) for c, g in ((False, False), (True, False), (True, True))
                        if (c, g) != (base.compile, base.cuda_graph)]
        for recipe in recipes:
            rows.append(pipeline_row(args, device, naive, recipe, initial, train, test))
    finish("train", rows, args)
    return 0


def pipeline_row(args, device, naive, recipe, initial, train, test) -> dict:
    from cudacnn.bench import train as bt
    from cudacnn.bench.report import measurement, result_row

    if device != "cuda":
        recipe = replace(recipe, compile=False)  # inductor on CPU needs a C++ toolchain; keep tests light
    log.info("our pipeline (%s) on %s, %d epochs", recipe.label, device, args.epochs)
    fast = bt.train_pipeline(bt.fresh(initial), train, test, device, args.epochs, recipe)
    pair = {"naive": measurement(naive.stats, accuracy=naive.accuracy, note=naive.note),
            "pipeline": measurement(fast.stats, accuracy=fast.accuracy)}
    row = result_row(f"{args.model} epoch, naive loop vs our pipeline ({fast.extra['variant']}, "
                     f"batch {recipe.batch_size})",
                     f"{device}: naive loop vs GPU-resident pipeline, {args.epochs} epochs, accuracy after the last",
                     pair, device=device, epochs=args.epochs, **fast.extra, pipeline_batch=recipe.batch_size,
                     pipeline_wall_s=round(fast.wall_s, 2), naive_wall_s=round(naive.wall_s, 2))
    row["info"]["target"] = ">= 30x faster per epoch at equal or better accuracy"
    row["info"]["meets_target"] = bool(row["speedup"] and row["speedup"] >= 30 and fast.accuracy >= naive.accuracy)
    return row


def run_kernels(args) -> int:
    try:
        kbench = importlib.import_module("cudacnn.kernels.bench")
    except ModuleNotFoundError as exc:
        if exc.name != "cudacnn.kernels.bench":
            raise
        raise ConfigError("the kernels benchmark (cudacnn.kernels.bench) is not part of this install; "
                          "run `cudacnn bench ops` or `cudacnn bench train` instead")
    if not torch.cuda.is_available() or args.device == "cpu":
        raise ConfigError("the kernels benchmark needs a CUDA GPU (its CPU tests run under TRITON_INTERPRET=1)")
    set_threads(args.threads)
    rows = [kernel_row(r) for r in kbench.run(quick=args.quick)]
    finish("kernels", rows, args)
    return 0


def run_cnn_kernels(args) -> int:
    from cudacnn.bench import cnn_kernels

    from cudacnn.train.presets import PRESETS

    presets = _csv(args.presets)
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ConfigError(f"unknown preset(s) {', '.join(unknown)} in --presets; choose from {', '.join(PRESETS)}")
    if args.no_eager and args.no_compile and not args.cuda_graphs and not args.no_epochs:
        raise ConfigError("--no-eager with --no-compile leaves no epoch rows to time; drop one, or add --no-epochs "
                          "or --cuda-graphs")
    if args.profile and args.no_epochs:
        raise ConfigError("--profile profiles the training epochs, which --no-epochs skips; drop one of the two")
    if not torch.cuda.is_available() or args.device == "cpu":
        raise ConfigError("the cnn-kernels benchmark needs a CUDA GPU (its CPU tests run under TRITON_INTERPRET=1)")
    set_threads(args.threads)
    rows = []

    def save(new_rows):  # the JSON so far after every case: a run cut short keeps what it measured
        rows.extend(new_rows)
        if args.out:
            report.write_json(report.make_document("cnn-kernels", rows, config_of(args), command_line()),
                              Path(args.out) / "cnn-kernels.json")

    if not args.no_ops:
        cnn_kernels.op_rows(compile=not args.no_compile, warmup=max(args.warmup, 3), repeats=max(args.repeats, 20),
                            only=args.op, on_rows=save)
    if not args.no_epochs or args.accuracy_seeds:
        from cudacnn.data import load_dataset

        dataset = load_dataset(args.data, cache_dir=args.cache_dir)
        if not args.no_epochs:
            modes = ((() if args.no_eager else ("eager",)) + (("graphs",) if args.cuda_graphs else ())
                     + (() if args.no_compile else tuple(_csv(args.compile_modes))))
            cnn_kernels.train_rows(dataset, presets, modes, args.train_images, args.data, on_rows=save,
                                   profile=args.profile, timed_epochs=args.timed_epochs)
        if args.accuracy_seeds:
            cnn_kernels.accuracy_rows(dataset, presets, args.accuracy_seeds, args.accuracy_epochs, args.data,
                                      on_rows=save)
    finish("cnn-kernels", rows, args)
    return 0


def kernel_row(row: dict) -> dict:
    """A kernels-suite row, named uniquely (name, shape, dtype) for compare, its ratio
    (baseline / ours) plotted as the speedup."""
    row = dict(row)
    row["name"] = " ".join(str(row[k]) for k in ("name", "shape", "dtype") if row.get(k) is not None) or "kernel"
    if "speedup" not in row and isinstance(row.get("ratio"), (int, float)):
        row["speedup"] = row["ratio"]
    return row


def run_all(args) -> int:
    for suite, fn in (("loader", run_loader), ("ops", run_ops), ("train", run_train), ("kernels", run_kernels)):
        log.info("== bench %s", suite)
        try:
            fn(args)
        except ConfigError as exc:
            if suite != "kernels":
                raise
            log.warning("skipping kernels: %s", exc)
    return 0


def run_compare(args) -> int:
    from rich.console import Console
    from rich.table import Table

    a, b = report.read_json(args.a), report.read_json(args.b)
    if a["suite"] != b["suite"]:
        raise ConfigError(f"{args.a} is a '{a['suite']}' result but {args.b} is '{b['suite']}'; "
                          "compare two results of the same suite")
    rows = report.compare(a, b)
    console = Console()
    for tag, doc, path in (("A", a, args.a), ("B", b, args.b)):
        env = doc["environment"]
        console.print(f"{tag}: {path}: {env.get('gpu') or 'no GPU'}, {env.get('cpu_model')} "
                      f"({env.get('torch_threads')} threads), {env.get('date')}")
    header, body = report.compare_table(rows)
    table = Table(*header, title=f"cudacnn bench compare ({a['suite']})")
    for cells in body:
        table.add_row(*cells)
    console.print(table)
    if not rows:
        console.print("no rows in common")
    if args.out:
        write_text_atomic(args.out, report.compare_markdown(rows, str(args.a), str(args.b)))
    return 0
