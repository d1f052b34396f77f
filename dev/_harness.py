"""What the dev/ benchmarks share: their --budget-s and --dry-run flags, and a start that picks the GPU, or
Triton's interpreter on the CPU for --dry-run (the code paths at toy sizes; the numbers mean nothing)."""

from __future__ import annotations

import os
import sys


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
