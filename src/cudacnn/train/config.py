"""Training configuration: defaults <- preset <- --config file <- command-line flags.
The resolved config is saved with every run as config.yaml."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from cudacnn.atomic import write_text_atomic
from cudacnn.errors import ConfigError


LOG_SINKS = ("tensorboard", "csv")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def is_device_name(name: str) -> bool:
    return name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", name) is not None


def is_plain_name(name: str) -> bool:
    """A folder name that stays inside --out: no separators, not '.' or '..'."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


@dataclass
class TrainConfig:
    # what to train on
    model: str = "smallnet"
    model_kwargs: dict = field(default_factory=dict)
    pretrained: str | None = None        # torchvision-format ImageNet weights (resnet18)
    init_from: str | None = None         # a run folder or checkpoint whose weights start this run (no optimizer state)
    data: str | None = None              # source; default CUDACNN_DATA, else official CIFAR-10
    cache_dir: str | None = None
    image_size: int = 32                 # images are brought to image_size x image_size (shorter side + centre crop)
    val_fraction: float = 0.1            # stratified validation split from the training set (0 = none)
    # optimisation
    epochs: int = 30
    batch_size: int = 256
    optimizer: str = "sgd"               # sgd (Nesterov) | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"           # none | onecycle | cosine
    warmup_epochs: float = 0.0           # linear warm-up (cosine schedule)
    label_smoothing: float = 0.0
    grad_clip: float = 0.0               # max gradient norm (0 = off)
    ema_decay: float = 0.0               # EMA of weights evaluated and saved when > 0
    # augmentation (on the device)
    crop_pad: int = 0
    flip: str = "none"                   # none | random | alternate
    cutout: int = 0
    # speed
    amp: str = "bf16"                    # none | bf16 | fp16 (fp16 uses loss scaling)
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"        # with --compile: one of COMPILE_MODES (reduce-overhead: CUDA graphs)
    cuda_graphs: bool = False            # replay the step's forward, loss and backward from a CUDA graph
    tf32: bool = True
    kernels: str = "torch"               # torch | triton | cuda: which kernels run linear/activation/loss
    device: str = "auto"                 # auto | cuda | cpu
    # several GPUs (batch_size is the global batch whatever the world size)
    sync_bn: bool = False                # SyncBatchNorm across ranks
    max_per_gpu_batch: int = 0           # gradient accumulation keeps each forward at most this big (0 = off)
    # run control
    early_stopping: int = 0              # patience in epochs on validation accuracy (0 = off)
    seed: int = 0
    deterministic: bool = False
    tta: bool = False                    # test-time augmentation in the final evaluation
    keep_best: int = 0                   # also keep the N best checkpoints by validation (else train) accuracy
    log: str = ""                        # metrics sinks besides metrics.jsonl: comma-separated tensorboard, csv
    out: str = "runs"
    name: str | None = None
    runs: int = 1                        # seeded repeats
    preset: str | None = None
    recipe: dict = field(default_factory=dict)  # record presets: recipe settings (--set KEY=VALUE)

    def validate(self) -> "TrainConfig":
        from cudacnn.data.sources import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE  # here: the CLI starts without the data stack

        checks = [
            (self.optimizer in ("sgd", "adam", "adamw"), "optimizer must be sgd, adam or adamw"),
            (self.schedule in ("none", "onecycle", "cosine"), "schedule must be none, onecycle or cosine"),
            (self.amp in ("none", "bf16", "fp16"), "amp must be none, bf16 or fp16"),
            (self.flip in ("none", "random", "alternate"), "flip must be none, random or alternate"),
            (self.kernels in ("torch", "triton", "cuda"), "kernels must be torch, triton or cuda"),
            (self.compile_mode in COMPILE_MODES, f"compile-mode must be one of {', '.join(COMPILE_MODES)}"),
            (is_device_name(self.device), "device must be auto, cpu, cuda or cuda:N"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch-size must be at least 1"),
            (0 < self.lr < math.inf, "lr must be positive and finite"),
            (0.0 <= self.momentum < 1.0, "momentum must be in [0, 1)"),
            (0.0 <= self.weight_decay < math.inf, "weight-decay must be >= 0 and finite"),
            (0.0 <= self.grad_clip < math.inf, "grad-clip must be >= 0 (0 = off) and finite"),
            (0.0 <= self.warmup_epochs < math.inf, "warmup-epochs must be >= 0 and finite"),
            (0.0 <= self.val_fraction < 1.0, "val-fraction must be in [0, 1)"),
            (0.0 <= self.label_smoothing < 1.0, "label-smoothing must be in [0, 1)"),
            (0.0 <= self.ema_decay < 1.0, "ema-decay must be in [0, 1)"),
            (self.crop_pad >= 0 and self.cutout >= 0, "crop-pad and cutout must be >= 0"),
            (MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE,
             f"image-size must be from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels"),
            (self.crop_pad < self.image_size, f"crop-pad must be below {self.image_size}, the image size"),
            (0 <= self.seed < 2**32, "seed must be in [0, 2**32)"),
            (isinstance(self.model_kwargs, dict), "model-kwargs must be a JSON object, e.g. '{\"stem\": \"cifar\"}'"),
            (self.name is None or is_plain_name(self.name),
             "name must be a plain folder name (no '/', not '.' or '..'); --out says where runs go"),
            (self.early_stopping >= 0, "early-stopping patience must be >= 0"),
            (self.runs >= 1, "runs must be at least 1"),
            (self.max_per_gpu_batch >= 0, "max-per-gpu-batch must be >= 0"),
            (self.keep_best >= 0, "keep-best must be >= 0 (0 = off)"),
            (set(self.log_sinks) <= set(LOG_SINKS),
             f"log takes a comma-separated list of {', '.join(LOG_SINKS)} (metrics.jsonl is always written)"),
            (not (self.cuda_graphs and self.compile), "cuda-graphs replays the eager model's kernels and compile "
             "compiles them; drop one (--compile --compile-mode reduce-overhead also replays CUDA graphs)"),
            (not (self.init_from and self.pretrained), "init-from and pretrained both set the first weights; pick one"),
            (not (self.early_stopping and self.val_fraction == 0),
             "early stopping needs a validation split: set --val-fraction > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message} (see `cudacnn train --help`)")
        return self

    @property
    def log_sinks(self) -> list[str]:
        return [part.strip() for part in self.log.split(",") if part.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


DIST_TIMEOUT_S = 300.0  # under torchrun, a collective waiting longer than this ends the job


# the types a config file may give each field (YAML/JSON have no other numbers than int and float)
_ACCEPTED = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,),
             "str | None": (str, type(None))}
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def from_dict(values: dict[str, Any], base: TrainConfig | None = None, origin: str = "config") -> TrainConfig:
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ConfigError(f"{origin}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    for name, value in values.items():
        kind = _FIELD_TYPES[name]
        wrong_bool = isinstance(value, bool) and kind != "bool"  # True is an int to Python, not to a user
        if wrong_bool or not isinstance(value, _ACCEPTED[kind]):
            raise ConfigError(f"{origin}: {name} must be {kind.replace(' | None', ' or null')}, "
                              f"got {value!r} ({type(value).__name__})")
    return dataclasses.replace(base or TrainConfig(), **values)


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file; pass a YAML or JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"config file {path} is not readable text ({exc}); pass a YAML or JSON file") from exc
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}")
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting: value")
    return values


def run_name(config: TrainConfig) -> str:
    """The run (or sweep) folder's name: --name, else the preset or model and the start time."""
    return config.name or f"{config.preset or config.model}-{datetime.now():%Y%m%d-%H%M%S}"


def claim_run_dir(path: Path, resumable: bool = True) -> Path:
    """`path` for a new run; refused when it already holds something (a finished or resumable run), or when
    the folder it goes in (--out) is a file."""
    if path.parent.exists() and not path.parent.is_dir():
        raise ConfigError(f"--out {path.parent} is a file; name the folder that run folders go in")
    if path.exists() and any(path.iterdir()):
        fix = "pick another --name" + (" or continue it with --resume" if resumable else "")
        raise ConfigError(f"run folder {path} already exists; {fix}")
    return path


def save_config(config: TrainConfig, path: Path) -> None:
    # whole or absent: resume and sweeps read it back, and take its presence as a started run
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def resolve(preset: str | None, config_file: str | None, flags: dict[str, Any]) -> TrainConfig:
    from cudacnn.train.presets import PRESETS

    config = TrainConfig()
    from_file = load_config_file(config_file) if config_file else {}
    preset = preset or from_file.get("preset")  # a file's `preset: NAME` starts from that preset, as --preset does
    if preset:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        config = from_dict(PRESETS[preset]["config"], config, f"preset {preset}")
        config.preset = preset
    config = from_dict(from_file, config, str(config_file))
    config = from_dict({k: v for k, v in flags.items() if v is not None}, config, "flags")
    return config.validate()
