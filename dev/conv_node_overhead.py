"""Host time of a conv layer in an eager training step: a 3x3 convolution into BatchNorm + ReLU, forward +
backward (autograd.grad, on the calling thread as the Trainer runs it), bf16 autocast over float32 weights,
channels_last, three ways:
  - eager PyTorch: F.conv2d, F.batch_norm, ReLU (autograd nodes: weight cast, convolution, BatchNorm, ReLU);
  - two calls: F.conv2d, then our fused op from its C++ plan (weight cast, convolution, our node);
  - one node: ops.conv_batchnorm_act (the convolution and the op under one C++ node).
Per way: "launched" = wall time of N calls between two synchronizes, / N; "host" = time to issue N calls
without synchronizing, / N (meaningful where the GPU keeps up: the small shape). Best of --rounds rounds after
a warm-up, which also records the plans and links the node's key (checked: the node must have been taken).

    PYTHONPATH=src python3 dev/conv_node_overhead.py [--calls 200] [--rounds 7] [--json $OUT/conv_node.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from _harness import add_per_call_flags, gpu_about, per_call_us

from cudacnn.atomic import write_text_atomic
from cudacnn.kernels import ops, planned
from cudacnn.tables import md_table

CASES = [  # (name, (N, C, H, W)): conv C -> C, 3x3, padding 1
    ("smallnet stage 1 conv2", (256, 64, 32, 32)),
    ("small", (256, 256, 4, 4)),
]
WAYS = ("eager PyTorch", "two calls", "one node")


def make_step(shape, way: str):
    n, c, h, w = shape
    cl = torch.channels_last
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl).requires_grad_()
    conv_w = (torch.randn(c, c, 3, 3, device="cuda") / (3 * c ** 0.5)).contiguous(memory_format=cl)
    conv_w.requires_grad_()
    weight = torch.ones(c, device="cuda", requires_grad=True)
    bias = torch.zeros(c, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    dy = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
    conv = (conv_w, None, (1, 1), (1, 1), (1, 1), 1)

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if way == "eager PyTorch":
                return torch.relu(F.batch_norm(F.conv2d(x, *conv), rm, rv, weight, bias, True, 0.1, 1e-5))
            if way == "two calls":
                return ops.batchnorm_act(F.conv2d(x, *conv), weight, bias, None, rm, rv, True, activation="relu")
            return ops.conv_batchnorm_act(x, *conv, weight, bias, None, rm, rv, True, activation="relu")

    def step():
        with torch.autograd.set_multithreading_enabled(False):
            return torch.autograd.grad(forward(), (x, conv_w, weight, bias), dy)

    return forward, step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_per_call_flags(p)
    args = p.parse_args()
    about = gpu_about()
    rows = []
    for name, shape in CASES:
        for way in WAYS:
            forward, step = make_step(shape, way)
            links = planned.conv_link_count()
            row = dict(case=name, shape=list(shape), way=way)
            row["fwd+bwd launched us"] = per_call_us(step, args.calls, args.rounds, sync="end")
            row["fwd+bwd host us"] = per_call_us(step, args.host_calls, args.rounds)
            row["fwd host us"] = per_call_us(forward, args.host_calls, args.rounds)
            if way == "one node" and (planned.conv_link_count() <= links or "ConvBatchNormAct" not in
                                      forward().grad_fn.name()):
                raise SystemExit("error: the one-node path was not taken (see the C++ launcher's build warning)")
            rows.append(row)
            print(f"{name:24s} {way:14s} " + " ".join(f"{k} {v:8.1f}" for k, v in row.items() if k.endswith("us")),
                  flush=True)
            del forward, step
            torch.cuda.empty_cache()
    keys = ("fwd+bwd launched us", "fwd+bwd host us", "fwd host us")
    print(f"\n{about['device']}, torch {about['torch']}, Triton {about['triton']}, CUDA {about['cuda']}, "
          f"cuDNN {about['cudnn']}; us a call, best of {args.rounds} rounds\n")
    print(md_table(["case", "way", "fwd+bwd launched", "fwd+bwd host", "fwd host"],
                   [[r["case"] + " " + "x".join(map(str, r["shape"])), r["way"], *(f"{r[k]:.1f}" for k in keys)]
                    for r in rows]))
    if args.json:
        write_text_atomic(args.json, json.dumps(dict(about=about, rows=rows), indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
