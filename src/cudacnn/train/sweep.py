"""Sweeps: independent runs (seeds, or a grid of hyperparameters) spread over the GPUs, one process per GPU
(CUDA_VISIBLE_DEVICES), the rest queued; one table of results (mean, std, min, max per setting).

`cudacnn sweep SWEEP.yaml`:

    preset: resnet18-cifar        # optional base recipe
    config: base.yaml             # optional config file on top (relative to this file)
    base: {epochs: 10}            # optional settings on top
    grid: {lr: [0.1, 0.2], label_smoothing: [0.0, 0.1]}   # every combination is one setting
    seeds: [0, 1, 2]              # or `runs: 3` (seeds seed, seed+1, ...)
    gpus: 4                       # worker processes (on the CPU: CPU workers)

`cudacnn train --runs N --gpus K ...` is the same with no grid. Sweep folder: SWEEP/<run>/ (each run's
own folder), SWEEP/logs/<run>.log, SWEEP/configs/<run>.yaml, SWEEP/results.{md,json}. Running the same
sweep again skips finished runs and resumes interrupted ones.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from cudacnn.atomic import write_text_atomic
from cudacnn.errors import ConfigError, CudacnnError
from cudacnn.tables import md_table
from cudacnn.train.config import (TrainConfig, from_dict, is_plain_name, load_config_file, resolve, run_name,
                                   save_config)
from cudacnn.train.distributed import disable_multicast, put_package_on_pythonpath

log = logging.getLogger(__name__)
SPEC_KEYS = {"preset", "config", "base", "grid", "seeds", "runs", "gpus", "name", "out"}


@dataclass
class Job:
    name: str                 # the run's folder name inside the sweep folder
    setting: str              # the grid point, e.g. "lr=0.1 label_smoothing=0.1" ("base" without a grid)
    seed: int
    config: TrainConfig


# ---------------------------------------------------------------------- planning
def load_spec(path: str | Path) -> dict:
    spec = load_config_file(path)
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(SPEC_KEYS))}")
    if spec.get("config"):  # relative to the sweep file, like an include
        spec["config"] = str((Path(path).parent / spec["config"]).resolve())
    return spec


def grid_points(grid: dict | None) -> list[dict]:
    """Every combination of the grid's values, in order (one empty point without a grid)."""
    grid = grid or {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep grid: {key} must be a non-empty list of values, got {values!r}")
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def setting_label(point: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items()) or "base"


def folder_label(point: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in point.items()).replace("/", "_").replace(" ", "")


def plan_jobs(base: TrainConfig, grid: dict | None, seeds: list[int], sweep_dir: Path) -> list[Job]:
    """One job per (grid point, seed); every config is validated before anything starts."""
    jobs = []
    for point in grid_points(grid):
        setting = from_dict(point, base, f"sweep grid point {setting_label(point)}")
        for seed in seeds:
            name = "-".join(filter(None, [folder_label(point), f"seed{seed}"]))
            config = dataclasses.replace(setting, seed=seed, runs=1, name=name, out=str(sweep_dir)).validate()
            jobs.append(Job(name, setting_label(point), seed, config))
    return jobs


def spec_seeds(spec: dict, base: TrainConfig) -> list[int]:
    if "seeds" in spec:
        seeds = spec["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ConfigError(f"sweep seeds must be a non-empty list of integers, got {seeds!r}")
        return seeds
    return [base.seed + i for i in range(int(spec.get("runs", 1)))]


# ---------------------------------------------------------------------- workers
def worker_envs(workers: int, device: str) -> list[dict]:
    """One environment per worker process: its GPU on a GPU machine, and always a share of the cores (for
    its CPU threads and torch.compile's compile workers, which would otherwise each take every core)."""
    import torch

    if workers < 1:
        raise ConfigError("--gpus must be at least 1")
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    cores = {"OMP_NUM_THREADS": threads, "TORCHINDUCTOR_COMPILE_THREADS": threads}
    if device != "cpu" and torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        if workers > len(ids):
            raise ConfigError(f"--gpus {workers} but this machine has {len(ids)} GPU(s) visible")
        return [{"CUDA_VISIBLE_DEVICES": ids[i], **cores} for i in range(workers)]
    return [{"CUDA_VISIBLE_DEVICES": "", **cores} for _ in range(workers)]


def run_queue(commands: list[list[str]], envs: list[dict], logs: list[Path],
              on_done=None, poll_s: float = 0.2) -> list[dict]:
    """Run `commands`, at most len(envs) at once, each in a free worker's environment; the rest wait.
    Returns {returncode, wall_s, worker} per command, in order."""
    pending = list(range(len(commands)))
    free = list(range(len(envs)))
    running: dict[int, tuple[subprocess.Popen, int, float, object]] = {}
    results: list[dict | None] = [None] * len(commands)
    try:
        while pending or running:
            while pending and free:
                index, worker = pending.pop(0), free.pop(0)
                logs[index].parent.mkdir(parents=True, exist_ok=True)
                handle = open(logs[index], "w")
                proc = subprocess.Popen(commands[index], env={**os.environ, **envs[worker]},
                                        stdout=handle, stderr=subprocess.STDOUT)
                running[index] = (proc, worker, time.perf_counter(), handle)
            time.sleep(poll_s)
            for index, (proc, worker, start, handle) in list(running.items()):
                if proc.poll() is None:
                    continue
                handle.close()
                results[index] = {"returncode": proc.returncode, "wall_s": time.perf_counter() - start,
                                  "worker": worker}
                del running[index]
                free.append(worker)
                if on_done:
                    on_done(index, results[index])
    finally:  # Ctrl-C or an error here: stop the workers we started, each by its own process
        for proc, _, _, handle in running.values():
            proc.terminate()
            proc.wait()
            handle.close()
    return results


# ---------------------------------------------------------------------- results
def read_results(run_dir: Path, seed: int) -> list[dict]:
    """[{seed, test_acc, train_time_s}] of a finished run folder (several for a fast preset's --runs);
    [] if it did not finish."""
    record = run_dir / "results.json"  # fast presets (cudacnn.train.record)
    if record.exists():
        return [{"seed": row["seed"], "test_acc": row["test_acc"], "train_time_s": row["train_time_s"]}
                for row in json.loads(record.read_text())["rows"]]
    evaluation = run_dir / "eval.json"
    if evaluation.exists():
        info = json.loads(evaluation.read_text())  # the trainer's: it always records train_time_s
        return [{"seed": seed, "test_acc": info["accuracy"], "train_time_s": info["train_time_s"]}]
    return []


def summarize(rows: list[dict]) -> list[dict]:
    """Per setting, over its finished runs: runs, failed, accuracy mean/std/min/max, median train time."""
    table = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        accs = [r["test_acc"] for r in mine if r.get("test_acc") is not None]
        times = [r["train_time_s"] for r in mine if r.get("train_time_s") is not None]
        entry = {"setting": setting, "runs": len(accs), "failed": len(mine) - len(accs)}
        if accs:
            entry.update(acc_mean=statistics.fmean(accs), acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         acc_min=min(accs), acc_max=max(accs))
        if times:
            entry["train_time_median_s"] = statistics.median(times)
        table.append(entry)
    return table


def markdown_table(table: list[dict]) -> str:
    def cell(entry, key, spec=".4f"):
        return format(entry[key], spec) if key in entry else "-"

    header = ["setting", "runs", "failed", "accuracy mean", "std", "min", "max", "median train time (s)"]
    accuracy = ("acc_mean", "acc_std", "acc_min", "acc_max")
    return md_table(header, [[e["setting"], e["runs"], e["failed"], *(cell(e, k) for k in accuracy),
                              cell(e, "train_time_median_s", ".1f")] for e in table]) + "\n"


# ---------------------------------------------------------------------- the sweep
def run_sweep(jobs: list[Job], sweep_dir: Path, workers: int, quiet: bool = False) -> dict:
    """Run every job (skipping finished ones), then write results.md and results.json."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    device = jobs[0].config.device if jobs else "auto"
    envs = worker_envs(workers, device)
    todo, commands, logs = [], [], []
    for job in jobs:
        run_dir = sweep_dir / job.name
        if read_results(run_dir, job.seed):
            continue
        config_file = sweep_dir / "configs" / f"{job.name}.yaml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        save_config(job.config, config_file)
        # An interrupted run continues from its checkpoint; a new one starts from its config, and so does one
        # that left nothing to continue from (stopped in its first epoch, or a fast-preset block of seeds).
        resume = (run_dir / "checkpoints" / "last.pt").exists() and (run_dir / "config.yaml").exists()
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        args = ["--resume", str(run_dir)] if resume else ["--config", str(config_file)]
        todo.append(job)
        commands.append([sys.executable, "-m", "cudacnn", "train", *args, "--quiet"])
        logs.append(sweep_dir / "logs" / f"{job.name}.log")
    if not quiet:
        log.info("sweep %s: %d runs (%d to do) on %d %s worker(s)", sweep_dir, len(jobs), len(todo), len(envs),
                 "GPU" if envs and envs[0]["CUDA_VISIBLE_DEVICES"] else "CPU")

    def done(index, outcome):
        if not quiet:
            state = "done" if outcome["returncode"] == 0 else f"FAILED (exit {outcome['returncode']}, see {logs[index]})"
            log.info("  %s: %s in %.1f s", todo[index].name, state, outcome["wall_s"])

    start = time.perf_counter()
    put_package_on_pythonpath()
    disable_multicast()  # every worker inherits NVLink multicast switched off
    outcomes = dict(zip((j.name for j in todo), run_queue(commands, envs, logs, on_done=done)))
    wall = time.perf_counter() - start
    rows = []
    for job in jobs:
        outcome = outcomes.get(job.name, {})
        common = {"run": job.name, "setting": job.setting, "wall_s": outcome.get("wall_s"),
                  "returncode": outcome.get("returncode", 0)}
        results = read_results(sweep_dir / job.name, job.seed)
        rows += [{**common, **r, "status": "done"} for r in results] or [
            {**common, "seed": job.seed, "status": "failed"}]
    table = summarize(rows)
    summary = {"sweep": str(sweep_dir), "workers": len(envs), "wall_time_s": wall, "settings": table,
               "runs": rows, "date": datetime.now().isoformat(timespec="seconds")}
    write_text_atomic(sweep_dir / "results.json", json.dumps(summary, indent=2))
    write_text_atomic(sweep_dir / "results.md", f"# Sweep {sweep_dir.name}\n\n{len(jobs)} runs on {len(envs)} "
                                                f"worker(s), {wall:.1f} s wall time.\n\n" + markdown_table(table))
    if not quiet:
        print(markdown_table(table))
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise CudacnnError(f"{len(failed)} of {len(rows)} runs failed (e.g. {failed[0]['run']}: see "
                           f"{sweep_dir / 'logs' / (failed[0]['run'] + '.log')}); the table in "
                           f"{sweep_dir / 'results.md'} covers the finished ones; run the sweep again to retry")
    return summary


def sweep_from_file(path: str | Path, gpus: int | None = None, overrides: dict | None = None,
                    out: str | None = None, name: str | None = None, quiet: bool = False) -> dict:
    spec = load_spec(path)
    base_values = {**(spec.get("base") or {}), **(overrides or {})}
    base = resolve(spec.get("preset"), spec.get("config"), base_values)
    name = str(name or spec.get("name") or Path(path).stem)
    if not is_plain_name(name):
        raise ConfigError(f"sweep name {name!r} must be a plain folder name (no '/', not '.' or '..'); "
                          "--out says where sweeps go")
    sweep_dir = Path(out or spec.get("out") or base.out) / name
    jobs = plan_jobs(base, spec.get("grid"), spec_seeds(spec, base), sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep_dir / "sweep.yaml", yaml.safe_dump(spec, sort_keys=False))
    return run_sweep(jobs, sweep_dir, gpus or int(spec.get("gpus", 1)), quiet=quiet)


def seeds_sweep(config: TrainConfig, gpus: int, quiet: bool = False) -> dict:
    """`train --runs N --gpus K`: seeds seed..seed+N-1 of one config. A fast preset's runs last seconds,
    so there each worker takes one block of consecutive seeds in one process (start-up paid once per GPU)."""
    from cudacnn.train.presets import RECORD_PRESETS

    sweep_dir = Path(config.out) / run_name(config)
    seeds = [config.seed + i for i in range(config.runs)]
    if config.preset not in RECORD_PRESETS:
        return run_sweep(plan_jobs(config, None, seeds, sweep_dir), sweep_dir, gpus, quiet=quiet)
    blocks = [seeds[i * len(seeds) // gpus:(i + 1) * len(seeds) // gpus] for i in range(gpus)]
    jobs = [Job(f"seeds{b[0]}-{b[-1]}", "base", b[0], dataclasses.replace(
        config, seed=b[0], runs=len(b), name=f"seeds{b[0]}-{b[-1]}", out=str(sweep_dir))) for b in blocks if b]
    return run_sweep(jobs, sweep_dir, gpus, quiet=quiet)
