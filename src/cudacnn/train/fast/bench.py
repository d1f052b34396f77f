"""Benchmark runner: `python3 -m cudacnn.train.fast.bench --preset fast94 --runs 5 [--set epochs=7]`.
Prints each run, then mean/min/max TTA accuracy and the median device time per variant."""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from cudacnn.data import load_dataset
from cudacnn.train.fast.recipe import FastConfig, train_fast, warmup

DEFAULT_DATA = ".data/cifar10-jpeg.tar.gz"


def parse_overrides(items: list[str]) -> dict:
    """['epochs=7', 'cutout=0'] -> {'epochs': 7.0, 'cutout': 0}, typed like FastConfig's fields."""
    fields = FastConfig.__dataclass_fields__
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown option {key!r}; known: {sorted(fields)}")
        default = getattr(FastConfig("fast94", 1.0), key)
        kind = int if default is None else type(default)  # max_steps: int or None
        out[key] = None if value == "None" else (kind(value) if kind in (int, float) else value)
    return out


def summarize(label: str, results) -> dict:
    accs = [r.test_acc for r in results]
    times = [r.train_time_s for r in results]
    return dict(variant=label, runs=len(results), mean_acc=statistics.mean(accs), min_acc=min(accs),
                max_acc=max(accs), mean_plain=statistics.mean(r.test_acc_plain for r in results),
                median_s=statistics.median(times), min_s=min(times), max_s=max(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="fast94", choices=["fast94", "fast96"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="first seed; runs use seed, seed+1, ...")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a FastConfig field (repeatable)")
    parser.add_argument("--json", help="append the summary as one JSON line to this file")
    args = parser.parse_args(argv)

    dataset = load_dataset(args.data, quiet=True)
    overrides = parse_overrides(args.set)
    compile = not args.no_compile
    if compile and torch.device(args.device).type == "cuda":
        warmup(args.preset, dataset, args.device)
    results = [train_fast(args.preset, dataset, seed=args.seed + i, device=args.device, compile=compile,
                          **overrides) for i in range(args.runs)]
    label = args.preset + "".join(f" {k}={v}" for k, v in overrides.items())
    summary = summarize(label, results)
    print(f"{label}: {summary['runs']} runs, TTA acc mean {summary['mean_acc']:.4f} "
          f"(min {summary['min_acc']:.4f}, max {summary['max_acc']:.4f}; plain {summary['mean_plain']:.4f}), "
          f"median time {summary['median_s']:.3f} s (min {summary['min_s']:.3f}, max {summary['max_s']:.3f})")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(dict(summary, accs=[r.test_acc for r in results],
                                    times=[r.train_time_s for r in results])) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
