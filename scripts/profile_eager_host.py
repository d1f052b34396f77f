"""Host time of our eager ops' calls, up to their kernel launches: the fused BatchNorm + activation module
(cudacnn::batchnorm_act), then linear, activation and cross-entropy, each through the registered custom ops
and through the direct path that eager calls take (kernels/ops.py, _direct).

The ops are host-bound at the zoo's shapes, so what Python does around each launch is the cost to cut. This
measures it on the CPU, without a GPU: the Triton launches are replaced by a recorder, and linear's GEMM,
the activation and the loss kernels by functions that only allocate their outputs (Triton's own launch
cost, the binder and the driver call, is not in these numbers; with --cached, the cached launch path's keys
and lookup, kernels/_launch.py, are, up to the compiled kernel's launcher), the tensors are small CPU tensors
(their allocation is cheap), one thread. dev/launch_overhead.py measures both launch paths on a GPU. Prints
microseconds per call (best of 5 rounds), for the BatchNorm module in training (forward without grad, forward
+ backward, with the kernels launched) and in eval, and for the other ops forward + backward.

    PYTHONPATH=src python3 scripts/profile_eager_host.py [--cached] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

os.environ["TRITON_INTERPRET"] = "0"  # launches are recorded, not run: no interpreter

import torch

from cudacnn.kernels import BatchNormAct, _launch, ops
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


def _other_ops() -> dict:
    """linear, activation and cross-entropy forward + backward closures, their kernels stubbed (outputs
    allocated, nothing computed)."""
    ops._gemm_fn = lambda a, b, bias, act, allow_tf32=False, pre_activation_out=None: a.new_empty(
        (a.shape[0], b.shape[1]))
    ops._gemm_backward_fn = lambda gy, a, b, saved, act, has_bias, tf32, needs_a=True, needs_b=True: (
        torch.empty_like(a), torch.empty_like(b), b.new_empty((b.shape[1],)))
    ops._act.activation_forward = lambda x, kind, out: out
    ops._act.activation_backward = lambda dy, x, kind, out: out
    ops._ce.softmax_cross_entropy = lambda logits, t, smoothing, reduction, return_grad=False: (
        (logits.new_zeros(()), torch.empty_like(logits)) if return_grad else logits.new_zeros(()))
    x, w, b = torch.randn(4, 64, requires_grad=True), torch.randn(16, 64, requires_grad=True), torch.randn(16)
    targets = torch.zeros(4, dtype=torch.long)

    def backward(y, inputs):
        torch.autograd.grad(y, inputs, torch.ones_like(y))

    return {"linear (x @ w^T + b)": lambda: backward(ops.linear(x, w, b), [x, w]),
            "activation (ReLU)": lambda: backward(ops.activation(x, "relu"), [x]),
            "cross-entropy (smoothing 0.1)": lambda: backward(ops.cross_entropy(x, targets, 0.1), [x])}


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
    print(f"\n{'op forward+backward (4x64)':34s} {'ops us':>8s} {'direct us':>10s}")
    for label, fn in _other_ops().items():
        times = []
        for direct in (False, True):
            ops.DIRECT_EAGER = direct
            times.append(per_call_us(fn))
        print(f"{label:34s} {times[0]:8.1f} {times[1]:10.1f}  ({times[1] / times[0]:.2f}x)")
    ops.DIRECT_EAGER = True
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(2000):
            forward_backward()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
