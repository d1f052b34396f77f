"""Time the mma.sync GEMM's other tile shapes (dev/cuda/gemm_variants.cu) against cuBLAS and the library's own
CUDA C++ GEMMs (v0 mma.sync, v5 wgmma), bf16, C = A @ B^T; each result is checked against float64 first.

    PYTHONPATH=src python3 dev/cuda_gemm_variants.py [--n 4096]

Needs a CUDA GPU (sm_80+) and nvcc. Builds under ~/.cache/cudacnn/dev_gemm_variants (or
$CUDACNN_CUDA_BUILD_DIR/dev_gemm_variants)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

DEV = Path(__file__).resolve().parent
LIBRARY_CUDA = DEV.parent / "src" / "cudacnn" / "kernels" / "cuda"
# The library's mma.sync tile (v0) is 128x256x32, 8 warps, 4 stages.
VARIANTS = {1: "128x256x64, 8 warps, 3 stages",
            2: "128x128x32, 4 warps, 4 stages", 3: "256x128x32, 8 warps, 4 stages", 4: "128x128x64, 4 warps, 3 stages"}


def build():
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    root = Path(os.environ.get("CUDACNN_CUDA_BUILD_DIR", Path.home() / ".cache" / "cudacnn"))
    build_dir = root / "dev_gemm_variants" / f"sm{major}{minor}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name=f"cudacnn_dev_gemm_variants_sm{major}{minor}",
                sources=[str(DEV / "cuda" / "bindings.cpp"), str(DEV / "cuda" / "gemm_variants.cu")],
                extra_cflags=["-O3", "-std=c++17"],
                extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}",
                                   "--use_fast_math", "-lineinfo"],
                extra_include_paths=[str(LIBRARY_CUDA)], build_directory=str(build_dir))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="M = N = K (a multiple of 8)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.n <= 0 or args.n % 8:
        print(f"error: --n must be a positive multiple of 8; got {args.n}", file=sys.stderr)
        return 2
    import triton.testing

    from cudacnn.kernels import cuda_ext

    ext = build()
    n = args.n
    torch.manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16) / n ** 0.5
    ref = a.double() @ w.double().t()
    stream = torch.cuda.current_stream().cuda_stream

    def time_ms(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def rel_err(out):
        return ((out.double() - ref).norm() / ref.norm()).item()

    cublas = time_ms(lambda: a @ w.t())
    runs = []
    for variant, label in VARIANTS.items():
        out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
        runs.append((f"dev v{variant} {label}", lambda out=out, v=variant: ext.gemm_variant(a, w, out, v, stream), out))
    library = [(0, "mma.sync")] + ([(5, "wgmma")] if torch.cuda.get_device_capability() == (9, 0) else [])
    for variant, label in library:
        out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
        runs.append((f"library v{variant} ({label})",
                     lambda out=out, v=variant: cuda_ext.cuda_gemm(a, w.t(), out=out, variant=v), out))

    print(f"{torch.cuda.get_device_name()}, bf16 {n}^3, cuBLAS {cublas:.4f} ms")
    print(f"{'kernel':60s} {'ms':>8s} {'vs cuBLAS':>9s} {'TFLOP/s':>8s} {'rel_err':>8s}")
    for name, fn, out in runs:
        fn()
        err = rel_err(out)
        ms = time_ms(fn)
        print(f"{name:60s} {ms:8.4f} {cublas / ms:9.3f} {2 * n ** 3 / ms / 1e9:8.1f} {err:8.1e}"
              + ("  WRONG" if err > 1.6e-2 else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
