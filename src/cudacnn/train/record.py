"""`cudacnn train --preset fast94|fast96 [--runs N] [--set KEY=VALUE]`: seeded record-speed runs back to back,
each saved as a normal run folder (checkpoint, eval.json), and one table of statistics over the runs."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import yaml

from cudacnn.atomic import write_text_atomic
from cudacnn.data import load_dataset
from cudacnn.errors import ConfigError
from cudacnn.train.checkpoint import save_checkpoint
from cudacnn.train.config import TrainConfig, claim_run_dir, resolve, run_name
from cudacnn.train.fast.config import parse_settings
from cudacnn.train.presets import RECORD_PRESETS
from cudacnn.train.setup import device_name, pick_device
from cudacnn.train.sweep import summarize

log = logging.getLogger(__name__)

# what a record preset takes from the user besides its recipe (--set); the recipe file sets everything else
RECORD_SETTINGS = ("preset", "data", "cache_dir", "device", "compile", "seed", "runs", "out", "name", "recipe")


def is_record(config: TrainConfig) -> bool:
    return config.preset in RECORD_PRESETS


def check_record_config(config: TrainConfig) -> dict:
    """The run's recipe overrides (typed). Refuses any trainer setting that differs from the preset's, whether
    from a flag, a config file or a sweep job: the recipe would silently ignore it."""
    if not is_record(config):
        if config.recipe:
            raise ConfigError(f"recipe settings (--set, or a config file's recipe:) change the record presets "
                              f"({', '.join(RECORD_PRESETS)}) only; set a trainer preset's values with their own flags")
        return {}
    preset = resolve(config.preset, None, {})
    ignored = sorted(f.name for f in dataclasses.fields(TrainConfig)
                     if f.name not in RECORD_SETTINGS and getattr(config, f.name) != getattr(preset, f.name))
    if ignored:
        raise ConfigError(f"--preset {config.preset} sets its own recipe; drop "
                          f"{', '.join('--' + k.replace('_', '-') for k in ignored)} and change the recipe with "
                          f"--set KEY=VALUE (see train/fast/{config.preset}.py)")
    from cudacnn.train.fast.recipe import resolve_config

    overrides = parse_settings(config.recipe)
    resolve_config(config.preset, overrides)  # refuse bad values before anything is written
    return overrides


def record_settings(config: TrainConfig) -> dict:
    """What a record run is: its run settings and its whole resolved recipe (config.yaml, --print-config). The
    trainer settings the recipe ignores are left out; `cudacnn train --config` reads this back as it is."""
    from cudacnn.train.fast.recipe import resolve_config

    recipe = dataclasses.asdict(resolve_config(config.preset, parse_settings(config.recipe)))
    del recipe["model"]  # the preset's, not a setting
    return {**{k: getattr(config, k) for k in RECORD_SETTINGS if k != "recipe"}, "recipe": recipe}


def train_record_preset(config: TrainConfig, gpus: int, inside_launch: bool, quiet: bool = False) -> None:
    """The CLI's one path for record presets: one GPU per process; several GPUs take blocks of seeds."""
    check_record_config(config)  # before any run folder, sweep or launch
    if inside_launch:
        raise ConfigError(f"the {config.preset} preset trains on one GPU; run it without torchrun, or "
                          "spread seeded runs over GPUs with `cudacnn train --runs N --gpus K`")
    if gpus > 1:
        if config.runs == 1:
            raise ConfigError(f"the {config.preset} preset trains on one GPU; spread seeded runs over "
                              f"GPUs with --runs N --gpus {gpus}")
        from cudacnn.train.sweep import seeds_sweep

        seeds_sweep(config, gpus, quiet=quiet)
        return
    run_record(config, quiet=quiet)


def run_record(config: TrainConfig, quiet: bool = False) -> dict:
    from cudacnn.train.fast.recipe import train_fast, warmup

    overrides = check_record_config(config)  # before anything is written
    device = pick_device(config.device)
    dataset = load_dataset(config.data, cache_dir=config.cache_dir, quiet=quiet)
    root = claim_run_dir(Path(config.out) / run_name(config), resumable=False)  # seeded runs start over
    if not quiet:
        log.info("%s: %d run(s) on %s, seeds %d-%d, into %s", config.preset, config.runs, device_name(device),
                 config.seed, config.seed + config.runs - 1, root)
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / "config.yaml", yaml.safe_dump(record_settings(config), sort_keys=False))
    warmup_start = time.time()
    if device.type == "cuda" and config.compile:  # compile once here, so each run's stamps cover the run alone
        warmup(config.preset, dataset, str(device), **overrides)
    warmup_s = time.time() - warmup_start
    rows = []
    for index in range(config.runs):
        seed = config.seed + index
        started = time.time()  # wall-clock stamps: a sweep's run phase is measured across processes
        result = train_fast(config.preset, dataset, seed=seed, device=str(device), compile=config.compile,
                            log=(lambda *a: None) if quiet else print, **overrides)
        row = {"run": index, "seed": seed, "test_acc": result.test_acc, "test_acc_plain": result.test_acc_plain,
               "train_time_s": result.train_time_s, "started": started}
        rows.append(row)
        run_dir = root / f"run{index}"
        save_checkpoint(run_dir / "checkpoints" / "last.pt", {
            "model_name": result.config["model"], "model_kwargs": result.model.arch,
            "classes": dataset.classes,
            "mean": result.mean, "std": result.std, "model": result.model.state_dict(),
            "epoch": len(result.history) - 1, "config": {**config.to_dict(), "recipe": result.config, "seed": seed}})
        row["finished"] = time.time()
        write_text_atomic(run_dir / "eval.json", json.dumps({**row, "history": result.history}, indent=2))
        if not quiet:
            log.info("run %d (seed %d): test accuracy %.4f (TTA), %.4f plain, %.3f s", index, seed,
                     result.test_acc, result.test_acc_plain, result.train_time_s)
    stats = summarize([{**row, "setting": config.preset} for row in rows])[0]  # the sweep's statistics
    summary = {"preset": config.preset, "device": str(device), "data": dataset.source, **stats,
               "warmup_s": warmup_s, "rows": rows}
    write_text_atomic(root / "results.json", json.dumps(summary, indent=2))  # the sweep's completion marker
    log.info("%s over %d runs: accuracy mean %.4f (min %.4f, max %.4f), median time %.3f s; %s",
             config.preset, summary["runs"], summary["acc_mean"], summary["acc_min"], summary["acc_max"],
             summary["train_time_median_s"], root / "results.json")
    return summary
