"""Kernel benchmarks: ours (Triton, CUDA C++) against PyTorch eager / cuBLAS / torch.compile, same run.

    PYTHONPATH=src python3 -m cudacnn.kernels.bench [--quick] [--no-compile] [--only STEPS] [--json out.json]

Each benchmark is one step function below (STEPS; --only names them); run() calls them in turn.

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
from dataclasses import dataclass, field
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


def _try(rows, step, setup):
    """One failing benchmark (a build error, say) must not cost the others."""
    try:
        step(setup, rows)
    except Exception as exc:  # noqa: BLE001 - reported as a row
        rows.append({"name": step.__name__, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(f"  {step.__name__} FAILED: {exc}", file=sys.stderr, flush=True)


def _gemm_module():
    """cudacnn.kernels.gemm, the module (the package's attribute `gemm` is the function)."""
    return importlib.import_module("cudacnn.kernels.gemm")


@dataclass
class Setup:
    """What every benchmark step shares: sizes, the datasheet peaks, and the copy bandwidth that
    copy_bandwidth measures first (the activation rows are fractions of it)."""
    peaks: dict
    compile: bool
    n_gemm: int
    n_elem: int
    ce_rows: int
    n_fp32: int = 1024  # the full-precision float32 GEMM's size (cudacnn.engine's matmul)
    dev: str = "cuda"
    copy_gbps: dict = field(default_factory=dict)


def copy_bandwidth(s: Setup, rows: list) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(s.n_elem, device=s.dev).to(dtype)
        y = torch.empty_like(x)
        ms = _time(lambda: y.copy_(x))
        s.copy_gbps[dtype] = gbps = 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
        rows.append({"name": "device copy", "shape": f"{s.n_elem}", "dtype": str(dtype)[6:], "ours_ms": round(ms, 4),
                     "gbps": round(gbps, 1), "roofline_fraction": round(gbps / s.peaks["hbm"], 3)})
        print(f"  device copy {dtype}: {gbps:.0f} GB/s", file=sys.stderr, flush=True)


def _triton_kernels(fn, a, b, tf32=False):
    """(kernel label, ms, output) of the Triton GEMM fn() on the kernel the library picks for a @ b, and at
    tf32 also on the pointer kernel (CUDACNN_GEMM_TMA=0); a TMA kernel that raised is labelled as such."""
    gemm_module = _gemm_module()
    out = torch.empty(a.shape[0], b.shape[1], device=a.device, dtype=a.dtype)
    results = []
    for env in ({}, {"CUDACNN_GEMM_TMA": "0"}) if tf32 else ({},):
        gemm_module._tma_failed = False
        with mock.patch.dict(os.environ, env):
            kernel = gemm_module.kernel_path(a, b, out, None, tf32)
            ms = _time(fn)
            result = fn()
        failed = gemm_module._tma_failed
        gemm_module._tma_failed = False
        results.append((kernel + (" FAILED->pointers" if failed else ""), ms, result))
    return results


def _chosen_config(kernel: str, dtype) -> str:
    """The config the autotuner picked for the last GEMM of this kernel and dtype."""
    name = "_gemm_persistent" if kernel == "persistent" else "_gemm"  # a failed TMA kernel ran the pointer one
    tuner = getattr(_gemm_module(), name + ("_32bit" if dtype == torch.float32 else "_16bit"), None)
    return str(getattr(tuner, "best_config", ""))


def triton_gemm(s: Setup, rows: list) -> None:
    from .gemm import gemm

    n = s.n_gemm
    for dtype, label, tf32 in ((torch.bfloat16, "bf16", False), (torch.float16, "fp16", False),
                               (torch.float32, "tf32", True)):
        a = torch.randn(n, n, device=s.dev, dtype=dtype)
        w = torch.randn(n, n, device=s.dev, dtype=dtype)
        b = w.t()  # nn.Linear layout: y = x @ w^T
        torch.backends.cuda.matmul.allow_tf32 = tf32
        base = _time(lambda: torch.matmul(a, b))
        ref = torch.matmul(a.double(), b.double())
        for kernel, ours, out in _triton_kernels(lambda: gemm(a, b, allow_tf32=tf32), a, b, tf32):
            rows.append(_row(f"triton gemm ({kernel})", f"{n}^3", label, ours, "torch.matmul", base,
                             2 * n ** 3, "tflops", s.peaks[label], _rel_err(out, ref),
                             config=_chosen_config(kernel, dtype)))
    torch.backends.cuda.matmul.allow_tf32 = False
    # Full-precision float32 (no tensor cores; what cudacnn.engine runs) against cuBLAS SGEMM.
    a, b = torch.randn(s.n_fp32, s.n_fp32, device=s.dev), torch.randn(s.n_fp32, s.n_fp32, device=s.dev)
    rows.append(_row("triton gemm fp32 (pointers, ieee)", f"{s.n_fp32}^3", "fp32", _time(lambda: gemm(a, b)),
                     "torch.matmul", _time(lambda: torch.matmul(a, b)), 2 * s.n_fp32 ** 3, "tflops",
                     s.peaks["fp32"], _rel_err(gemm(a, b), a.double() @ b.double()),
                     config=str(getattr(_gemm_module()._gemm_full_fp32, "best_config", ""))))


def fused_linear_gelu(s: Setup, rows: list) -> None:
    from . import cuda_ext
    from .gemm import gemm

    for M, K, N in ((s.n_gemm, s.n_gemm, s.n_gemm), (4 * s.n_gemm, s.n_gemm // 4, s.n_gemm)):
        x = torch.randn(M, K, device=s.dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=s.dev, dtype=torch.bfloat16) / K ** 0.5
        bias = torch.randn(N, device=s.dev, dtype=torch.bfloat16)
        eager = lambda: F.gelu(F.linear(x, w, bias))  # noqa: E731
        base = _time(eager)
        plain = _time(lambda: F.linear(x, w, bias))
        ref = F.gelu(F.linear(x.double(), w.double(), bias.double()))
        flops, shape = 2 * M * N * K, f"{M}x{K}x{N}"
        extra = {"cublas_linear_ms": round(plain, 4)}
        if s.compile:
            extra["compile_ms"] = _compiled_ms(eager)
        for kernel, ours, out in _triton_kernels(lambda: gemm(x, w.t(), bias, "gelu"), x, w.t()):
            rows.append(_row(f"triton gemm+bias+gelu ({kernel})", shape, "bf16", ours, "eager linear+gelu", base,
                             flops, "tflops", s.peaks["bf16"], _rel_err(out, ref),
                             config=_chosen_config(kernel, x.dtype), **extra))
        # The same GEMM without the epilogue math: what bias + GELU cost inside our kernel.
        for kernel, ours, _ in _triton_kernels(lambda: gemm(x, w.t()), x, w.t()):
            rows.append(_row(f"triton gemm, no epilogue ({kernel})", shape, "bf16", ours, "cuBLAS linear", plain,
                             flops, "tflops", s.peaks["bf16"], config=_chosen_config(kernel, x.dtype)))
        if cuda_ext.cuda_available():
            for variant in cuda_ext.GEMM_VARIANTS:
                fn = lambda: cuda_ext.cuda_gemm(x, w.t(), bias, "gelu", variant=variant)  # noqa: E731
                rows.append(_row(f"cuda gemm+bias+gelu (v{variant})", shape, "bf16", _time(fn), "eager linear+gelu",
                                 base, flops, "tflops", s.peaks["bf16"], _rel_err(fn(), ref)))


def activations(s: Setup, rows: list) -> None:
    from . import cuda_ext
    from .activations import activation_backward, activation_forward

    n = s.n_elem
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, device=s.dev).to(dtype)
        g = torch.randn(n, device=s.dev).to(dtype)
        size, copy = x.element_size() * n, s.copy_gbps[dtype]
        for kind in ("relu", "gelu", "gelu_tanh", "silu"):
            ref_fwd = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu,
                       "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[kind]
            base_fwd = _time(lambda: ref_fwd(x))
            impls = [("triton", activation_forward, activation_backward)]
            if cuda_ext.cuda_available():
                impls.append(("cuda", cuda_ext.cuda_activation_forward, cuda_ext.cuda_activation_backward))
            for impl, fwd, bwd in impls:
                ours = _time(lambda: fwd(x, kind))
                rows.append(_row(f"{impl} {kind} fwd", f"{n}", str(dtype)[6:], ours, "eager", base_fwd,
                                 2 * size, "gbps", s.peaks["hbm"], _rel_err(fwd(x, kind), ref_fwd(x.double())),
                                 of_copy=round(2 * size / (ours * 1e-3) / 1e9 / copy, 3)))
                ours = _time(lambda: bwd(g, x, kind))
                rows.append(_row(f"{impl} {kind} bwd", f"{n}", str(dtype)[6:], ours, "device copy",
                                 3 * size / (copy * 1e6), 3 * size, "gbps", s.peaks["hbm"],
                                 of_copy=round(3 * size / (ours * 1e-3) / 1e9 / copy, 3)))


def gelu_launch_sweep(s: Setup, rows: list) -> None:
    """Block size and warps of the Triton exact-GELU forward in bf16, the activation kernel furthest from
    copy bandwidth (activations._launch_config takes its launch shape from this sweep)."""
    import triton

    from . import activations as acts

    n = s.n_elem
    x = torch.randn(n, device=s.dev).to(torch.bfloat16)
    y = torch.empty_like(x)
    size, copy = 2 * x.numel() * x.element_size(), s.copy_gbps[torch.bfloat16]
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8):
            fn = lambda: acts._activation_fwd_kernel[(triton.cdiv(n, block),)](  # noqa: E731
                x, y, n, KIND=acts.activation_code("gelu"), FAST=True, BLOCK=block, num_warps=warps)
            ms = _time(fn)
            rows.append(_row(f"triton gelu fwd BLOCK={block} warps={warps}", f"{n}", "bfloat16", ms,
                             "device copy", size / (copy * 1e6), size, "gbps", s.peaks["hbm"],
                             of_copy=round(size / (ms * 1e-3) / 1e9 / copy, 3)))


def cross_entropy(s: Setup, rows: list) -> None:
    from . import ops
    from .cross_entropy import softmax_cross_entropy

    C = 10
    x = torch.randn(s.ce_rows, C, device=s.dev) * 3
    t = torch.randint(0, C, (s.ce_rows,), device=s.dev)
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
    if s.compile:
        def compiled_step(x_, t_):
            return torch.func.grad(lambda z: F.cross_entropy(z, t_, label_smoothing=0.2))(x_)
        extra["compile_ms"] = _compiled_ms(compiled_step, x, t)
    bytes_moved = x.numel() * 4 * 2 + t.numel() * 8
    rows.append(_row("triton softmax-CE fwd+bwd", f"{s.ce_rows}x{C}", "fp32", ours, "F.cross_entropy fwd+bwd", base,
                     bytes_moved, "gbps", s.peaks["hbm"], err, **extra))


def cuda_gemm(s: Setup, rows: list) -> None:
    """The CUDA C++ GEMMs (v0 mma.sync, v5 wgmma) against cuBLAS; v5 reports an error row below sm_90a."""
    from . import cuda_ext

    if not cuda_ext.cuda_available():
        return
    n = s.n_gemm
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        a = torch.randn(n, n, device=s.dev, dtype=dtype)
        w = torch.randn(n, n, device=s.dev, dtype=dtype)
        base = _time(lambda: torch.matmul(a, w.t()))
        ref = torch.matmul(a.double(), w.t().double())
        for variant in cuda_ext.GEMM_VARIANTS:
            try:
                fn = lambda: cuda_ext.cuda_gemm(a, w.t(), variant=variant)  # noqa: E731
                ours = _time(fn)
                kind = "wgmma" if variant == cuda_ext.WGMMA_VARIANT else "mma.sync"
                rows.append(_row(f"cuda c++ gemm v{variant} ({kind})", f"{n}^3", label, ours, "cuBLAS", base,
                                 2 * n ** 3, "tflops", s.peaks[label], _rel_err(fn(), ref)))
            except Exception as exc:  # noqa: BLE001 - one variant failing must not hide the other
                rows.append({"name": f"cuda c++ gemm v{variant}", "error": f"{type(exc).__name__}: {exc}"[:300]})


# The CLI's suite names are these functions' names; copy_bandwidth always runs first.
STEPS = (copy_bandwidth, cuda_gemm, triton_gemm, fused_linear_gelu, activations, gelu_launch_sweep, cross_entropy)
BENCHES = tuple(step.__name__ for step in STEPS)


def run(quick: bool = False, compile: bool = True, only: tuple[str, ...] = BENCHES) -> list[dict]:
    """The benchmarks named in `only` (copy_bandwidth always runs: the activation rows are ratios to it)."""
    if not torch.cuda.is_available():
        raise RuntimeError("kernel benchmarks need a CUDA GPU")
    torch.manual_seed(0)
    setup = Setup(peaks=_peaks(), compile=compile and not quick, n_gemm=2048 if quick else 4096,
                  n_elem=(1 << 24) if quick else (1 << 26), ce_rows=(1 << 18) if quick else (1 << 20))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cuda {torch.version.cuda}",
          file=sys.stderr, flush=True)
    rows: list[dict] = []
    for step in STEPS:
        if step is copy_bandwidth or step.__name__ in only:
            _try(rows, step, setup)
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
