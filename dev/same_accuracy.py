"""Same accuracy with our kernels? Full trainings of presets with --kernels torch and --kernels triton, several
seeds each, run as parallel processes on one GPU, then the test accuracies side by side.

`cudacnn bench cnn-kernels --accuracy-seeds N` runs the same trainings one after another. Eager trainings of
the zoo's small nets leave an H100 mostly idle (they are host-bound), so running many at once gives the same
accuracies in a fraction of the time; the accuracy of a training does not depend on how fast it ran.

    PYTHONPATH=src python3 dev/same_accuracy.py --data .data/cifar10-jpeg.tar.gz --jobs 12 \
        --presets smallnet-plus,bn-dropout-plus --seeds 3 --json $OUT/accuracy.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean


def train_one(preset: str, kernels: str, seed: int, data: str, epochs: int | None, cuda_graphs: bool) -> dict:
    """One full training in this process (the bench's own, cnn_kernels.full_training); its test accuracy and wall
    time."""
    from cudacnn.bench.cnn_kernels import full_training
    from cudacnn.data import load_dataset

    dataset = load_dataset(data, quiet=True)
    start = time.time()
    result = full_training(preset, kernels, seed, dataset, epochs, data, device="auto", cuda_graphs=cuda_graphs)
    return dict(preset=preset, kernels=kernels, seed=seed, cuda_graphs=cuda_graphs,
                test_accuracy=round(result.test_accuracy, 4), epochs=result.epochs_done,
                wall_s=round(time.time() - start, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--presets", default="smallnet-plus,resnet18-cifar,bn-dropout-plus")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--kernels", default="torch,triton",
                   help="the settings to train (one alone: against the other's accuracies from an earlier run)")
    p.add_argument("--epochs", type=int, help="default: each preset's own")
    p.add_argument("--cuda-graphs", action="store_true", help="train with --cuda-graphs")
    p.add_argument("--jobs", type=int, default=6, help="trainings at once")
    p.add_argument("--json", type=Path, help="also write the runs and the summary here")
    p.add_argument("--one", nargs=3, metavar=("PRESET", "KERNELS", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # a child: one training, one JSON line
        preset, kernels, seed = args.one
        print(json.dumps(train_one(preset, kernels, int(seed), args.data, args.epochs, args.cuda_graphs)), flush=True)
        return

    def child(run):
        command = [sys.executable, __file__, "--data", args.data, "--one", *map(str, run)]
        if args.epochs:
            command += ["--epochs", str(args.epochs)]
        if args.cuda_graphs:
            command += ["--cuda-graphs"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            return dict(zip(("preset", "kernels", "seed"), run), error=done.stderr.strip().splitlines()[-1:])
        print(done.stdout.strip(), flush=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    settings = args.kernels.split(",")
    runs = [(preset, kernels, seed) for preset in args.presets.split(",") for kernels in settings
            for seed in range(args.seeds)]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(child, runs))
    summary = {}
    print(f"\n{'preset':18s} {'kernels':8s} {'accuracies':28s} mean")
    for preset in args.presets.split(","):
        for kernels in settings:
            accs = [r["test_accuracy"] for r in results
                    if r["preset"] == preset and r["kernels"] == kernels and "test_accuracy" in r]
            summary[f"{preset} {kernels}"] = dict(accuracies=accs, mean=round(mean(accs), 4) if accs else None)
            shown = " ".join(f"{a:.4f}" for a in accs)
            print(f"{preset:18s} {kernels:8s} {shown:28s} {mean(accs):.4f}" if accs else f"{preset} {kernels}: none")
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"failed: {r}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(dict(runs=results, summary=summary), indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
