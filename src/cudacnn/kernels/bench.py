"""Kernel benchmarks: ours (Triton, CUDA C++) against PyTorch eager / cuBLAS / torch.compile, same run.

    PYTHONPATH=src python3 -m cudacnn.kernels.bench [--quick] [--no-compile] [--json out.json]

Every row: ours_ms and baseline_ms (medians of triton.testing.do_bench), ratio = baseline_ms / ours_ms
(> 1: ours faster; for a GEMM it is the fraction of the baseline's throughput), the throughput (TFLOP/s or
GB/s counting each tensor read once and written once), roofline_fraction against the datasheet peak, and
rel_err = |ours - baseline| / |baseline| on the same random inputs."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from unittest import mock

import torch
import torch.nn.functional as F

from cudacnn.atomic import write_text_atomic

# Datasheet dense tensor-core peaks (TFLOP/s) and HBM bandwidth (GB/s) of the SXM parts.
_PEAKS = {"H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9, "hbm": 3350.0},
          "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9, "hbm": 4800.0}}


def _peaks() -> dict:
    name = torch.cuda.get_device_name()
    for key, peaks in _PEAKS.items():
        if key in name:
            return peaks
    return dict.fromkeys(("bf16", "fp16", "tf32", "fp32", "hbm"), float("nan"))


def _time(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _rel_err(ours, ref) -> float:
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _row(name, shape, dtype, ours_ms, baseline, baseline_ms, work, unit, peak, rel_err=None, **extra):
    rate = work / (ours_ms * 1e-3) / (1e12 if unit == "tflops" else 1e9)
    row = {"name": name, "shape": shape, "dtype": dtype, "ours_ms": round(ours_ms, 4), "baseline": baseline,
           "baseline_ms": round(baseline_ms, 4), "ratio": round(baseline_ms / ours_ms, 3), unit: round(rate, 1),
           "roofline_fraction": round(rate / peak, 3)}
    if rel_err is not None:
        row["rel_err"] = float(f"{rel_err:.2e}")
    row.update(extra)
    print(f"  {name:34s} {shape:22s} {dtype:5s} ours {ours_ms:8.4f} ms  {baseline} {baseline_ms:8.4f} ms  "
          f"ratio {row['ratio']:6.3f}  {rate:8.1f} {unit}", file=sys.stderr, flush=True)
    return row


def _compiled_ms(fn, *args):
    """Time torch.compile(fn); a compile failure is recorded, not raised."""
    try:
        compiled = torch.compile(fn)
        compiled(*args)
        return round(_time(lambda: compiled(*args)), 4)
    except Exception as exc:  # noqa: BLE001
        return f"failed: {type(exc).__name__}"


def _graph_ms(fn):
    """Median time of fn replayed from a CUDA graph (triton.testing.do_bench_cudagraph)."""
    import triton.testing

    try:
        fn()
        torch.cuda.synchronize()
        return round(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"), 4)
    except Exception as exc:  # noqa: BLE001
        return f"failed: {type(exc).__name__}"


def _try(rows, fn):
    """One failing benchmark (a build error, say) must not cost the others."""
    try:
        fn(rows)
    except Exception as exc:  # noqa: BLE001 - reported as a row
        rows.append({"name": getattr(fn, "__name__", "bench"), "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(f"  {fn.__name__} FAILED: {exc}", file=sys.stderr, flush=True)


BENCHES = ("copy_bandwidth", "cuda_gemm", "triton_gemm", "fused_linear_gelu", "activations", "gelu_launch_sweep",
           "cross_entropy")


def run(quick: bool = False, compile: bool = True, only: tuple[str, ...] = BENCHES) -> list[dict]:
    """The benchmarks named in `only` (copy_bandwidth always runs: the activation rows are ratios to it)."""
    from . import cuda_ext, ops
    from .activations import activation_backward, activation_forward
    from .cross_entropy import softmax_cross_entropy
    from .gemm import gemm

    gemm_module = importlib.import_module("cudacnn.kernels.gemm")  # the package's `gemm` is the function

    if not torch.cuda.is_available():
        raise RuntimeError("kernel benchmarks need a CUDA GPU")
    torch.manual_seed(0)
    dev, peaks = "cuda", _peaks()
    compile = compile and not quick
    n_gemm = 2048 if quick else 4096
    n_elem = (1 << 24) if quick else (1 << 26)
    ce_rows = (1 << 18) if quick else (1 << 20)
    rows: list[dict] = []
    copy_gbps = {}

    def copy_bandwidth(rows):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n_elem, device=dev).to(dtype)
            y = torch.empty_like(x)
            ms = _time(lambda: y.copy_(x))
            copy_gbps[dtype] = 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
            rows.append({"name": "device copy", "shape": f"{n_elem}", "dtype": str(dtype)[6:], "ours_ms": round(ms, 4),
                         "gbps": round(copy_gbps[dtype], 1), "roofline_fraction": round(copy_gbps[dtype] / peaks["hbm"], 3)})
            print(f"  device copy {dtype}: {copy_gbps[dtype]:.0f} GB/s", file=sys.stderr, flush=True)

    def triton_variants(fn, tf32=False):
        """(kernel name, ms, output) for each Triton GEMM kernel; a kernel that fails is reported as such."""
        results = []
        for kernel in ("tma", "persistent") + (("pointers",) if tf32 else ()):
            gemm_module._tma_failed = False
            with mock.patch.dict(os.environ, {"CUDACNN_GEMM_KERNEL": kernel}):
                ms = _time(fn)
                out = fn()
            failed = gemm_module._tma_failed
            gemm_module._tma_failed = False
            results.append((kernel + (" FAILED->pointers" if failed else ""), ms, out))
        return results

    def chosen_config(kernel, dtype) -> str:
        """The config the autotuner picked for the last GEMM of this kernel and dtype."""
        ran = "pointers" if "FAILED" in kernel else kernel  # a failed TMA kernel fell back to the pointer one
        name = {"tma": "_gemm_tma", "persistent": "_gemm_persistent"}.get(ran, "_gemm")
        tuner = getattr(gemm_module, name + ("_32bit" if dtype == torch.float32 else "_16bit"), None)
        return str(getattr(tuner, "best_config", ""))

    def triton_gemm(rows):
        for dtype, label, tf32 in ((torch.bfloat16, "bf16", False), (torch.float16, "fp16", False),
                                   (torch.float32, "tf32", True)):
            a = torch.randn(n_gemm, n_gemm, device=dev, dtype=dtype)
            w = torch.randn(n_gemm, n_gemm, device=dev, dtype=dtype)
            b = w.t()  # nn.Linear layout: y = x @ w^T
            torch.backends.cuda.matmul.allow_tf32 = tf32
            base = _time(lambda: torch.matmul(a, b))
            ref = torch.matmul(a.double(), b.double())
            for kernel, ours, out in triton_variants(lambda: gemm(a, b, allow_tf32=tf32), tf32):
                rows.append(_row(f"triton gemm ({kernel})", f"{n_gemm}^3", label, ours, "torch.matmul", base,
                                 2 * n_gemm ** 3, "tflops", peaks[label], _rel_err(out, ref),
                                 config=chosen_config(kernel, dtype)))
        torch.backends.cuda.matmul.allow_tf32 = False
        # Full-precision float32 (no tensor cores; what cudacnn.engine runs) against cuBLAS SGEMM.
        a, b = torch.randn(1024, 1024, device=dev), torch.randn(1024, 1024, device=dev)
        rows.append(_row("triton gemm fp32 (pointers, ieee)", "1024^3", "fp32", _time(lambda: gemm(a, b)),
                         "torch.matmul", _time(lambda: torch.matmul(a, b)), 2 * 1024 ** 3, "tflops",
                         peaks["fp32"], _rel_err(gemm(a, b), a.double() @ b.double()),
                         config=str(getattr(gemm_module._gemm_full_fp32, "best_config", ""))))

    def fused_linear_gelu(rows):
        for M, K, N in ((n_gemm, n_gemm, n_gemm), (4 * n_gemm, n_gemm // 4, n_gemm)):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5
            bias = torch.randn(N, device=dev, dtype=torch.bfloat16)
            eager = lambda: F.gelu(F.linear(x, w, bias))  # noqa: E731
            base = _time(eager)
            plain = _time(lambda: F.linear(x, w, bias))
            ref = F.gelu(F.linear(x.double(), w.double(), bias.double()))
            extra = {"cublas_linear_ms": round(plain, 4)}
            if compile:
                extra["compile_ms"] = _compiled_ms(eager)
            for kernel, ours, out in triton_variants(lambda: gemm(x, w.t(), bias, "gelu")):
                rows.append(_row(f"triton gemm+bias+gelu ({kernel})", f"{M}x{K}x{N}", "bf16", ours,
                                 "eager linear+gelu", base, 2 * M * N * K, "tflops", peaks["bf16"],
                                 _rel_err(out, ref), config=chosen_config(kernel, x.dtype), **extra))
            # The same GEMM without the epilogue math: what bias + GELU cost inside our kernel.
            for kernel, ours, _ in triton_variants(lambda: gemm(x, w.t())):
                rows.append(_row(f"triton gemm, no epilogue ({kernel})", f"{M}x{K}x{N}", "bf16", ours,
                                 "cuBLAS linear", plain, 2 * M * N * K, "tflops", peaks["bf16"],
                                 config=chosen_config(kernel, x.dtype)))
            if cuda_ext.cuda_available():
                for variant in (0, 5):
                    fn = lambda: cuda_ext.cuda_gemm(x, w.t(), bias, "gelu", variant=variant)  # noqa: E731
                    ours_cuda = _time(fn)
                    rows.append(_row(f"cuda gemm+bias+gelu (v{variant})", f"{M}x{K}x{N}", "bf16", ours_cuda,
                                     "eager linear+gelu", base, 2 * M * N * K, "tflops", peaks["bf16"],
                                     _rel_err(fn(), ref)))

    def activations(rows):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n_elem, device=dev).to(dtype)
            g = torch.randn(n_elem, device=dev).to(dtype)
            size = x.element_size() * n_elem
            for kind in ("relu", "gelu", "gelu_tanh", "silu"):
                ref_fwd = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu,
                           "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[kind]
                base_fwd = _time(lambda: ref_fwd(x))
                impls = [("triton", activation_forward, activation_backward)]
                if cuda_ext.cuda_available():
                    impls.append(("cuda", cuda_ext.cuda_activation_forward, cuda_ext.cuda_activation_backward))
                for impl, fwd, bwd in impls:
                    ours = _time(lambda: fwd(x, kind))
                    rows.append(_row(f"{impl} {kind} fwd", f"{n_elem}", str(dtype)[6:], ours, "eager", base_fwd,
                                     2 * size, "gbps", peaks["hbm"], _rel_err(fwd(x, kind), ref_fwd(x.double())),
                                     of_copy=round(2 * size / (ours * 1e-3) / 1e9 / copy_gbps[dtype], 3)))
                    ours = _time(lambda: bwd(g, x, kind))
                    rows.append(_row(f"{impl} {kind} bwd", f"{n_elem}", str(dtype)[6:], ours, "device copy",
                                     3 * size / (copy_gbps[dtype] * 1e6), 3 * size, "gbps", peaks["hbm"],
                                     of_copy=round(3 * size / (ours * 1e-3) / 1e9 / copy_gbps[dtype], 3)))

    def gelu_launch_sweep(rows):
        """Block size and warps of the Triton exact-GELU forward in bf16 (the one activation row below
        0.85 of copy bandwidth in earlier runs)."""
        import triton

        acts = importlib.import_module("cudacnn.kernels.activations")
        x = torch.randn(n_elem, device=dev).to(torch.bfloat16)
        y = torch.empty_like(x)
        size = 2 * x.numel() * x.element_size()
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8):
                fn = lambda: acts._activation_fwd_kernel[(triton.cdiv(n_elem, block),)](  # noqa: E731
                    x, y, n_elem, KIND=acts.activation_code("gelu"), FAST=True, BLOCK=block, num_warps=warps)
                ms = _time(fn)
                rows.append(_row(f"triton gelu fwd BLOCK={block} warps={warps}", f"{n_elem}", "bfloat16", ms,
                                 "device copy", size / (copy_gbps[torch.bfloat16] * 1e6), size, "gbps",
                                 peaks["hbm"], of_copy=round(size / (ms * 1e-3) / 1e9 / copy_gbps[torch.bfloat16], 3)))

    def cross_entropy(rows):
        C = 10
        x = torch.randn(ce_rows, C, device=dev) * 3
        t = torch.randint(0, C, (ce_rows,), device=dev)
        xg = x.clone().requires_grad_()

        def eager():
            xg.grad = None
            F.cross_entropy(xg, t, label_smoothing=0.2).backward()

        def ours_autograd():
            xg.grad = None
            ops.cross_entropy(xg, t, 0.2).backward()

        base = _time(eager)
        ours = _time(lambda: softmax_cross_entropy(x, t, 0.2, return_grad=True))
        loss, grad = softmax_cross_entropy(x, t, 0.2, return_grad=True)
        eager()
        err = _rel_err(grad, xg.grad)
        extra = {"autograd_ms": round(_time(ours_autograd), 4)}
        # The same work replayed from CUDA graphs: device time without Python and launch overheads.
        for key, fn in (("graph_ours_ms", lambda: softmax_cross_entropy(x, t, 0.2, return_grad=True)),
                        ("graph_eager_ms", eager), ("graph_ours_autograd_ms", ours_autograd)):
            extra[key] = _graph_ms(fn)
        if compile:
            def compiled_step(x_, t_):
                return torch.func.grad(lambda z: F.cross_entropy(z, t_, label_smoothing=0.2))(x_)
            extra["compile_ms"] = _compiled_ms(compiled_step, x, t)
        bytes_moved = x.numel() * 4 * 2 + t.numel() * 8
        rows.append(_row("triton softmax-CE fwd+bwd", f"{ce_rows}x{C}", "fp32", ours, "F.cross_entropy fwd+bwd", base,
                         bytes_moved, "gbps", peaks["hbm"], err, **extra))

    def cuda_gemm(rows):
        if not cuda_ext.cuda_available():
            return
        for dtype, label, variants in ((torch.bfloat16, "bf16", (0, 1, 2, 3, 4, 5)), (torch.float16, "fp16", (0, 5))):
            a = torch.randn(n_gemm, n_gemm, device=dev, dtype=dtype)
            w = torch.randn(n_gemm, n_gemm, device=dev, dtype=dtype)
            base = _time(lambda: torch.matmul(a, w.t()))
            ref = torch.matmul(a.double(), w.t().double())
            for variant in variants:
                try:
                    fn = lambda: cuda_ext.cuda_gemm(a, w.t(), variant=variant)  # noqa: E731
                    ours = _time(fn)
                    rows.append(_row(f"cuda c++ gemm v{variant} ({'wgmma' if variant == 5 else 'mma.sync'})",
                                     f"{n_gemm}^3", label, ours, "cuBLAS", base, 2 * n_gemm ** 3, "tflops",
                                     peaks[label], _rel_err(fn(), ref)))
                except Exception as exc:  # noqa: BLE001 - one variant failing must not hide the others
                    rows.append({"name": f"cuda c++ gemm v{variant}", "error": f"{type(exc).__name__}: {exc}"[:300]})

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cuda {torch.version.cuda}",
          file=sys.stderr, flush=True)
    benches = (copy_bandwidth, cuda_gemm, triton_gemm, fused_linear_gelu, activations, gelu_launch_sweep,
               cross_entropy)
    assert tuple(b.__name__ for b in benches) == BENCHES  # the CLI's names are these functions'
    for bench in benches:
        if bench is copy_bandwidth or bench.__name__ in only:
            _try(rows, bench)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'name':34s} {'shape':18s} {'dtype':5s} {'ours ms':>9s} {'base ms':>9s} {'ratio':>6s} "
             f"{'rate':>9s} {'roof':>5s} {'rel_err':>8s}  baseline"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:34s} ERROR {r['error']}")
            continue
        rate = f"{r['tflops']}TF" if "tflops" in r else f"{r.get('gbps', '')}GB"
        lines.append(f"{r['name']:34s} {r.get('shape', ''):18s} {r.get('dtype', ''):5s} {r['ours_ms']:9.4f} "
                     f"{r.get('baseline_ms', float('nan')):9.4f} {r.get('ratio', float('nan')):6.3f} {rate:>9s} "
                     f"{r.get('roofline_fraction', float('nan')):5.3f} {r.get('rel_err', ''):>8}  {r.get('baseline', '')}"
                     + (f" of_copy={r['of_copy']}" if "of_copy" in r else "")
                     + (f" compile={r['compile_ms']}ms" if "compile_ms" in r else "")
                     + (f" autograd={r['autograd_ms']}ms" if "autograd_ms" in r else "")
                     + "".join(f" {k}={r[k]}" for k in ("cublas_linear_ms", "graph_ours_ms", "graph_eager_ms",
                                                         "graph_ours_autograd_ms") if k in r))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--only", default=",".join(BENCHES),
                        help=f"comma-separated subset of {', '.join(BENCHES)} (default: all)")
    args = parser.parse_args(argv)
    only = tuple(name for name in args.only.split(",") if name)
    unknown = set(only) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHES)}")
    if not torch.cuda.is_available():
        print("cudacnn.kernels.bench: no CUDA GPU here; the kernel benchmarks need one", file=sys.stderr)
        return 2
    rows = run(quick=args.quick, compile=not args.no_compile, only=only)
    if args.json:
        write_text_atomic(args.json, json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                 "cuda": torch.version.cuda, "rows": rows}, indent=1))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
