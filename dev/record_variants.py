"""Record-recipe variants side by side in one process: each variant (a set of `--set` overrides of a preset)
runs the same seeds; prints a row per run and a summary per variant (mean TTA accuracy, median time, and both
as differences / ratios to the first variant; the run's FLOPs and their rate as a fraction of the GPU's dense
fp16 peak, counted as `cudacnn bench record` counts them). `cudacnn bench record` benchmarks one preset for users (per-run
table with FLOPs, JSON, the machine); this compares settings in one process, as benchmarks/fast.md's
side-by-side tables do.

    PYTHONPATH=src python3 dev/record_variants.py --preset fast94 --runs 10 --data .data/cifar10-jpeg.tar.gz \
        --variant "" --variant "activation=silu,ns_steps=3" [--budget-s 400] [--json $OUT/variants.json] \
        [--profile $OUT/profile.txt] [--sync-debug $OUT/sync.txt]

`--profile` runs the first variant once more, right after its runs, under torch.profiler (its warm-up reused),
and writes its ops and kernels sorted by GPU time, with the sum of kernel time beside the run's timed span (the
sum also holds the kernels outside that span: the weights' reset, the loaders, the plain evaluation).
`--sync-debug` runs it once more with CUDA's sync debug mode and writes each call site where the host waited
on the device, with its count (the weights' reset and the whitening init wait; the steps should not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

from cudacnn.bench.cnn_kernels import write_profile
from cudacnn.bench.record import dense_fp16_peak, training_flops
from cudacnn.data import load_dataset
from cudacnn.tables import md_table
from cudacnn.train.fast.config import parse_settings
from cudacnn.train.fast.recipe import resolve_config, train_fast, warmup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fast94")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--data", required=True)
    p.add_argument("--variant", action="append", default=[], help="comma-separated KEY=VALUE overrides")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no new variant after this long")
    p.add_argument("--json")
    p.add_argument("--profile", help="write one profiled run of the first variant here")
    p.add_argument("--sync-debug", help="write where one run of the first variant makes the host wait on the GPU")
    args = p.parse_args()
    started = time.perf_counter()
    dataset = load_dataset(args.data, quiet=True)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    peak = dense_fp16_peak(torch.device("cuda"))
    results = []
    for spec in args.variant or [""]:
        if time.perf_counter() - started > args.budget_s:
            print(f"budget reached: {spec!r} not run", flush=True)
            continue
        overrides = parse_settings([s for s in spec.split(",") if s])
        t0 = time.perf_counter()
        runs = []
        try:  # a variant that fails is reported and skipped; the others still run
            warmup(args.preset, dataset, "cuda", **overrides)
            print(f"[{spec or 'preset'}] warm-up {time.perf_counter() - t0:.0f} s", flush=True)
            for seed in range(args.runs):
                r = train_fast(args.preset, dataset, seed=seed, device="cuda", log=lambda *_: None, **overrides)
                runs.append((r.test_acc, r.train_time_s, r.eval_time_s))
                print(f"[{spec or 'preset'}] seed {seed}: acc {r.test_acc:.4f} time {r.train_time_s:.3f} s "
                      f"(eval {r.eval_time_s:.3f})", flush=True)
        except Exception:
            print(f"[{spec or 'preset'}] failed:\n{traceback.format_exc()}", flush=True)
            if not runs:
                continue
        accs, times = [a for a, _, _ in runs], [t for _, t, _ in runs]
        flops = training_flops(resolve_config(args.preset, overrides), dataset)
        time_median = statistics.median(times)
        results.append(dict(variant=spec or "preset", runs=len(runs), acc_mean=statistics.fmean(accs),
                            acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0, time_median=time_median,
                            eval_median=statistics.median(e for *_, e in runs), pflops=flops / 1e15,
                            peak_fraction=flops / time_median / peak if peak else None))
        if args.profile and len(results) == 1:
            profile_run(args.preset, dataset, overrides, args.profile)
        if args.sync_debug and len(results) == 1:
            sync_debug_run(args.preset, dataset, overrides, args.sync_debug)
    base = results[0]
    print(md_table(["variant", "runs", "TTA acc", "std", "median s", "eval s", "acc vs first", "time vs first",
                    "PFLOPs", "of fp16 peak"],
                   [[r["variant"], r["runs"], f"{r['acc_mean']:.4f}", f"{r['acc_std']:.4f}", f"{r['time_median']:.3f}",
                     f"{r['eval_median']:.3f}", f"{100 * (r['acc_mean'] - base['acc_mean']):+.2f} pt",
                     f"{r['time_median'] / base['time_median']:.3f}x", f"{r['pflops']:.3f}",
                     "-" if r["peak_fraction"] is None else f"{r['peak_fraction']:.1%}"] for r in results]),
          flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def profile_run(preset: str, dataset, overrides: dict, path: str) -> None:
    runs = []
    write_profile(lambda: runs.append(train_fast(preset, dataset, seed=0, device="cuda", log=lambda *_: None,
                                                 **overrides)), Path(path), f"{preset} {overrides}")
    print(f"profile: {runs[0].train_time_s:.3f} s device time (profiled) -> {path}", flush=True)


def sync_debug_run(preset: str, dataset, overrides: dict, path: str) -> None:
    """One run with CUDA sync debugging on: every call that makes the host wait on the device (a pageable
    host-to-device copy, an .item()) warns; each distinct call site is written with its count."""
    import collections
    import warnings

    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        sites["".join(traceback.format_stack(limit=8)[:-1]) + f"  -> {message}\n"] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record  # catch_warnings puts the old one back
            train_fast(preset, dataset, seed=0, device="cuda", log=lambda *_: None, **overrides)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with open(path, "w") as f:
        for stack, count in sites.most_common():
            f.write(f"==== {count} times\n{stack}\n")
    print(f"sync debug: {sum(sites.values())} waits at {len(sites)} call sites -> {path}", flush=True)


if __name__ == "__main__":
    main()
