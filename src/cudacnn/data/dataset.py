"""The in-memory form every data source ends in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Split:
    """uint8 images (N, S, S, 3) in HWC order (S = 32 unless --image-size says otherwise) and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[3] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = np.asarray(self.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "Split":
        return Split(self.images[indices], self.labels[indices])

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)


@dataclass
class Dataset:
    """Train and test splits of one source, with its class names (index = label)."""

    name: str
    classes: list[str]
    train: Split
    test: Split
    source: str = ""
    cache_path: Path | None = field(default=None, compare=False)
    info: dict = field(default_factory=dict)  # how the source was read, e.g. the train/test split it was given

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])


def channel_stats(images: np.ndarray, chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 HWC images, scaled to [0, 1], accumulated in float64."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].reshape(-1, 3).astype(np.float64) / 255.0
        total += block.sum(0)
        total_sq += (block * block).sum(0)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean, std
