"""The record recipes' one config type. Each preset's values live in its own file (fast94.py, fast96.py);
`cudacnn train --preset fast94 --set epochs=7` replaces single fields."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from cudacnn.errors import ConfigError
from cudacnn.evaluate.tta import TTA_LEVELS
from cudacnn.models.fast import ACTIVATIONS, HEAD_INITS
from cudacnn.train.config import COMPILE_MODES

POOL_KERNELS = ("torch", "triton")
MUON_STEPS = ("compiled", "graphed")


@dataclass(frozen=True)
class RecordConfig:
    model: str                # the net: a registered model (models/fast.py)
    epochs: float             # fractional epochs end mid-epoch
    batch_size: int
    muon_lr: float            # Muon on the conv filters
    muon_momentum: float
    ns_steps: int             # Newton-Schulz iterations of Muon's orthogonalization
    bias_lr: float            # SGD-Nesterov on BatchNorm and whitening biases (summed loss)
    head_lr: float            # ... and on the linear head
    sgd_momentum: float
    wd_per_example: float     # decoupled from the lr: each step decays by wd_per_example * examples in the step
    label_smoothing: float
    activation: str           # the conv groups' activation: gelu | silu
    head_init: str            # unit_std: the head's weights scaled to std 1 (the public records' Muon nets); torch: nn.Linear's
    whiten_bias_epochs: float  # the whitening bias learns only this long
    whiten_images: int        # training images whose 2x2 patches set the whitening filters
    crop_pad: int             # random crops from images padded by this much
    cutout: int               # side of the square cut out of each image (0 = off)
    brightness: float         # per-image brightness shift within +- this, in data-set stds (0 = off)
    contrast: float           # per-image contrast factor within 1 +- this (0 = off)
    tta_level: int            # test-time augmentation of the final evaluation (TTA_LEVELS)
    tta_fraction: float       # < 1: the TTA views only for this least confident fraction of test images
    lookahead_every: int      # 0 = off; else sync every k steps, decay 0.95^k * (step/total)^3
    keep_fraction: float      # < 1: train on the hardest part of each batch, ranked by last loss (filtering.py)
    compile_mode: str         # torch.compile mode; reduce-overhead captures CUDA graphs
    pool_kernel: str          # each group's first pool -> BN -> act: torch (as compiled) | triton (kernels/pool_bn_act.py)
    muon_step: str            # compiled: Muon's compiled update launched from Python | graphed: its whole step one CUDA graph
    max_steps: int | None = None  # cut training short (smoke tests, the compile warm-up)

    def validate(self) -> "RecordConfig":
        rates = (self.muon_lr, self.bias_lr, self.head_lr)
        checks = [
            (math.isfinite(self.epochs) and self.epochs > 0, "epochs must be positive"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (all(0 < r < math.inf for r in rates), "muon_lr, bias_lr and head_lr must be positive and finite"),
            (0 <= self.muon_momentum < 1 and 0 <= self.sgd_momentum < 1, "muon_momentum and sgd_momentum must be in [0, 1)"),
            (0 <= self.wd_per_example < math.inf, "wd_per_example must be >= 0 and finite"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (0 <= self.whiten_bias_epochs < math.inf, "whiten_bias_epochs must be >= 0 and finite"),
            (self.whiten_images >= 1, "whiten_images must be at least 1"),
            (self.crop_pad < 32, "crop_pad must be below 32, the image size"),
            (self.ns_steps >= 1, "ns_steps must be at least 1"),
            (self.activation in ACTIVATIONS, f"activation must be one of {', '.join(ACTIVATIONS)}"),
            (self.head_init in HEAD_INITS, f"head_init must be one of {', '.join(HEAD_INITS)}"),
            (0 <= self.brightness < math.inf and 0 <= self.contrast < 1, "brightness must be >= 0, contrast in [0, 1)"),
            (0.0 < self.tta_fraction <= 1.0, f"tta_fraction must be in (0, 1], got {self.tta_fraction}"),
            (0.0 < self.keep_fraction <= 1.0, f"keep_fraction must be in (0, 1], got {self.keep_fraction}"),
            (self.tta_level in TTA_LEVELS, f"tta_level must be one of {TTA_LEVELS}, got {self.tta_level}"),
            (self.compile_mode in COMPILE_MODES, f"compile_mode must be one of {', '.join(COMPILE_MODES)}"),
            (self.pool_kernel in POOL_KERNELS, f"pool_kernel must be one of {', '.join(POOL_KERNELS)}"),
            (self.muon_step in MUON_STEPS, f"muon_step must be one of {', '.join(MUON_STEPS)}"),
            (self.crop_pad >= 0 and self.cutout >= 0, "crop_pad and cutout must be >= 0"),
            (self.lookahead_every >= 0, "lookahead_every must be >= 0 (0 = off)"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def replace(self, overrides: dict) -> "RecordConfig":
        unknown = sorted(set(overrides) - set(FIELDS))
        if unknown:
            raise ConfigError(f"unknown recipe setting(s) {', '.join(unknown)} for --preset {self.model}; "
                              f"known: {', '.join(sorted(FIELDS))}")
        return dataclasses.replace(self, **overrides).validate()

    def total_steps(self, steps_per_epoch: int) -> int:
        """The run's optimizer steps: `epochs` of `steps_per_epoch` (a fraction ends mid-epoch), at most max_steps."""
        return min(math.ceil(self.epochs * steps_per_epoch), self.max_steps or math.inf)

    def whiten_bias_steps(self, steps_per_epoch: int) -> int:
        """The steps the whitening bias learns in (at least one); it is frozen, and detached, after them."""
        return max(1, math.ceil(self.whiten_bias_epochs * steps_per_epoch))

    @property
    def examples_per_step(self) -> int:
        """How many examples each optimizer step learns from: the batch, or its kept part when filtering."""
        return max(1, round(self.batch_size * self.keep_fraction))


FIELDS = {f.name: f.type for f in dataclasses.fields(RecordConfig) if f.name != "model"}


def parse_settings(items: list[str] | dict) -> dict:
    """`--set` values: ['epochs=7', 'cutout=0'] -> {'epochs': 7.0, 'cutout': 0}, typed as RecordConfig's
    fields. A mapping (a config file's `recipe:`) is checked and typed the same way."""
    pairs = items.items() if isinstance(items, dict) else [_split(item) for item in items]
    out = {}
    for key, value in pairs:
        if key not in FIELDS:
            raise ConfigError(f"--set {key}: unknown recipe setting; known: {', '.join(sorted(FIELDS))}")
        out[key] = _typed(key, FIELDS[key], value)
    return out


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set epochs=7")
    return key.strip(), value.strip()


def _typed(key: str, kind: str, value):
    if isinstance(value, str):
        if kind == "int | None" and value.lower() in ("none", "null"):
            return None
        try:
            return {"float": float, "int": int, "int | None": int}.get(kind, str)(value)
        except ValueError:
            raise ConfigError(f"--set {key}={value}: {key} must be {kind.replace(' | None', '')}") from None
    ok = {"float": (int, float), "int": (int,), "int | None": (int, type(None)), "str": (str,)}[kind]
    if isinstance(value, bool) or not isinstance(value, ok):
        raise ConfigError(f"set: {key} must be {kind.replace(' | None', ' or null')}, got {value!r}")
    return float(value) if kind == "float" else value
