"""Benchmark runner.

    python3 -m cudacnn.train.fast.bench --preset fast94 --runs 5 [--set epochs=7]
    python3 -m cudacnn.train.fast.bench --runs 5 --variant fast94 --variant fast94:epochs=7,lookahead_every=5

Each variant runs `--runs` seeds after one compile warm-up per preset; prints each run, then per variant
the mean/min/max TTA accuracy and the median device time, and a table of all variants at the end."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from cudacnn.data import load_dataset
from cudacnn.train.fast.recipe import PRESETS, FastConfig, train_fast, warmup

DEFAULT_DATA = ".data/cifar10-jpeg.tar.gz"


def parse_overrides(items: list[str]) -> dict:
    """['epochs=7', 'cutout=0'] -> {'epochs': 7.0, 'cutout': 0}, typed like FastConfig's fields."""
    fields = FastConfig.__dataclass_fields__
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields or key == "model":
            raise SystemExit(f"unknown option {key!r}; known: {sorted(set(fields) - {'model'})}")
        default = getattr(FastConfig("fast94", 1.0), key)
        kind = int if default is None else type(default)  # max_steps: int or None
        out[key] = None if value == "None" else (kind(value) if kind in (int, float) else value)
    return out


def parse_variant(spec: str, runs: int) -> tuple[str, dict, int]:
    """'fast94:epochs=7,cutout=0@3' -> ('fast94', {'epochs': 7.0, 'cutout': 0}, 3); no '@N': `runs`."""
    spec, _, count = spec.partition("@")
    preset, _, rest = spec.partition(":")
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r} in variant {spec!r}; choose one of {sorted(PRESETS)}")
    return preset, parse_overrides([kv for kv in rest.split(",") if kv]), int(count) if count else runs


def summarize(label: str, results) -> dict:
    accs = [r.test_acc for r in results]
    times = [r.train_time_s for r in results]
    return dict(variant=label, runs=len(results), mean_acc=statistics.mean(accs), min_acc=min(accs),
                max_acc=max(accs), mean_plain=statistics.mean(r.test_acc_plain for r in results),
                median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                median_eval_s=statistics.median(r.eval_time_s for r in results),
                accs=accs, times=times)


def describe_device(device: str) -> str:
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else platform.processor() or "cpu"
    return f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast94", choices=sorted(PRESETS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a FastConfig field of --preset (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar="PRESET[:K=V,...][@RUNS]",
                        help="run this variant instead of --preset/--set (repeatable)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="first seed; runs use seed, seed+1, ...")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new run after this many wall-clock seconds")
    parser.add_argument("--json", help="append each variant's summary as a JSON line to this file")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    variants = ([parse_variant(v, args.runs) for v in args.variant]
                or [(args.preset, parse_overrides(args.set), args.runs)])
    print(describe_device(args.device), flush=True)
    dataset = load_dataset(args.data, quiet=True)
    print(f"data ready in {time.perf_counter() - start:.1f} s", flush=True)
    compile = not args.no_compile
    summaries = []
    for preset, overrides, runs in variants:
        label = preset + "".join(f" {k}={v}" for k, v in overrides.items())
        results = []
        for i in range(runs):
            if args.budget_s and time.perf_counter() - start > args.budget_s:
                print(f"budget reached; skipping the rest of {label}", flush=True)
                break
            if i == 0 and compile and torch.device(args.device).type == "cuda":
                t0 = time.perf_counter()
                warmup(preset, dataset, args.device, **overrides)
                print(f"{preset} warm-up (compile) {time.perf_counter() - t0:.1f} s", flush=True)
            results.append(train_fast(preset, dataset, seed=args.seed + i, device=args.device, compile=compile,
                                      log=lambda s: print(s, flush=True), **overrides))
        if not results:
            continue
        summary = summarize(label, results)
        summaries.append(summary)
        print(f"{label}: {summary['runs']} runs, TTA acc mean {summary['mean_acc']:.4f} "
              f"(min {summary['min_acc']:.4f}, max {summary['max_acc']:.4f}; plain {summary['mean_plain']:.4f}), "
              f"median time {summary['median_s']:.3f} s (evaluation {summary['median_eval_s']:.3f} s)", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(summary) + "\n")
    print(f"\n{'variant':<48} {'runs':>4} {'mean':>7} {'min':>7} {'max':>7} {'plain':>7} {'med s':>7}")
    for s in summaries:
        print(f"{s['variant']:<48} {s['runs']:>4} {100 * s['mean_acc']:>7.2f} {100 * s['min_acc']:>7.2f} "
              f"{100 * s['max_acc']:>7.2f} {100 * s['mean_plain']:>7.2f} {s['median_s']:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
