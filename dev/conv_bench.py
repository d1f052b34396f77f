"""Time the implicit-GEMM convolution (src/cudacnn/kernels/conv.py) against cuDNN at the zoo's 3x3 shapes
(--extra: also resnet18's 1x1 stride-2 shortcuts), fp16 channels_last: forward, input gradient (dgrad) and
weight gradient (wgrad) one by one, then the fused case: BatchNorm apply + activation as the conv's
prologue and the next BatchNorm's statistics as its epilogue (ops.conv2d_fused) against eager PyTorch doing
the same as separate ops (addcmul, activation, F.conv2d, var_mean), forward and forward+backward.

    PYTHONPATH=src python3 dev/conv_bench.py --out $OUT/conv.json

Needs a CUDA GPU. Every kernel is autotuned over conv.CONFIGS on its first call (the chosen tile is in the
table); cuDNN runs with torch.backends.cudnn.benchmark=True. Each result is first checked against cuDNN's.
Times are triton.testing.do_bench medians. Prints a markdown table, and rewrites --out (JSON) after every
shape, so a run cut short keeps what it measured. --budget-s skips the shapes left once it is spent.
--dry-run runs the code paths at toy sizes on the CPU (Triton's interpreter; the numbers mean nothing)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch
from _harness import add_run_flags, device_for

# (model, batch, input channels, output channels, height = width): 3x3, stride 1, padding 1
SHAPES = [("fast94", 2000, 24, 64, 31), ("fast94", 2000, 64, 64, 15), ("fast94", 2000, 64, 256, 15),
          ("fast94", 2000, 256, 256, 7), ("fast94", 2000, 256, 256, 3),
          ("resnet18-cifar", 512, 64, 64, 32), ("resnet18-cifar", 512, 128, 128, 16),
          ("resnet18-cifar", 512, 256, 256, 8), ("resnet18-cifar", 512, 512, 512, 4)]
# --extra: resnet18-cifar's 1x1 stride-2 shortcuts (model, batch, cin, cout, input size, kernel, stride)
EXTRA_SHAPES = [("resnet18-cifar", 512, 64, 128, 32, 1, 2), ("resnet18-cifar", 512, 128, 256, 16, 1, 2)]
ACTIVATION = {"fast94": "gelu", "resnet18-cifar": "relu"}  # what each model's BatchNorm is followed by


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file for the results (rewritten after every shape)")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--only", default="", help="run only shapes whose label contains this text")
    parser.add_argument("--extra", action="store_true", help="also the 1x1 stride-2 shortcut shapes")
    parser.add_argument("--no-autotune", action="store_true", help="the fixed tile (CUDACNN_CONV_AUTOTUNE=0)")
    add_run_flags(parser, budget_s=180.0)
    return parser.parse_args(argv)


def label(model, n, c, k, hw, r=3, stride=1):
    kind = "" if r == 3 else f" {r}x{r}/{stride}"
    return f"{model} N={n} {c}->{k} @{hw}x{hw}{kind}"


def write_json(path, payload):
    from cudacnn.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def main(argv=None) -> int:
    args = parse(argv)
    if args.no_autotune:
        os.environ["CUDACNN_CONV_AUTOTUNE"] = "0"
    device = device_for(args, "dev/conv_bench.py")
    if device is None:
        return 2
    import torch.nn.functional as F
    import triton
    import triton.testing

    from cudacnn.kernels import conv, ops

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.backends.cudnn.benchmark = True

    def bench(fn) -> float:
        """Median milliseconds."""
        if args.dry_run:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    def tuned(kernel) -> str:
        if not conv.autotuning():
            return "fixed " + " ".join(f"{k}={v}" for k, v in conv._fixed_config().items())
        cfg = kernel.best_config
        blocks = cfg.kwargs
        return f"{blocks['BLOCK_M']}x{blocks['BLOCK_N']}x{blocks['BLOCK_K']} s{cfg.num_stages} w{cfg.num_warps}"

    def rel_err(ours, ref):
        return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype,
           "autotune": conv.autotuning(), "date": datetime.date.today().isoformat(),
           "command": "PYTHONPATH=src python3 dev/conv_bench.py "
                      + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"# conv bench: {env['device']}, torch {env['torch']}, triton {env['triton']}, {args.dtype}, "
          f"autotune {'on' if env['autotune'] else 'off'}", file=sys.stderr)
    rows, skipped = [], []
    started = time.perf_counter()
    shapes = [s + (3, 1) for s in SHAPES] + (EXTRA_SHAPES if args.extra else [])
    if args.dry_run:
        shapes = [(m, 2, max(c // 8, 3), max(k // 8, 4), min(hw, 7), r, st) for m, n, c, k, hw, r, st in shapes[:2]
                  + shapes[5:6] + shapes[9:10]]
    for model, n, c, k, hw, r, stride in shapes:
        name = label(model, n, c, k, hw, r, stride)
        if args.only not in name:
            continue
        if time.perf_counter() - started > args.budget_s:
            skipped.append(name)
            continue
        torch.manual_seed(0)
        x = torch.randn(n, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(k, c, r, r, device=device) / (r * r * c) ** 0.5).to(dtype)
        pad, out = (r - 1) // 2, (hw - 1) // stride + 1
        dy = torch.randn(n, k, out, out, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        flops = 2 * n * out * out * k * c * r * r
        none = (None, None, stride, "none")
        geometry = ([stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1)
        passes = {
            "fwd": (lambda: conv.forward(x, w, None, None, stride, pad, "none", False)[0],
                    lambda: F.conv2d(x, w, stride=stride, padding=pad), conv._fwd_tuned),
            "dgrad": (lambda: conv.input_grad(dy, x, w, *none)[0],
                      lambda: torch.ops.aten.convolution_backward(dy, x, w, None, *geometry, [True, False, False])[0],
                      conv._dgrad_tuned),
            "wgrad": (lambda: conv.weight_grad(dy, x, w, *none),
                      lambda: torch.ops.aten.convolution_backward(dy, x, w, None, *geometry, [False, True, False])[1],
                      conv._wgrad_tuned)}
        for pass_name, (ours, cudnn, kernel) in passes.items():
            err = rel_err(ours(), cudnn())  # the first call autotunes
            t_ours, t_ref = bench(ours), bench(cudnn)
            rows.append(dict(shape=name, model=model, pass_=pass_name, baseline="cuDNN", ours_ms=t_ours,
                             baseline_ms=t_ref, ours_tflops=flops / t_ours / 1e9, baseline_tflops=flops / t_ref / 1e9,
                             speedup=t_ref / t_ours, max_rel_err=err, config=tuned(kernel)))
            print(f"{name} {pass_name}: ours {t_ours:.3f} ms, cuDNN {t_ref:.3f} ms, err {err:.1e}", file=sys.stderr)

        # the fused case: BN apply + activation -> conv -> next BN's statistics
        act = ACTIVATION[model]
        scale = torch.rand(c, device=device) + 0.5
        shift = torch.randn(c, device=device) * 0.1
        grad_stats = torch.randn(2, k, device=device) / (n * hw * hw)
        act_fn = {"gelu": F.gelu, "relu": F.relu}[act]

        def fused(x, w, scale, shift):
            y, sums = ops.conv2d_fused(x, w, scale, shift, stride, pad, activation=act, stats=True)
            return y, sums

        def eager(x, w, scale, shift):
            a = act_fn(torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1)))
            y = F.conv2d(a, w, stride=stride, padding=pad)
            var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
            return y, torch.stack([mean, var])  # the statistics BatchNorm takes (ours: sums, the same work)

        # eager takes scale and shift in x's dtype: one addcmul kernel, no type promotion
        fused_inputs = [t.detach().clone().requires_grad_() for t in (x, w, scale, shift)]
        eager_inputs = [t.detach().clone().requires_grad_() for t in (x, w, scale.to(dtype), shift.to(dtype))]
        with torch.no_grad():
            y_f, sums = fused(*fused_inputs)
            y_e, _ = eager(*eager_inputs)
            err = rel_err(y_f, y_e)

        def fwd_bwd(fn, inputs):
            def run():
                for t in inputs:
                    t.grad = None
                y, stats = fn(*inputs)
                torch.autograd.backward([y, stats], [dy, grad_stats.to(stats.dtype)])
            return run

        def forward_only(fn, inputs):
            def run():
                with torch.no_grad():
                    fn(*inputs)
            return run

        fwd_bwd(fused, fused_inputs)()  # autotune the prologue variants of all three kernels
        fwd_bwd(eager, eager_inputs)()
        for pass_name, ours, ref in (
                ("fused fwd", forward_only(fused, fused_inputs), forward_only(eager, eager_inputs)),
                ("fused fwd+bwd", fwd_bwd(fused, fused_inputs), fwd_bwd(eager, eager_inputs))):
            t_ours, t_ref = bench(ours), bench(ref)
            pass_flops = flops * (3 if "bwd" in pass_name else 1)
            rows.append(dict(shape=name, model=model, pass_=f"{pass_name} ({act})", baseline="eager",
                             ours_ms=t_ours, baseline_ms=t_ref, ours_tflops=pass_flops / t_ours / 1e9,
                             baseline_tflops=pass_flops / t_ref / 1e9, speedup=t_ref / t_ours,
                             max_rel_err=err if pass_name == "fused fwd" else None,
                             config=tuned(conv._fwd_tuned) if pass_name == "fused fwd" else ""))
            print(f"{name} {pass_name}: ours {t_ours:.3f} ms, eager {t_ref:.3f} ms", file=sys.stderr)
        if device == "cuda":
            torch.cuda.empty_cache()
        if args.out:
            write_json(args.out, {"env": env, "rows": rows, "skipped": skipped})

    table = ["| shape | pass | ours ms | baseline ms | ours TFLOP/s | baseline TFLOP/s | speed vs baseline | "
             "max rel err | tile |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = f"{r['max_rel_err']:.1e}" if r["max_rel_err"] is not None else ""
        table.append(f"| {r['shape']} | {r['pass_']} vs {r['baseline']} | {r['ours_ms']:.3f} | "
                     f"{r['baseline_ms']:.3f} | "
                     f"{r['ours_tflops']:.1f} | {r['baseline_tflops']:.1f} | {r['speedup']:.2f}x | {err} | "
                     f"{r['config']} |")
    print("\n".join(table))
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, {args.dtype} channels_last, "
          f"{env['date']}; {time.perf_counter() - started:.0f} s"
          + (f"; skipped (budget): {', '.join(skipped)}" if skipped else ""))
    if args.out:
        write_json(args.out, {"env": env, "rows": rows, "skipped": skipped})
    return 0


if __name__ == "__main__":
    sys.exit(main())
