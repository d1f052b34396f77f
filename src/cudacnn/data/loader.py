"""The GPU-resident loader: a whole split lives on the device as uint8; each epoch is shuffled, augmented,
normalized and cast on the device in a handful of batched kernels, then served as NCHW channels_last
batches. The same code runs on the CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from cudacnn.data import augment
from cudacnn.data.dataset import Split

# Per-channel statistics of the decoded CIFAR-10 training images (data README); override per dataset.
CIFAR10_MEAN = (0.4913, 0.4821, 0.4465)
CIFAR10_STD = (0.2452, 0.2428, 0.2606)
FLIP_MODES = ("none", "random", "alternate")


@dataclass(frozen=True)
class Augment:
    crop_pad: int = 0          # random crop after padding by this many pixels (0 = off)
    pad_mode: str = "reflect"  # 'reflect' or 'constant'
    flip: str = "none"         # 'none', 'random' or 'alternate' (airbench's per-epoch alternation)
    cutout: int = 0            # side of the zeroed square (0 = off)
    brightness: float = 0.0    # per-image brightness shift, in data-set standard deviations (0 = off)
    contrast: float = 0.0      # per-image contrast factor within 1 +- this (0 = off)

    def __post_init__(self) -> None:
        if self.flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, got {self.flip!r}")
        if self.pad_mode not in ("reflect", "constant"):
            raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {self.pad_mode!r}")
        if self.crop_pad < 0 or self.cutout < 0 or self.brightness < 0 or not 0 <= self.contrast < 1:
            raise ValueError("crop_pad, cutout and brightness must be >= 0, contrast in [0, 1)")


class GpuLoader:
    """Iterate (images, labels) batches; one epoch per `iter()`. With `shuffle`, each epoch draws a fresh
    permutation from (seed, epoch); with `rank`/`world_size`, each rank takes a disjoint contiguous part of
    that permutation (all parts together cover the epoch exactly) and augments it with its own random stream."""

    def __init__(self, split: Split, batch_size: int, device: str | torch.device = "cpu", *,
                 augment: Augment = Augment(), shuffle: bool = False, drop_last: bool = False,
                 mean=CIFAR10_MEAN, std=CIFAR10_STD, dtype: torch.dtype = torch.float32,
                 channels_last: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        images = torch.from_numpy(np.ascontiguousarray(split.images)).to(self.device)
        self.images = images.permute(0, 3, 1, 2).contiguous()  # uint8 NCHW, resident for the whole run
        self.labels = torch.from_numpy(split.labels).to(self.device)
        self.batch_size, self.augment, self.shuffle, self.drop_last = batch_size, augment, shuffle, drop_last
        self.dtype, self.channels_last, self.seed = dtype, channels_last, seed
        self.rank, self.world_size = rank, world_size
        self.mean = torch.tensor(mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.epoch = 0
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.flip_base = (torch.rand(len(self.labels), generator=gen) < 0.5).to(self.device)

    # -- sizes
    def shard_size(self) -> int:
        n = len(self.labels)
        return (self.rank + 1) * n // self.world_size - self.rank * n // self.world_size

    def __len__(self) -> int:
        n = self.shard_size()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # -- one epoch
    def _generator(self, stream: int = 0) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.epoch + stream)

    def epoch_indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, device=self.device, generator=self._generator())
        else:
            order = torch.arange(n, device=self.device)
        return order[self.rank * n // self.world_size:(self.rank + 1) * n // self.world_size]

    def prepare_epoch(self, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole epoch's augmented, normalized images and labels, in epoch order (`idx`: the epoch's
        indices when the caller already drew them)."""
        # A stream distinct from the permutation's, and per rank (rank 0 keeps the single-process stream).
        gen = self._generator(stream=7919 + 104_729 * self.rank)
        idx = self.epoch_indices() if idx is None else idx
        images = self.images[idx]
        aug = self.augment
        if aug.flip == "random":
            images = augment.random_flip(images, gen)
        elif aug.flip == "alternate":
            images = augment.alternating_flip(images, self.flip_base[idx], self.epoch)
        images = augment.random_crop(images, aug.crop_pad, gen, aug.pad_mode)
        images = augment.cutout(images, aug.cutout, gen)
        jitter = augment.color_jitter_factors(len(images), aug.brightness, aug.contrast, gen, images.device)
        return self.normalize(images, jitter), self.labels[idx]

    def normalize(self, images: torch.Tensor, jitter: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> torch.Tensor:
        """uint8 -> normalized float in the loader's dtype and layout. One pass over the images, x * a + b with a
        and b per image and channel (float32 arithmetic), where normalizing, jittering, casting and changing the
        layout one after another took seven passes over an epoch-sized float32 tensor. `jitter`: per-image
        (shift, scale) from augment.color_jitter_factors, giving ((x - mean) / std + shift) * scale."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        a, b = 1 / self.std, -self.mean / self.std
        if jitter is not None:
            shift, scale = jitter
            a, b = a * scale, (b + shift) * scale
        out = torch.empty(images.shape, dtype=self.dtype, device=images.device, memory_format=memory_format)
        return torch.addcmul(b, images, a, out=out)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self.indexed_batches():
            yield images, labels

    def indexed_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One epoch as (images, labels, indices): each example's index into the split, on the device."""
        indices = self.epoch_indices()
        images, labels = self.prepare_epoch(indices)
        steps = len(self)
        self.epoch += 1
        for step in range(steps):
            sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
            yield images[sl], labels[sl], indices[sl]
