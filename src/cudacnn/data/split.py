"""A seeded, stratified validation split taken from the training set."""

from __future__ import annotations

import numpy as np

from cudacnn.data.dataset import Split


def stratified_split(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): every class gives round(fraction * its count) images to validation."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        take = int(round(fraction * len(members)))
        val_parts.append(rng.permutation(members)[:take])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    return train, val


def split_validation(train: Split, fraction: float, seed: int = 0) -> tuple[Split, Split]:
    train_idx, val_idx = stratified_split(train.labels, fraction, seed)
    return train.subset(train_idx), train.subset(val_idx)
