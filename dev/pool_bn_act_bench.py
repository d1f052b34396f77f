"""Time the fused 2x2 max-pool -> BatchNorm(train) -> activation (ops.pool_bn_act, kernels/pool_bn_act.py)
against the PyTorch block it replaces, act(F.batch_norm(F.max_pool2d(x, 2), ...)), eager and under
torch.compile (mode default, dynamic=False), at fast94's and fast96's conv-group shapes, fp16 channels_last,
with fast nets' BatchNorm (weight frozen at 1, learnable bias, momentum 0.4, eps 1e-12).

    PYTHONPATH=src python3 dev/pool_bn_act_bench.py --json $OUT/pool_bn_act.json

Needs a CUDA GPU (--dry-run: the code paths at toy sizes on the CPU, Triton's interpreter; the numbers mean
nothing). Per shape and variant: forward, forward+backward (torch.autograd.grad of x and the bias with a fixed
upstream gradient) and backward alone (autograd.grad with retain_graph on one recorded forward; where the
compiled graph refuses a second backward, fwd+bwd minus fwd). Times are triton.testing.do_bench medians.
Variants: ours eager, ours inside torch.compile (what a compiled trainer runs), PyTorch eager, PyTorch
compiled. Every variant is first checked against a float64 reference (max |error| / max |reference| of y,
dx and d bias). "TB/s" is ours eager: the bytes its passes must move (forward: x in, p + code + y out;
backward: p + code + dy in, dx out; each tensor once) over its time. The autotuner's choice of the two
one-tile kernels (apply, dx) is printed. Prints a markdown table; --json rewrites the file after every shape,
so a run cut short keeps what it measured. --budget-s: no new shape starts after that many seconds.
On a GPU a second table gives device time (20 calls captured in one CUDA graph and replayed, so the host is
out of the way) of each variant, and ours' forward+backward as a fraction of the copy bandwidth."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from _harness import add_run_flags, device_for

# (model, batch, channels, input height = width, activation). fast94's groups see 31, 15 and 7 (its 2x2
# whitening conv has no padding) on the 1024 examples it keeps of each batch; 1216 was its kept batch before
# (benchmarks/kernels.md's table); the 32/16/8 rows are the round sizes, for comparison.
SHAPES = [("fast94", 1024, 64, 31, "silu"), ("fast94", 1024, 256, 15, "silu"), ("fast94", 1024, 256, 7, "silu"),
          ("fast94", 1216, 64, 31, "silu"), ("fast94", 1216, 256, 15, "silu"), ("fast94", 1216, 256, 7, "silu"),
          ("fast94", 1536, 64, 32, "silu"), ("fast94", 1536, 256, 16, "silu"), ("fast94", 1536, 256, 8, "silu"),
          ("fast96", 1500, 128, 32, "gelu"), ("fast96", 1500, 512, 16, "gelu"), ("fast96", 1500, 512, 8, "gelu"),
          ("fast96", 1500, 128, 31, "gelu"), ("fast96", 1500, 512, 15, "gelu"), ("fast96", 1500, 512, 7, "gelu")]
DRY_SHAPES = [("toy", 2, 20, 9, "silu"), ("toy", 2, 16, 8, "gelu")]
VARIANTS = ("ours", "ours compiled", "eager", "compiled")


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="JSON file for the results (rewritten after every shape)")
    parser.add_argument("--only", help="comma-separated models to run (fast94, fast96)")
    add_run_flags(parser, budget_s=480.0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    device = device_for(args, "dev/pool_bn_act_bench.py")
    if device is None:
        return 2
    import torch
    import torch.nn.functional as F
    import triton

    from cudacnn.atomic import write_text_atomic
    from cudacnn.bench.cnn_kernels import copy_bandwidth_gbps, graph_time_fn
    from cudacnn.kernels import ops
    from cudacnn.kernels import pool_bn_act as P
    from cudacnn.kernels.activations import reference_forward

    momentum, eps = 0.4, 1e-12
    shapes = DRY_SHAPES if args.dry_run else [s for s in SHAPES if not args.only or s[0] in args.only.split(",")]

    def bench(fn) -> float:
        if args.dry_run:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=sys.version.split()[0],
                dtype="fp32 (dry run)" if args.dry_run else "fp16", memory_format="channels_last",
                autotune=P.autotuning())
    if not args.dry_run:
        meta["copy_gbps"] = copy_bandwidth_gbps(device, torch.float16)
    print(f"device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}")
    rows = []
    started = time.perf_counter()
    for model, n, c, size, activation in shapes:
        if time.perf_counter() - started > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: skipping {model} N={n} C={c} {size}x{size} and after")
            break
        # inputs drawn on the CPU: a CUDA-graph capture that failed for the previous shape (caught below) can
        # leave the CUDA generator unusable ("Offset increment outside graph capture")
        torch.manual_seed(0)
        dtype = torch.float32 if args.dry_run else torch.float16
        x = torch.randn(n, c, size, size).to(device, dtype).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        weight = torch.ones(c, device=device)  # frozen at 1, as the fast nets'
        bias = (0.1 * torch.randn(c)).to(device).requires_grad_()
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        oh = size // 2
        dy = torch.randn(n, c, oh, oh).to(device, dtype).contiguous(memory_format=torch.channels_last)

        def ours(x):
            return ops.pool_bn_act(x, weight, bias, rm, rv, True, momentum, eps, activation)

        def block(x):
            z = F.batch_norm(F.max_pool2d(x, 2), rm, rv, weight, bias, True, momentum, eps)
            return F.silu(z) if activation == "silu" else F.gelu(z)

        torch._dynamo.reset()
        backend = "aot_eager" if args.dry_run else "inductor"
        fns = {"ours": ours, "ours compiled": torch.compile(ours, dynamic=False, backend=backend),
               "eager": block, "compiled": torch.compile(block, dynamic=False, backend=backend)}

        # float64 reference: y, dx, d bias
        x64 = x.detach().double().requires_grad_()
        b64 = bias.detach().double().requires_grad_()
        z64 = F.batch_norm(F.max_pool2d(x64, 2), None, None, weight.double(), b64, True, momentum, eps)
        y64 = reference_forward(z64, activation)
        dx64, db64 = torch.autograd.grad(y64, (x64, b64), dy.double())

        row = dict(model=model, N=n, C=c, H=size, W=size, activation=activation, ms={}, error={})
        for name, fn in fns.items():
            y = fn(x)
            dx, db = torch.autograd.grad(y, (x, bias), dy)
            row["error"][name] = max(((a.double() - b).abs().max() / b.abs().max()).item()
                                     for a, b in ((y, y64), (dx, dx64), (db, db64)))
            fwd = bench(lambda: fn(x))
            both = bench(lambda: torch.autograd.grad(fn(x), (x, bias), dy))
            y = fn(x)
            try:
                bwd = bench(lambda: torch.autograd.grad(y, (x, bias), dy, retain_graph=True))
                how = "retain_graph"
            except RuntimeError:
                bwd, how = both - fwd, "fwd+bwd - fwd"
            row["ms"][name] = dict(fwd=fwd, fwd_bwd=both, bwd=bwd, bwd_how=how)
            if name == "ours" and P.autotuning():
                row["configs"] = {k: str(t.best_config) for k, t in (("apply", P._apply_tuned), ("dx", P._dx_tuned))}
        size_of = x.element_size()
        pooled = n * c * oh * oh
        fwd_bytes = x.numel() * size_of + pooled * (2 * size_of + 1)  # x in; p, code, y out
        bwd_bytes = pooled * (2 * size_of + 1) + x.numel() * size_of  # p, code, dy in; dx out
        ours_ms = row["ms"]["ours"]
        row["tbps"] = dict(fwd=fwd_bytes / ours_ms["fwd"] / 1e9, bwd=bwd_bytes / ours_ms["bwd"] / 1e9,
                           fwd_bwd=(fwd_bytes + bwd_bytes) / ours_ms["fwd_bwd"] / 1e9)
        if not args.dry_run:  # device time: 20 calls in one CUDA graph, replayed, so the host is out of the way
            try:
                row["graph_ms"] = {}
                for name, fn in fns.items():
                    fwd_g = graph_time_fn(lambda fn=fn: fn(x), device)
                    both_g = graph_time_fn(lambda fn=fn: torch.autograd.grad(fn(x), (x, bias), dy), device)
                    row["graph_ms"][name] = dict(fwd=fwd_g.median_ms, fwd_bwd=both_g.median_ms)
                both_bytes = fwd_bytes + bwd_bytes
                row["graph_of_copy"] = (both_bytes / (row["graph_ms"]["ours"]["fwd_bwd"] * 1e-3) / 1e9
                                        / meta["copy_gbps"])
            except RuntimeError as e:  # a capture that fails costs this table's row, not the launched times
                print(f"CUDA graph timing failed for {model} N={n} C={c}: {e}", flush=True)
                row.pop("graph_ms", None)
        rows.append(row)
        print_row(row, header=len(rows) == 1)
        if args.json:
            write_text_atomic(args.json, json.dumps(dict(meta=meta, rows=rows), indent=1))
    print_graph_table(rows)
    return 0


def print_graph_table(rows) -> None:
    """Device time (CUDA graph replay) a call, forward and forward+backward; ratio = the baseline's ms / ours
    (> 1: ours faster); "of copy" = ours' minimal bytes over its fwd+bwd time, a fraction of the copy bandwidth."""
    rows = [r for r in rows if "graph_ms" in r]
    if not rows:
        return
    print("\nDevice time, ms a call (20 calls in one CUDA graph, replayed)")
    print("| shape | fwd: ours / eager / Inductor | fwd+bwd: ours / eager / Inductor | fwd+bwd vs eager | "
          "fwd+bwd vs Inductor | ours compiled fwd+bwd | of copy |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        g = r["graph_ms"]
        ours, eager, inductor = g["ours"], g["eager"], g["compiled"]
        print(f"| {r['model']} {r['N']}x{r['C']}x{r['H']}x{r['W']} | {ours['fwd']:.3f} / {eager['fwd']:.3f} / "
              f"{inductor['fwd']:.3f} | {ours['fwd_bwd']:.3f} / {eager['fwd_bwd']:.3f} / {inductor['fwd_bwd']:.3f} | "
              f"{eager['fwd_bwd'] / ours['fwd_bwd']:.2f}x | {inductor['fwd_bwd'] / ours['fwd_bwd']:.2f}x | "
              f"{g['ours compiled']['fwd_bwd']:.3f} | {r['graph_of_copy']:.2f} |", flush=True)


def print_row(row, header: bool) -> None:
    """Three table rows a shape: forward, backward, forward+backward."""
    if header:
        cols = ["shape", "act", "pass"] + [f"{v} ms" for v in VARIANTS] + \
            ["ours / eager", "ours / compiled", "ours compiled / compiled", "ours TB/s",
             "max rel err (ours, ours comp, eager, comp)", "autotuned tiles"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
    ms = row["ms"]
    for phase in ("fwd", "bwd", "fwd_bwd"):
        first = phase == "fwd"
        shape = f"{row['model']} {row['N']}x{row['C']}x{row['H']}x{row['W']}" if first else ""
        subtracted = phase == "bwd" and any(ms[v]["bwd_how"] != "retain_graph" for v in VARIANTS)
        label = phase.replace("_", "+") + (" (some: fwd+bwd - fwd)" if subtracted else "")
        cells = [shape, row["activation"] if first else "", label]
        cells += [f"{ms[v][phase]:.3f}" for v in VARIANTS]
        cells += [f"{ms['ours'][phase] / ms['eager'][phase]:.2f}", f"{ms['ours'][phase] / ms['compiled'][phase]:.2f}",
                  f"{ms['ours compiled'][phase] / ms['compiled'][phase]:.2f}", f"{row['tbps'][phase]:.2f}"]
        cells += [", ".join(f"{row['error'][v]:.1e}" for v in VARIANTS) if first else "",
                  str(row.get("configs", "fixed")) if first else ""]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
