"""The CPU-sized default: `cudacnn train` with no recipe chosen (no --preset, --config, --model, --epochs or
--model-kwargs) on a machine without a GPU trains a narrower net for fewer epochs, so that the first run ends
in minutes instead of hours, and says so in one line."""

from __future__ import annotations

import dataclasses
import logging

from cudacnn.train.config import TrainConfig

log = logging.getLogger(__name__)
# About 50,000 training images (one epoch of CIFAR-10, 25 of the bundled sample): one to four minutes at the
# narrow SmallNet's 200-800 images/s on two cores with bf16 autocast.
IMAGE_BUDGET = 50_000
CPU_WIDTHS = [32, 64, 128]


def cpu_sized(config: TrainConfig, train_images: int) -> TrainConfig:
    """`config` cut to IMAGE_BUDGET training images (at least one epoch, at most its own count), SmallNet at
    half its width (about a quarter of the compute); the change is logged in one line."""
    epochs = max(1, min(config.epochs, round(IMAGE_BUDGET / max(1, train_images))))
    changes = {"epochs": epochs}
    what = f"{epochs} epochs" + (f" instead of {config.epochs}" if epochs != config.epochs else "")
    if config.model == "smallnet" and "widths" not in config.model_kwargs:
        changes["model_kwargs"] = {**config.model_kwargs, "widths": CPU_WIDTHS}
        what = f"smallnet at widths {'-'.join(map(str, CPU_WIDTHS))}, " + what
    sized = dataclasses.replace(config, **changes)
    log.info("no GPU: CPU-sized run of %s: %s (%s training images); pass --epochs or --preset for the full recipe",
             config.preset or config.model, what, f"{epochs * train_images:,}")
    return sized
