"""The zoo's first convolutions (3 input channels) against the same convolution on the input zero-padded to 4 or
8 channels: forward + weight gradient under bf16 autocast, channels_last, as device time (20 calls in one CUDA
graph).

    PYTHONPATH=src python3 dev/first_conv_bench.py --json $OUT/first_conv.json

Why: in a profiled `--cuda-graphs` epoch of bn-dropout-plus (`cudacnn bench cnn-kernels --no-ops --no-eager
--no-compile --cuda-graphs --profile DIR`, NVIDIA H100 80GB HBM3, PyTorch 2.11.0+cu130, cuDNN 9.19, 2026-12-08),
cuDNN ran one of its first convolution's kernels (3 -> 32 channels) as a generic one
(`convolve_common_engine_float_NHWC`, 46 us a step in both kernel settings), where wider inputs get tensor-core
kernels. Zero channels leave the output and the real weights' gradient unchanged (their
own weight gradient is zero), so padding could live inside the model or the conv node; this measures whether it
pays. `--dry-run`: the code paths on the CPU at toy sizes.
"""

from __future__ import annotations

import argparse
import json
import time

from _harness import add_run_flags, device_for, device_ms

# (label, batch, output channels, conv bias): the first conv of bn-dropout-plus, smallnet-plus, resnet18-cifar
CASES = [("bn_dropout conv1", 256, 32, True), ("smallnet conv1", 256, 64, False),
         ("resnet18-cifar conv1", 512, 64, False)]
WIDTHS = (3, 4, 8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the results here")
    add_run_flags(p, budget_s=120.0)
    args = p.parse_args(argv)
    device = device_for(args, "dev/first_conv_bench.py")
    if device is None:
        return 2
    import torch
    import torch.nn.functional as F


    results, started = [], time.perf_counter()
    for label, n, c_out, has_bias in CASES:
        if time.perf_counter() - started > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: skipping {label} and after", flush=True)
            break
        n = 2 if args.dry_run else n
        torch.manual_seed(0)
        x3 = torch.randn(n, 3, 32, 32, device=device)
        w3 = torch.randn(c_out, 3, 3, 3, device=device) / 27 ** 0.5
        bias = torch.randn(c_out, device=device, requires_grad=True) if has_bias else None
        dy = torch.randn(n, c_out, 32, 32, device=device).to(torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        row, reference = {"case": label, "batch": n, "out_channels": c_out}, None
        for width in WIDTHS:
            x = F.pad(x3, (0, 0, 0, 0, 0, width - 3)).contiguous(memory_format=torch.channels_last)
            w = F.pad(w3, (0, 0, 0, 0, 0, width - 3)).contiguous(memory_format=torch.channels_last)
            w.requires_grad_()
            params = [w] + ([bias] if bias is not None else [])

            def step(x=x, w=w, params=params):
                with torch.autocast(device, dtype=torch.bfloat16):
                    y = F.conv2d(x, w, bias, padding=1)
                return (y, *torch.autograd.grad(y, params, dy))

            y, dw, *_ = step()
            out = (y.float(), dw[:, :3].float())
            reference = reference or out
            diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(out, reference))
            zero = dw[:, 3:].abs().max().item() if width > 3 else 0.0
            row[f"ms_{width}"] = round(device_ms(step, device), 4)
            row[f"max_rel_diff_{width}"] = float(f"{diff:.2e}")
            print(f"{label}: {width} input channels: {row[f'ms_{width}']:.4f} ms (fwd + weight grad), outputs "
                  f"within {diff:.1e} of 3 channels', padded channels' weight gradient max {zero:.1e}", flush=True)
        for width in WIDTHS[1:]:
            row[f"ratio_{width}"] = round(row["ms_3"] / row[f"ms_{width}"], 3)
        print(f"{label}: 3 channels' time / padded: " + ", ".join(f"{w}: {row[f'ratio_{w}']:.2f}x"
                                                                 for w in WIDTHS[1:]), flush=True)
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
