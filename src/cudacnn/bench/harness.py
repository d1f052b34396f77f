"""The measuring half of `cudacnn bench`: timers, statistics and the environment every result carries.

A timing is always: warm-up calls first (compilation, cuDNN autotuning and allocator growth stay out),
then several repeats, each timed by CUDA events on a GPU or by a host clock after a synchronize, and
summarized as median and spread (quartiles, min, max). Rendering lives in report.py."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings, in milliseconds."""
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @classmethod
    def of(cls, samples_ms) -> "Stats":
        samples = np.asarray(list(samples_ms), dtype=np.float64)
        if samples.size == 0:
            raise ValueError("no samples to summarize")
        q1, median, q3 = np.percentile(samples, [25, 50, 75])
        return cls(float(median), float(q1), float(q3), float(samples.min()), float(samples.max()), int(samples.size))

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def to_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device | str = "cpu", *, warmup: int = 1,
            repeats: int = 5, budget_s: float | None = None) -> Stats:
    """Time `fn()`: `warmup` untimed calls, then up to `repeats` timed ones. On a GPU the repeats are
    queued back to back between CUDA events and read after one synchronize, so each sample is device time,
    not launch latency. On the CPU, with `budget_s`, repeating stops once that much time went by (at least
    3 repeats, or all if fewer were asked): slow cases get fewer repeats instead of minutes of waiting."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    for _ in range(warmup):
        fn()
    synchronize(device)
    if on_gpu:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return Stats.of(start.elapsed_time(end) for start, end in events)
    samples = []
    started = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if budget_s is not None and i + 1 >= min(3, repeats) and time.perf_counter() - started > budget_s:
            break
    return Stats.of(samples)


def set_threads(threads: int | None) -> int:
    """Set the CPU thread count PyTorch uses (None keeps the default) and return the one in effect."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (no py-cpuinfo needed), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # absent or broken: record that instead of failing the benchmark
        return None


def environment() -> dict:
    """Everything needed to read a number later: machine, versions, thread count, date."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": np.__version__,
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,  # busy machine?
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": None,
        "gpu_count": 0,
        "driver": None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(), driver=_gpu_driver())
    return env
