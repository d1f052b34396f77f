"""Where a `cudacnn train` step's time goes, one rank's view: run one epoch to warm up (compilation, cuDNN
autotuning, CUDA-graph capture), time a second epoch plainly, then profile a third with torch.profiler.

    torchrun --standalone --nproc-per-node 4 scripts/profile_train_step.py --preset resnet18-cifar \
        --batch-size 1024 --compile --compile-mode reduce-overhead --out $OUT/prof-g4

Rank 0 writes OUT.json (step times, the share of the epoch spent in non-NCCL kernels, top kernels and CPU
ops) and OUT.trace.json.gz (a Chrome trace for chrome://tracing or Perfetto). `--no-optimize-ddp` turns off
dynamo's DDP graph splitting (one compiled backward, the gradient all-reduce after it) for comparison.
Flags left out keep the preset's values (`--no-compile` turns compilation off).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from cudacnn.train import distributed
from cudacnn.train.config import resolve
from cudacnn.train.trainer import Trainer, make_progress


def timed_epoch(trainer: Trainer, epoch: int) -> dict:
    torch.cuda.synchronize()
    start = time.perf_counter()
    record = trainer._train_epoch(epoch, make_progress(quiet=True))
    torch.cuda.synchronize()
    elapsed, steps = time.perf_counter() - start, len(trainer.train_loader)
    return {"epoch_s": elapsed, "steps": steps, "ms_per_step": 1e3 * elapsed / steps,
            "images_per_s": record["images_per_s"]}


def kernel_summary(prof, epoch_s: float, limit: int = 15) -> dict:
    """Device time of the profiled epoch's kernels: busy fractions (NCCL apart: its kernels run on their own
    stream and wait inside) and the kernels that took longest in all."""
    totals: dict[str, list] = {}
    for e in prof.events():
        # device-side mirrors of record_function ranges (DDP forward, optimizer step) are not kernels
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            entry = totals.setdefault(e.name[:90], [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.elapsed_us() / 1e3
    nccl_ms = sum(ms for name, (_, ms) in totals.items() if "nccl" in name.lower())
    compute_ms = sum(ms for _, ms in totals.values()) - nccl_ms
    rows = sorted(totals.items(), key=lambda kv: kv[1][1], reverse=True)[:limit]
    return {"compute_busy_fraction": compute_ms / (1e3 * epoch_s), "nccl_ms": nccl_ms,
            "kernel_launches": sum(n for n, _ in totals.values()),
            "top_kernels": [{"name": k, "calls": n, "ms": ms} for k, (n, ms) in rows]}


def top_cpu_ops(prof, limit: int = 15) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:limit]
    return [{"name": e.key[:90], "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="resnet18-cifar")
    # unset flags keep the preset's own values
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--no-optimize-ddp", action="store_true")
    parser.add_argument("--data", default=".data/cifar10-jpeg.tar.gz")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", required=True, help="path prefix of the rank-0 results")
    args = parser.parse_args()
    if args.no_optimize_ddp:
        torch._dynamo.config.optimize_ddp = False
    scratch = Path(tempfile.mkdtemp(prefix="cudacnn-profile-"))
    config = resolve(args.preset, None, dict(batch_size=args.batch_size, compile=args.compile,
                                            compile_mode=args.compile_mode, data=args.data,
                                            cache_dir=args.cache_dir, epochs=3, out=str(scratch)))
    trainer = Trainer(config, run_dir=scratch, quiet=True)
    try:
        warm = timed_epoch(trainer, 0)
        plain = timed_epoch(trainer, 1)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            profiled = timed_epoch(trainer, 2)
    finally:
        distributed.shutdown()
    if trainer.dist.is_main:
        result = {"args": vars(args), "world_size": trainer.dist.world_size, "warm_up_epoch": warm,
                  "plain_epoch": plain, "profiled_epoch": profiled,
                  **kernel_summary(prof, profiled["epoch_s"]), "top_cpu_ops": top_cpu_ops(prof)}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.json").write_text(json.dumps(result, indent=2))
        trace = scratch / "trace.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{out}.trace.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        print(json.dumps({k: result[k] for k in ("world_size", "plain_epoch", "compute_busy_fraction", "nccl_ms",
                                                 "kernel_launches")}))
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
