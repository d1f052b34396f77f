"""Choose the pipeline recipe of `cudacnn bench train` on a validation split, never on the test set:
a few (batch, peak lr, crop, flip) variants trained eagerly for the same epochs on 45k images and scored
on the held-out 5k. Prints the winner as `cudacnn bench train` options (last line of stdout).

    PYTHONPATH=src python3 -m cudacnn.bench.recipe_sweep --data PATH [--epochs 15] [--json out.json]"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from cudacnn.atomic import write_text_atomic
from cudacnn.bench.commands import random_subset
from cudacnn.bench.ops import build_zoo_model
from cudacnn.bench.train import PipelineRecipe, train_pipeline
from cudacnn.data import Augment, load_dataset, split_validation

# (batch, peak lr, crop pad, flip)
VARIANTS = [(512, 4e-3, 2, "alternate"), (512, 4e-3, 0, "alternate"), (512, 8e-3, 0, "alternate"),
            (512, 2e-3, 2, "alternate"), (1024, 8e-3, 2, "alternate"), (512, 8e-3, 2, "alternate"),
            (512, 4e-3, 4, "alternate"), (256, 4e-3, 2, "alternate")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data")
    p.add_argument("--model", default="simple")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--variants", type=int, default=len(VARIANTS), help="try only the first N variants")
    p.add_argument("--limit", type=int, help="N training images, a seeded random subset (tests)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = load_dataset(args.data, quiet=True)
    train = random_subset(data.train, args.limit)
    fit, val = split_validation(train, 0.1, seed=0)
    results = []
    for batch, lr, crop, flip in VARIANTS[:args.variants]:
        torch.manual_seed(0)
        recipe = PipelineRecipe(batch_size=batch, lr=lr, augment=Augment(crop_pad=crop, flip=flip), compile=False)
        run = train_pipeline(build_zoo_model(args.model), fit, val, args.device, args.epochs, recipe)
        results.append({"batch": batch, "lr": lr, "crop": crop, "flip": flip, "val_accuracy": run.accuracy,
                        "eager_epoch_ms": run.stats.median_ms})
        print(f"batch {batch:5d} lr {lr:.0e} crop {crop} flip {flip:9s} val {100 * run.accuracy:.2f}% "
              f"eager epoch {run.stats.median_ms:.1f} ms", flush=True)
    best = max(results, key=lambda r: r["val_accuracy"])
    if args.json:
        write_text_atomic(args.json, json.dumps({"epochs": args.epochs, "model": args.model, "results": results,
                                                 "best": best}, indent=2))
    print(f"--pipeline-batch {best['batch']} --pipeline-lr {best['lr']} --pipeline-crop {best['crop']} "
          f"--pipeline-flip {best['flip']}")


if __name__ == "__main__":
    main()
