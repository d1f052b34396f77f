"""What the dev/ benchmarks share: their --budget-s and --dry-run flags, a start that picks the GPU, or
Triton's interpreter on the CPU for --dry-run (the code paths at toy sizes; the numbers mean nothing), and the
per-call timer, flags and version line of the host-overhead scripts."""

from __future__ import annotations

import os
import sys
import time


def add_run_flags(parser, budget_s: float) -> None:
    parser.add_argument("--budget-s", type=float, default=budget_s, help="start no new case after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU under Triton's interpreter")


def device_for(args, script: str) -> str | None:
    """"cuda", or "cpu" under the interpreter for --dry-run (set before Triton's first import); None, after an
    error line, without a GPU."""
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        print(f"error: {script} needs a CUDA GPU (or --dry-run for the code paths on the CPU)", file=sys.stderr)
        return None
    return "cuda"


def device_ms(fn, device: str) -> float:
    """ms of one fn() as device time (calls captured in a CUDA graph: bench.cnn_kernels.graph_time_fn), or one
    call's wall time off a GPU (--dry-run: the code paths only)."""
    from cudacnn.bench.cnn_kernels import graph_time_fn

    stats = graph_time_fn(fn, device)
    if stats is not None:
        return stats.median_ms
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def add_per_call_flags(parser, host_help: str = "calls a timed round (host)") -> None:
    """The host-overhead scripts' flags: --calls, --host-calls, --rounds, --json."""
    parser.add_argument("--calls", type=int, default=200, help="calls a timed round (launched)")
    parser.add_argument("--host-calls", type=int, default=100, help=host_help)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="also write the results here")


def gpu_about() -> dict:
    """The GPU and library versions, printed on one line; exits with an error line without a GPU."""
    import platform

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA GPU; run it on the GPU machine")
    import triton

    about = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                 cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), python=platform.python_version(),
                 cpu=platform.processor() or platform.machine())
    print(" ".join(f"{k} {v}" for k, v in about.items()), flush=True)
    return about


def per_call_us(fn, calls: int, rounds: int, sync: str = "none", warmup: int = 10) -> float:
    """Best over `rounds` of the time a call of fn, in us, after `warmup` calls; the GPU queue is drained before
    each round. sync: "none" (the calls are only issued: host time, where the GPU keeps up), "end" (the final
    synchronize is inside the timer: what a training step pays) or "each" (a synchronize after every call)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
            if sync == "each":
                torch.cuda.synchronize()
        if sync == "end":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return best
