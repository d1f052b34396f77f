"""A seeded, stratified validation split taken from the training set, and the check that a run's recorded
test split is the one loaded now."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cudacnn.data.dataset import Split
from cudacnn.errors import DataError


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


def check_test_files(run_dir: Path, dataset, purpose: str = "evaluate on") -> None:
    """Refuse a test set that is not the one the run recorded in its data.json (a class-folder tree whose files
    changed since, or a run split by an earlier rule): the run's accuracy would be measured on other images, or
    a resume would train on images the run tested on."""
    path = run_dir / "data.json"
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read ({exc}); restore it, or delete it to go on without the check")
    if recorded.get("source") != dataset.source:
        return  # another source, named with --data on purpose
    before = (recorded.get("split") or {}).get("test_files")
    now = (dataset.info.get("split") or {}).get("test_files")
    if before is not None and now is not None and before != now:
        gone, new = len(set(before) - set(now)), len(set(now) - set(before))
        raise DataError(f"the test images of {dataset.source} ({len(now)}) differ from the {len(before)} in {path} "
                        f"({gone} missing, {new} new, or a different split rule); {purpose} the files the run "
                        "was tested on, or train a new run on the folder as it is now")
