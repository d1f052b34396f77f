"""Launch overhead of the fused BatchNorm + activation op (cudacnn::batchnorm_act) in eager training: Triton's
plain `kernel[grid](...)` path against the cached launcher (src/cudacnn/kernels/_launch.py), both from Python,
against the C++ path (src/cudacnn/kernels/planned.py) against eager PyTorch (F.batch_norm + the activation),
bf16 channels_last, training mode.

Per case and path, two numbers a call:
  - launched: wall time of N calls between two torch.cuda.synchronize(), / N (what a training step pays);
  - host: time to issue N calls without synchronizing (the queue drained before and after, outside the
    timer), / N; only meaningful where the GPU is not the bottleneck, i.e. the small case.
each for the forward (with autograd recording, output dropped: two launches of ours) and forward + backward
(autograd.grad: four launches); the forward + backward's host time also with the backward on the calling
thread (torch.autograd.set_multithreading_enabled(False)), as the Trainer runs it on one GPU.
Best of --rounds rounds of --calls calls after a warm-up (which also fills the launch cache).

    PYTHONPATH=src python3 dev/launch_overhead.py [--calls 200] [--rounds 7] [--json $OUT/launch.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from _harness import add_per_call_flags, gpu_about, per_call_us

from cudacnn.atomic import write_text_atomic
from cudacnn.kernels import _launch, ops, planned
from cudacnn.tables import md_table

# (name, shape, activation): the zoo shapes named in benchmarks/kernels.md's BatchNorm section, and a small one
CASES = [
    ("smallnet stage 1, BN+ReLU", (256, 64, 32, 32), "relu"),
    ("fast96 group 1, BN+GELU", (1500, 128, 32, 32), "gelu"),
    ("small, BN+ReLU", (256, 256, 4, 4), "relu"),
]
PATHS = ("triton plain", "triton cached", "C++ planned", "eager PyTorch")


def make_calls(shape, activation: str, path: str):
    """(forward, forward+backward) closures of one path on fixed inputs."""
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    c = shape[1]
    w = torch.ones(c, device="cuda", requires_grad=True)
    b = torch.zeros(c, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    backend = "torch" if path == "eager PyTorch" else "triton"
    dy = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)

    def forward():
        return ops.batchnorm_act(x, w, b, None, rm, rv, training=True, activation=activation, backend=backend)

    def forward_backward():
        y = ops.batchnorm_act(x, w, b, None, rm, rv, training=True, activation=activation, backend=backend)
        return torch.autograd.grad(y, (x, w, b), dy)

    def forward_backward_here():  # the backward on this thread, as the Trainer runs it on one GPU
        with torch.autograd.set_multithreading_enabled(False):
            return forward_backward()

    return forward, forward_backward, forward_backward_here


def measure(calls: int, rounds: int, host_calls: int) -> list[dict]:
    rows = []
    for name, shape, activation in CASES:
        for path in PATHS:
            _launch.ENABLED = path != "triton plain"
            planned.ENABLED = path == "C++ planned"
            forward, forward_backward, forward_backward_here = make_calls(shape, activation, path)
            row = dict(case=name, shape=list(shape), activation=activation, path=path)
            for label, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
                row[f"{label} launched us"] = per_call_us(fn, calls, rounds, sync="end")
                row[f"{label} host us"] = per_call_us(fn, host_calls, rounds)
            row["fwd+bwd here host us"] = per_call_us(forward_backward_here, host_calls, rounds)
            rows.append(row)
            del forward, forward_backward, forward_backward_here
            torch.cuda.empty_cache()
            print(f"{name:28s} {path:14s} " + " ".join(f"{k} {v:8.1f}" for k, v in row.items() if k.endswith("us")),
                  flush=True)
    _launch.ENABLED = planned.ENABLED = True
    return rows


def check_fast_path_taken() -> int:
    """The cached path must have cached launchers after the warm-ups, else the 'cached' rows measured the
    plain path (e.g. an unsupported Triton version)."""
    n = _launch.cached_launches()
    if n == 0:
        raise SystemExit("error: no cached launches: the fast path was not taken (see _launch._supported_triton)")
    if planned.extension() is None or planned.extension().plan_count() == 0:
        raise SystemExit("error: no C++ plans: the C++ path was not taken (see the build warning)")
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_per_call_flags(p, "calls a timed round (host); 4 launches each must fit the launch queue")
    args = p.parse_args()
    about = gpu_about()
    rows = measure(args.calls, args.rounds, args.host_calls)
    about["cached_launchers"] = check_fast_path_taken()

    keys = ("fwd launched us", "fwd+bwd launched us", "fwd host us", "fwd+bwd host us", "fwd+bwd here host us")
    table = [[r["case"] + " " + "x".join(map(str, r["shape"])), r["path"], *(f"{r[k]:.1f}" for k in keys)]
             for r in rows]
    print()
    print(f"{about['device']}, torch {about['torch']}, Triton {about['triton']}, CUDA {about['cuda']}, "
          f"Python {about['python']}; bf16 channels_last, training; us a call, best of {args.rounds} rounds")
    print()
    print(md_table(["case", "path", "fwd launched", "fwd+bwd launched", "fwd host", "fwd+bwd host",
                    "fwd+bwd host, calling thread"], table))
    print()
    by = {(r["case"], r["path"]): r for r in rows}
    speedups = [[case, *(f"{by[case, 'triton plain'][k] / by[case, 'triton cached'][k]:.2f}x" for k in keys),
                 *(f"{by[case, 'triton cached'][k] / by[case, 'C++ planned'][k]:.2f}x" for k in keys),
                 *(f"{by[case, 'eager PyTorch'][k] / by[case, 'C++ planned'][k]:.2f}x" for k in keys)]
                for case, _, _ in CASES]
    print(md_table(["case", *(f"{a}/{b} {k[:-3]}" for a, b in (("plain", "cached"), ("cached", "C++"),
                                                               ("eager", "C++")) for k in keys)], speedups))
    if args.json:
        write_text_atomic(args.json, json.dumps(dict(about=about, rows=rows), indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
