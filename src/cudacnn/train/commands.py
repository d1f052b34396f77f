"""`cudacnn train`: flags mirror TrainConfig; --preset and --config set defaults, flags override them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from cudacnn.errors import ConfigError
from cudacnn.train.config import TrainConfig, resolve
from cudacnn.train.presets import DEFAULT_PRESET, FAST_PRESETS, PRESETS

log = logging.getLogger(__name__)
HELP = {
    "model": "model name (see `cudacnn models`)", "data": "archive, folder or official name "
    "(default: CUDACNN_DATA, else official CIFAR-10, downloaded once)", "val_fraction": "validation share of "
    "the training set", "amp": "none | bf16 | fp16", "kernels": "torch | triton | cuda", "flip":
    "none | random | alternate", "schedule": "none | onecycle | cosine", "optimizer": "sgd | adam | adamw",
    "early_stopping": "patience in epochs (0 = off)", "ema_decay": "EMA of weights (0 = off)",
    "runs": "seeded repeats (seed, seed+1, ...)", "pretrained": "torchvision-format ImageNet weights file",
}
SKIP = {"model_kwargs", "preset"}


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model; writes a run folder with checkpoints and a report",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS),
                        help=f"a recipe (default {DEFAULT_PRESET}): " +
                        "; ".join(f"{k}: {v['about']}" for k, v in PRESETS.items()))
    parser.add_argument("--config", help="YAML or JSON file of settings (overrides the preset)")
    parser.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run folder")
    parser.add_argument("--model-kwargs", type=json.loads, help='JSON, e.g. \'{"stem": "cifar"}\'')
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    for f in dataclasses.fields(TrainConfig):
        if f.name in SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP.get(f.name))
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=None, help=HELP.get(f.name))
    parser.set_defaults(func=run_train)


def run_train(args) -> int:
    from cudacnn.train.trainer import Trainer, resume_config

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in SKIP}
    if args.model_kwargs is not None:
        flags["model_kwargs"] = args.model_kwargs
    if args.resume:
        allowed = {"device", "compile", "data", "cache_dir", "epochs"}
        given = sorted(k for k, v in flags.items() if v is not None and k not in allowed)
        if given or args.preset or args.config:
            raise ConfigError(f"--resume continues a run with its saved config; drop {', '.join(given) or '--preset/--config'}")
        config = resume_config(args.resume, {k: v for k, v in flags.items() if v is not None})
        Trainer(config, run_dir=args.resume, resume=True, quiet=args.quiet).fit()
        return 0
    preset = args.preset or (None if args.config or args.model else DEFAULT_PRESET)
    config = resolve(preset, args.config, flags)
    if config.preset in FAST_PRESETS:
        from cudacnn.train.record import run_record

        run_record(config, quiet=args.quiet)
        return 0
    for index in range(config.runs):
        Trainer(dataclasses.replace(config, seed=config.seed + index), quiet=args.quiet).fit()
    return 0
