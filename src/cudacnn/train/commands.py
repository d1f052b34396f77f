"""`cudacnn train`: flags mirror TrainConfig; --preset and --config set defaults, flags override them.
`--gpus N` trains data-parallel on N GPUs (N processes through torchrun's launcher), or with `--runs R`
spreads R seeded runs over N GPUs; `cudacnn sweep SWEEP.yaml` runs a grid of settings the same way."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from cudacnn.errors import ConfigError
from cudacnn.train.config import COMPILE_MODES, DIST_TIMEOUT_S, TrainConfig, resolve
from cudacnn.train.presets import DEFAULT_PRESET, PRESETS

log = logging.getLogger(__name__)
HELP = {
    "model": "model name (see `cudacnn models`)", "data": "archive or folder of images, official name (cifar10, "
    "cifar100, ...) or 'sample' (default: CUDACNN_DATA, else official CIFAR-10, downloaded once; offline, the "
    "bundled sample)", "image_size": "side in pixels every image is brought to: shorter side resized (bilinear), "
    "then the centre square cropped", "val_fraction": "validation share of "
    "the training set", "amp": "none | bf16 | fp16", "kernels": "torch | triton | cuda", "flip":
    "none | random | alternate", "schedule": "none | onecycle | cosine", "optimizer": "sgd | adam | adamw",
    "early_stopping": "patience in epochs (0 = off)", "ema_decay": "EMA of weights (0 = off)",
    "runs": "seeded repeats (seed, seed+1, ...)", "pretrained": "'imagenet' (torchvision's ResNet-18 weights, "
    "downloaded once and checked) or a torchvision-format weights file",
    "sync_bn": "data-parallel: SyncBatchNorm across GPUs", "max_per_gpu_batch": "data-parallel: at most this "
    "many samples per forward; larger per-GPU parts of the global batch use gradient accumulation (0 = off)",
    "compile_mode": f"with --compile: {' | '.join(COMPILE_MODES)} (reduce-overhead: CUDA graphs)",
    "cuda_graphs": "GPU, one process: replay the step's forward, loss and backward from a CUDA graph captured "
    "at the first step (the eager kernels, nothing compiled): fewer host launches a step",
    "cache_dir": "where decoded data caches live (default: CUDACNN_CACHE, else ~/.cache/cudacnn)",
    "epochs": "training epochs", "batch_size": "global batch size", "lr": "peak learning rate",
    "momentum": "SGD momentum", "weight_decay": "weight decay", "warmup_epochs": "linear warm-up (cosine schedule)",
    "label_smoothing": "label smoothing of the loss", "grad_clip": "max gradient norm (0 = off)",
    "crop_pad": "random-crop padding in pixels (0 = off)", "cutout": "cutout square size (0 = off)",
    "channels_last": "NHWC memory format on the GPU", "compile": "torch.compile the model", "tf32": "TF32 matmuls",
    "device": "auto | cuda | cuda:N | cpu", "seed": "random seed (printed at the start of a run)",
    "deterministic": "deterministic algorithms (slower)", "tta": "test-time augmentation in the final evaluation",
    "out": "folder that run folders go in", "name": "run folder name (default: PRESET or MODEL, then the date)",
    "init_from": "start from the weights of this run folder or checkpoint (same model and classes; the optimizer "
    "starts fresh): fine-tuning", "keep_best": "also keep the N best checkpoints by validation accuracy (else "
    "train accuracy) as checkpoints/best-eNNN.pt, NNN the epoch (0 = off)",
    "log": "metrics sinks besides metrics.jsonl, comma-separated: tensorboard (RUN/tensorboard/, needs `pip install "
    "tensorboard`), csv (RUN/metrics.csv)",
}
SKIP = {"model_kwargs", "preset", "recipe"}


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the defaults that are real; the TrainConfig flags default to None (so that presets and config files
    can fill them) and name their default in their help text instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def default_note(name: str) -> str:
    """' (default: X)' from TrainConfig, saying when presets set their own value."""
    value = getattr(TrainConfig(), name)
    shown = "none" if value in (None, "") else str(value)
    by_presets = any(name in preset["config"] for preset in PRESETS.values())
    return f" (default: {shown}{'; presets set their own' if by_presets else ''})"


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model; writes a run folder with checkpoints and a report",
                                   formatter_class=DefaultsHelp)
    parser.add_argument("--preset", choices=list(PRESETS),
                        help=f"a recipe (default {DEFAULT_PRESET} when neither --config nor --model is given; "
                        "--print-config shows what it sets): " +
                        "; ".join(f"{k}: {v['about']}" for k, v in PRESETS.items()))
    parser.add_argument("--config", help="YAML or JSON file of settings (overrides the preset)")
    parser.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run folder (a finished "
                        "one is left as it is: one line says so, exit 0)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings (preset, config "
                        "file and flags) as YAML and exit without training")
    parser.add_argument("--model-kwargs", type=json.loads, help='JSON, e.g. \'{"stem": "cifar"}\'')
    parser.add_argument("--set", action="append", dest="recipe", metavar="KEY=VALUE",
                        help="change one setting of a record preset's recipe (repeatable), e.g. --set epochs=7")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    add_parallel_flags(parser)
    for f in dataclasses.fields(TrainConfig):
        if f.name in SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        text = HELP.get(f.name, f.name.replace("_", " "))
        text += "" if "default:" in text else default_note(f.name)
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=None, help=text)
    parser.set_defaults(func=run_train)

    sweep = subparsers.add_parser("sweep", help="run a grid of settings and/or seeds over the GPUs; one results table",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sweep.add_argument("spec", type=Path, metavar="SWEEP.yaml",
                       help="preset/config/base settings, a grid of values, seeds or runs, gpus (see docs/multigpu.md)")
    sweep.add_argument("--gpus", type=int, help="worker processes, one per GPU (default: the file's gpus, else 1)")
    sweep.add_argument("--device", help="auto | cuda | cpu (cpu: CPU workers)")
    sweep.add_argument("--data", help="data source for every run (overrides the file)")
    sweep.add_argument("--out", help="parent folder of the sweep folder")
    sweep.add_argument("--name", help="sweep folder name (default: the file's name or stem)")
    sweep.add_argument("--quiet", action="store_true")
    sweep.set_defaults(func=run_sweep_command)


def add_parallel_flags(parser) -> None:
    group = parser.add_argument_group("several GPUs (see docs/multigpu.md)")
    group.add_argument("--gpus", type=int, default=1, help="processes on this host, one per GPU (CPU processes "
                       "with --device cpu): data-parallel training, or with --runs R, R runs spread over them")
    group.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_S, metavar="SECONDS",
                       help="a collective operation waiting longer than this ends the job (a dead or hung rank)")


def child_argv(args) -> list[str]:
    """This command line again, for the ranks the launcher starts (without --gpus)."""
    argv = ["train"]
    for name in ("preset", "config", "resume"):
        if getattr(args, name):
            argv += [f"--{name}", str(getattr(args, name))]
    if args.model_kwargs is not None:
        argv += ["--model-kwargs", json.dumps(args.model_kwargs)]
    for item in args.recipe or []:
        argv += ["--set", item]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if f.name in SKIP or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    if args.quiet:
        argv.append("--quiet")
    return argv + ["--dist-timeout", str(args.dist_timeout)]


def run_sweep_command(args) -> int:
    from cudacnn.train.sweep import sweep_from_file

    overrides = {k: v for k, v in (("device", args.device), ("data", args.data)) if v is not None}
    sweep_from_file(args.spec, gpus=args.gpus, overrides=overrides, out=args.out, name=args.name, quiet=args.quiet)
    return 0


def fit_runs(runs: list[dict], args) -> int:
    """Train each run (Trainer keyword arguments) in turn; under torchrun no rank leaves before the others."""
    from cudacnn.train import distributed
    from cudacnn.train.trainer import Trainer

    try:
        for run in runs:
            Trainer(**run, quiet=args.quiet, dist_timeout_s=args.dist_timeout).fit()
        distributed.wait_for_all()
    finally:
        distributed.shutdown()
    return 0


def print_config(config: TrainConfig) -> int:
    """The resolved settings, as the run's config.yaml will hold them (the model's own defaults are added when
    the model is built; a record preset's are its run settings and its whole recipe)."""
    import yaml

    from cudacnn.train.record import check_record_config, is_record, record_settings

    check_record_config(config)
    settings = record_settings(config) if is_record(config) else config.to_dict()
    print(yaml.safe_dump(settings, sort_keys=False), end="")
    return 0


def run_train(args) -> int:
    from cudacnn.train import distributed
    from cudacnn.train.trainer import finished_message, resume_config

    if args.gpus < 1:
        raise ConfigError("--gpus must be at least 1")
    inside_launch = distributed.from_env().enabled  # a rank started by torchrun / `--gpus`
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in SKIP}
    if args.model_kwargs is not None:
        flags["model_kwargs"] = args.model_kwargs
    if args.recipe:
        from cudacnn.train.fast.config import parse_settings

        flags["recipe"] = parse_settings(args.recipe)
    if args.resume:
        allowed = {"device", "compile", "compile_mode", "cuda_graphs", "data", "cache_dir", "epochs", "sync_bn",
                   "max_per_gpu_batch"}
        given = sorted(k for k, v in flags.items() if v is not None and k not in allowed)
        if given or args.preset or args.config:
            raise ConfigError(f"--resume continues a run with its saved config; drop {', '.join(given) or '--preset/--config'}")
        config = resume_config(args.resume, {k: v for k, v in flags.items() if v is not None})
        if args.print_config:
            return print_config(config)
        finished = finished_message(args.resume, config)
        if finished:  # not an error: resuming a finished run is a no-op
            print(finished)
            return 0
        if args.gpus > 1 and not inside_launch:
            distributed.launch(args.gpus, ["-m", "cudacnn", *child_argv(args)])
            return 0
        return fit_runs([dict(config=config, run_dir=args.resume, resume=True)], args)
    preset = args.preset or (None if args.config or args.model else DEFAULT_PRESET)
    config = resolve(preset, args.config, flags)
    if args.print_config:
        return print_config(config)
    from cudacnn.train.record import check_record_config, is_record, train_record_preset

    if is_record(config):
        train_record_preset(config, args.gpus, inside_launch, quiet=args.quiet)
        return 0
    check_record_config(config)  # a trainer preset takes no --set
    if args.gpus > 1 and not inside_launch:
        if config.runs > 1:  # independent runs, one per GPU
            from cudacnn.train.sweep import seeds_sweep

            seeds_sweep(config, args.gpus, quiet=args.quiet)
        else:
            distributed.launch(args.gpus, ["-m", "cudacnn", *child_argv(args)])
        return 0
    # no recipe chosen: on a CPU the trainer cuts the default one to a few minutes (see train/cpu_plan.py)
    fit_to_cpu = not (args.preset or args.config or args.model or args.epochs or args.model_kwargs is not None)
    return fit_runs([dict(config=dataclasses.replace(config, seed=config.seed + i), fit_to_cpu=fit_to_cpu)
                     for i in range(config.runs)], args)
