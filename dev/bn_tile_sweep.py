"""Launch-setting sweep of the fused BatchNorm op (src/cudacnn/kernels/batchnorm.py) at the zoo's shapes.

    PYTHONPATH=src python3 dev/bn_tile_sweep.py --json $OUT/bn_tiles.json [--budget-s 480] [--cases resnet18]

The op's tiles (batchnorm._tiles) and its reductions' waves of the GPU (batchnorm.WAVES) are the best of this sweep
where it ran (the cases without the pool). For each case of `cudacnn bench cnn-kernels` (bench/cnn_kernels.OP_CASES:
bf16, channels_last, training; ReLU + pool without BatchNorm included), this times the op's forward and forward +
backward as device time (20 calls in one CUDA graph) under each setting: the library's own first, then the tile
(BLOCK_P) scaled by 1, 1/2 or 2 with 4 or 8 warps and 2, 4 or 8 waves. Each setting's outputs and gradients are
checked against the library setting's (other summation orders differ in the last bits, and so may flip the side of
ReLU's kink that an element falls on). The training calls run the op's Python path: a C++ plan keeps the settings it
was recorded with (for ReLU + pool without BatchNorm that path's backward is the launch that writes dx alone;
training's conv node takes the one that also sums it, with the same tile but the reduction's split into waves).
`--dry-run`: a toy case on the CPU under Triton's interpreter (there the tiles are the interpreter's, so only the
code paths run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

from _harness import add_run_flags, device_for, device_ms

SCALES, WARPS, WAVES = (1.0, 0.5, 2.0), (4, 8), (2, 4, 8)
SETTINGS = [(1.0, None, None)] + list(itertools.product(SCALES, WARPS, WAVES))  # None: the library's
DRY_CASES = [("toy BN+add+ReLU", (2, 20, 6, 6), "relu", True, False, True),
             ("toy ReLU+pool", (2, 20, 6, 6), "relu", False, True, False)]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="JSON file for the results (rewritten after every case)")
    p.add_argument("--cases", help="only the cases whose label contains one of these comma-separated texts")
    add_run_flags(p, budget_s=480.0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    device = device_for(args, "dev/bn_tile_sweep.py")
    if device is None:
        return 2
    import torch

    from cudacnn.atomic import write_text_atomic
    from cudacnn.bench.cnn_kernels import OP_CASES
    from cudacnn.kernels import ActivationPool, BatchNormAct, planned
    from cudacnn.kernels import batchnorm as B

    # A C++ plan keeps the launch settings it was recorded with (its key has no tiles): time the Python path,
    # which launches the same kernels with each setting's tiles.
    planned.ENABLED = False

    cases = DRY_CASES if args.dry_run else [c for c in OP_CASES if (
        not args.cases or any(t in c[0] for t in args.cases.split(",")))]
    tiles, programs = B._tiles, B._programs_per_channel_block
    configs = [B._stats_config, B._apply_config, B._backward_config]

    def restore() -> None:
        B._tiles, B._programs_per_channel_block = tiles, programs
        for config in configs:
            config.cache_clear()

    def use(scale: float, warps: int | None, waves: int | None) -> None:
        """Every launch from here on takes this setting (the configurations are recomputed); None keeps the
        library's warps or waves."""
        def scaled(C, pool, backward, interpreted):
            block_p, block_c, lib_warps = tiles(C, pool, backward, interpreted)
            return (block_p, block_c, lib_warps) if interpreted else (max(int(block_p * scale), 8), block_c,
                                                                      warps or lib_warps)

        def waved(c_blocks, device, library_waves):
            return programs(c_blocks, device, waves or library_waves)

        B._tiles, B._programs_per_channel_block = scaled, waved
        for config in configs:
            config.cache_clear()

    def sweep(label, shape, activation, residual, pool, normalize) -> list[dict]:
        """Every setting's times at one case, the library's first."""
        torch.manual_seed(0)
        dtype = torch.float32 if args.dry_run else torch.bfloat16
        x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        res = torch.randn_like(x).requires_grad_() if residual else None
        if normalize:
            module = BatchNormAct.from_torch(torch.nn.BatchNorm2d(shape[1], device=device), activation, pool)
            params = [module.weight, module.bias]
        else:
            module, params = ActivationPool(activation), []
        inputs = [t for t in (x, res) if t is not None] + params

        def op():
            return module(x, res) if normalize else module(x)

        dy = torch.randn_like(op())

        def forward():
            with torch.no_grad():
                return op()

        def both():
            y = op()
            return (y, *torch.autograd.grad(y, inputs, dy))

        rows, reference = [], None
        for scale, warps, waves in SETTINGS:
            use(scale, warps, waves)
            try:
                outputs = [t.detach().float() for t in both()]
                fwd_ms, both_ms = device_ms(forward, device), device_ms(both, device)
            except Exception as error:  # noqa: BLE001 -- a tile too large for the SM: report it, go on
                print(f"{label}: scale {scale} warps {warps} waves {waves}: failed ({error})", flush=True)
                continue
            reference = reference or outputs
            diff = max(((a - b).abs().max() / (b.abs().max() + 1e-12)).item() for a, b in zip(outputs, reference))
            rows.append({"scale": scale, "warps": warps, "waves": waves, "fwd_ms": round(fwd_ms, 4),
                         "fwd_bwd_ms": round(both_ms, 4), "max_rel_diff_vs_library": float(f"{diff:.2e}")})
            print(f"{label}: scale {scale} warps {warps} waves {waves}: fwd {fwd_ms:.4f} ms, fwd+bwd "
                  f"{both_ms:.4f} ms, max rel diff {diff:.1e}", flush=True)
        restore()
        return rows

    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}", flush=True)
    results, started = [], time.perf_counter()
    for label, shape, activation, residual, pool, normalize in cases:
        if time.perf_counter() - started > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: skipping {label} and after", flush=True)
            break
        rows = sweep(label, shape, activation, residual, pool, normalize)
        if rows:
            best = min(rows, key=lambda r: r["fwd_bwd_ms"])
            print(f"{label}: best {best} = {best['fwd_bwd_ms'] / rows[0]['fwd_bwd_ms']:.3f}x the library's "
                  "fwd+bwd", flush=True)
            results.append({"case": label, "shape": list(shape), "activation": activation, "residual": residual,
                            "pool": pool, "batchnorm": normalize, "settings": rows, "best": best})
        if args.json:
            write_text_atomic(args.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
