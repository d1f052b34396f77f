"""`cudacnn bench loader`: how long GpuLoader takes to prepare and batch one augmented epoch (shuffle, flip,
reflect-padded crop, optional cutout, normalize, cast, channels_last), timed by device events."""

from __future__ import annotations

import logging

import numpy as np
import torch

from cudacnn.bench.harness import time_fn
from cudacnn.bench.report import measurement, result_row
from cudacnn.data import Augment, GpuLoader
from cudacnn.data.dataset import Split

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synthetic_split(n: int, seed: int = 0) -> Split:
    """Random (never all-zero) uint8 images for runs without a data set; timings match real images'."""
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64))


def epoch_fn(loader: GpuLoader):
    """One full pass: prepare_epoch's device work plus handing out every batch."""
    def run():
        for images, labels in loader:
            pass
        return images
    return run


def run(split: Split, devices: list[str], batch_size: int = 512, dtypes=("fp32", "bf16"), cutouts=(0, 8),
        crop_pad: int = 4, warmup: int = 3, repeats: int = 20, budget_s: float = 5.0) -> list[dict]:
    rows = []
    n = len(split.labels)
    for dtype in dtypes:
        for cut in cutouts:
            augment = Augment(crop_pad=crop_pad, pad_mode="reflect", flip="random", cutout=cut)
            name = f"crop {crop_pad} reflect + flip" + (f" + cutout {cut}" if cut else "") + f", {dtype}"
            log.info("  %s", name)
            measurements = {}
            for device in devices:
                loader = GpuLoader(split, batch_size, device, augment=augment, shuffle=True,
                                   dtype=DTYPES[dtype], channels_last=True)
                stats = time_fn(epoch_fn(loader), device, warmup=warmup, repeats=repeats, budget_s=budget_s)
                measurements[device] = measurement(stats, images_per_s=round(n / (stats.median_ms / 1e3)))
                del loader
            rows.append(result_row(name, f"one epoch of {n} images, batch {batch_size}", measurements,
                                   images=n, dtype=dtype, cutout=cut))
    return rows
