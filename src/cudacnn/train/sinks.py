"""Metrics sinks besides metrics.jsonl (`--log tensorboard,csv`): RUN/metrics.csv and RUN/tensorboard/.
Both are fed the epoch records the trainer checkpoints, so a resumed run repeats or loses no epoch in them."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from cudacnn.atomic import write_text_atomic
from cudacnn.errors import ConfigError

TENSORBOARD_FIX = "pip install tensorboard (or pip install 'cudacnn[tensorboard]')"


def check_available(sinks: list[str]) -> None:
    """Refuse a sink whose package is missing before anything is trained or written."""
    if "tensorboard" in sinks:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"--log tensorboard needs the tensorboard package: {TENSORBOARD_FIX}") from exc


class MetricSinks:
    """`write(history)` after every epoch; `close()` at the end. `first_epoch` (1-based) is where this process
    starts: TensorBoard hides any events at or after it that an interrupted process had written."""

    def __init__(self, run_dir: Path, sinks: list[str], first_epoch: int = 1):
        check_available(sinks)
        self.run_dir, self.csv = Path(run_dir), "csv" in sinks
        self.tensorboard = None
        self.logged = first_epoch - 1
        if "tensorboard" in sinks:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=first_epoch)

    def write(self, history: list[dict]) -> None:
        if self.csv:
            write_text_atomic(self.run_dir / "metrics.csv", to_csv(history))
        if self.tensorboard:
            for record in history:
                if record["epoch"] <= self.logged:
                    continue
                for key, value in record.items():
                    if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                        self.tensorboard.add_scalar(tag(key), value, global_step=record["epoch"])
                self.logged = record["epoch"]
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()


def tag(key: str) -> str:
    """train_loss -> loss/train, val_acc -> acc/val: TensorBoard draws a split's curves side by side."""
    split, _, metric = key.partition("_")
    return f"{metric}/{split}" if split in ("train", "val") and metric else key


def to_csv(history: list[dict]) -> str:
    columns = list(dict.fromkeys(key for record in history for key in record))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()
