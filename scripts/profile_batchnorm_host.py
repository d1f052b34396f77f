"""Host time of one fused BatchNorm + activation call (cudacnn::batchnorm_act), up to its kernel launches.

The ops are host-bound at the zoo's shapes, so what Python does around each launch is the cost to cut. This
measures it on the CPU, without a GPU: the Triton launches are replaced by a recorder (Triton's own launch
cost, the binder and the driver call, is not in these numbers; with --cached, the cached launch path's keys
and lookup, kernels/_launch.py, are, up to the compiled kernel's launcher), the tensors are small CPU tensors
(their allocation is cheap), one thread. dev/launch_overhead.py measures both launch paths on a GPU. Prints microseconds per call and the kernels launched, for the module in
training (forward without grad, forward + backward) and in eval.

    PYTHONPATH=src python3 scripts/profile_batchnorm_host.py [--cached] [--profile]
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
from cudacnn.kernels import _launch
from cudacnn.kernels import batchnorm as B


class _Recorder:
    """Stands in for a Triton kernel: kernel[grid](*args) records the kernel's name. With --cached it passes
    for a JITFunction (the real kernel's parameters), so the cached launch path (_launch.py) runs up to the
    compiled launcher, which records the launch instead."""

    def __init__(self, name: str, launches: list[str], params):
        self.name, self.launches, self.params, self.pre_run_hooks = name, launches, params, []
        self.run, self.function, self.packed_metadata = self._record, "handle", ()

    def _record(self, *args, **kwargs):
        self.launches.append(self.name)
        return self

    def __getitem__(self, grid):
        return self._record


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
    parser.add_argument("--cached", action="store_true",
                        help="launch through the cached launch path (its key and lookup are then in the numbers)")
    args = parser.parse_args()
    launches: list[str] = []
    for name in [n for n in dir(B) if n.endswith("_kernel")]:
        setattr(B, name, _Recorder(name, launches, getattr(B, name).params))
    _launch.ENABLED = args.cached
    _launch._JITFunction = _Recorder
    _launch._device_and_stream = (lambda: 0, lambda device: 0)
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
