"""`cudacnn train --preset fast94|fast96 --runs N`: seeded record-speed runs back to back, each saved as a
normal run folder (checkpoint, eval.json), and one table of statistics over the runs."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from cudacnn.atomic import write_text_atomic
from cudacnn.data import load_dataset
from cudacnn.train.checkpoint import save_checkpoint
from cudacnn.errors import ConfigError
from cudacnn.train.config import TrainConfig, claim_run_dir, resolve, run_name, save_config
from cudacnn.train.setup import pick_device
from cudacnn.train.sweep import summarize

log = logging.getLogger(__name__)


# what a record preset (fast94/fast96) takes from the user; its recipe (train/fast/recipe.py) sets everything else
RECORD_SETTINGS = ("preset", "data", "cache_dir", "device", "compile", "seed", "runs", "out", "name")


def check_record_config(config: TrainConfig) -> None:
    """Refuse any other setting that differs from the preset's, whether from a flag, a config file or a sweep
    job: the recipe would silently ignore it."""
    recipe = resolve(config.preset, None, {})
    ignored = sorted(f.name for f in dataclasses.fields(TrainConfig)
                     if f.name not in RECORD_SETTINGS and getattr(config, f.name) != getattr(recipe, f.name))
    if ignored:
        raise ConfigError(f"--preset {config.preset} sets its own recipe; drop "
                          f"{', '.join('--' + k.replace('_', '-') for k in ignored)} (try recipe changes with "
                          f"`python -m cudacnn.train.fast.bench --preset {config.preset} --set key=value`)")


def run_record(config: TrainConfig, quiet: bool = False) -> dict:
    from cudacnn.train.fast import train_fast, warmup

    check_record_config(config)  # before anything is written
    device = pick_device(config.device)
    dataset = load_dataset(config.data, cache_dir=config.cache_dir, quiet=quiet)
    root = claim_run_dir(Path(config.out) / run_name(config), resumable=False)  # seeded runs start over
    root.mkdir(parents=True, exist_ok=True)
    save_config(config, root / "config.yaml")
    warmup_start = time.time()
    if device.type == "cuda" and config.compile:  # compile once here, so each run's stamps cover the run alone
        warmup(config.preset, dataset, str(device))
    warmup_s = time.time() - warmup_start
    rows = []
    for index in range(config.runs):
        seed = config.seed + index
        started = time.time()  # wall-clock stamps: a sweep's run phase is measured across processes
        result = train_fast(config.preset, dataset, seed=seed, device=str(device), compile=config.compile,
                            log=(lambda *a: None) if quiet else print)
        row = {"run": index, "seed": seed, "test_acc": result.test_acc, "test_acc_plain": result.test_acc_plain,
               "train_time_s": result.train_time_s, "started": started}
        rows.append(row)
        run_dir = root / f"run{index}"
        save_checkpoint(run_dir / "checkpoints" / "last.pt", {
            "model_name": config.model, "model_kwargs": result.model.arch,
            "classes": dataset.classes,
            "mean": result.mean, "std": result.std, "model": result.model.state_dict(),
            "epoch": len(result.history) - 1, "config": {**config.to_dict(), **result.config, "seed": seed}})
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
