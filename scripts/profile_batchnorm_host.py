"""Host time of one fused BatchNorm + activation call (cudacnn::batchnorm_act), up to its kernel launches.

The ops are host-bound at the zoo's shapes, so what Python does around each launch is the cost to cut. This
measures it on the CPU, without a GPU: the Triton launches are replaced by a recorder (Triton's own launch
cost, the binder and the driver call, is not in these numbers), the tensors are small CPU tensors (their
allocation is cheap), one thread. Prints microseconds per call and the kernels launched, for the module in
training (forward without grad, forward + backward) and in eval.

    PYTHONPATH=src python3 scripts/profile_batchnorm_host.py [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

os.environ["TRITON_INTERPRET"] = "0"  # launches are recorded, not run: no interpreter

import torch

from cudacnn.kernels import BatchNormAct
from cudacnn.kernels import batchnorm as B


class _Recorder:
    """Stands in for a Triton kernel: kernel[grid](*args) records the kernel's name."""

    def __init__(self, name: str, launches: list[str]):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self.name)


def per_call_us(fn, calls: int = 2000, rounds: int = 5) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top functions (fwd+bwd)")
    args = parser.parse_args()
    launches: list[str] = []
    for name in [n for n in dir(B) if n.endswith("_kernel")]:
        setattr(B, name, _Recorder(name, launches))
    B._triton_ok = lambda x: x.dtype in (torch.float32, torch.float16, torch.bfloat16)  # "a GPU is here"
    torch.set_num_threads(1)
    x = torch.randn(4, 64, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    module = BatchNormAct(64, activation="relu", pool=True)
    frozen = BatchNormAct(64, activation="relu", pool=True).eval()
    dy = torch.randn(4, 64, 4, 4).contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        torch.autograd.grad(module(x), [x, module.weight, module.bias], dy)

    def eval_forward():
        with torch.no_grad():
            frozen(x)

    print(f"{'call (BN+ReLU+pool, 4x64x8x8)':34s} {'host us':>8s}  launches")
    for label, fn in (("train forward (no grad)", forward), ("train forward+backward", forward_backward),
                      ("eval forward (no grad)", eval_forward)):
        launches.clear()
        fn()
        names = f"{len(launches)}: {', '.join(launches)}"
        print(f"{label:34s} {per_call_us(fn):8.1f}  {names}")
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(2000):
            forward_backward()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
