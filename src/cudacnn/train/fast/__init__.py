"""Record-speed CIFAR-10 training (airbench-style): `train_fast("fast94", dataset)`."""

from cudacnn.train.fast.recipe import PRESETS, FastConfig, FastResult, train_fast, warmup

__all__ = ["PRESETS", "FastConfig", "FastResult", "train_fast", "warmup"]
