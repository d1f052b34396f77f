"""The CUDA C++ kernels (kernels/cuda/*.cu): built just in time with torch.utils.cpp_extension on first use,
cached under ~/.cache/cudacnn (or $CUDACNN_CUDA_BUILD_DIR), and their Python launchers.

The GEMM (wgmma on Hopper, mma.sync elsewhere) takes bf16/fp16 with K a multiple of 8 (16-byte cp.async
rows); other inputs go to the Triton GEMM, which handles every case."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

from ._runtime import check_out, write_contiguous
from .activations import activation_code

SOURCE_DIR = Path(__file__).parent / "cuda"
SOURCES = ("bindings.cpp", "gemm.cu", "gemm_wgmma.cu", "activations.cu")
HEADERS = ("kernels.h", "activation_math.cuh", "gemm_kernel.cuh")


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.version.cuda is not None


def build_dir(paths, prefix: str, arch: str = "") -> tuple[Path, str]:
    """(folder, tag) of a build of these source files: a new tag, so a new folder and module name, whenever a
    source, the GPU architecture or PyTorch changes. Under $CUDACNN_CUDA_BUILD_DIR, else ~/.cache/cudacnn."""
    digest = hashlib.sha256(torch.__version__.encode())
    for path in paths:
        digest.update(Path(path).read_bytes())
    tag = f"{prefix}{arch}_{digest.hexdigest()[:12]}"
    root = Path(os.environ.get("CUDACNN_CUDA_BUILD_DIR", Path.home() / ".cache" / "cudacnn" / "cuda_ext"))
    folder = root / tag
    folder.mkdir(parents=True, exist_ok=True)
    return folder, tag


@functools.cache
def extension():
    """Compile (once per source version and GPU architecture) and load the extension."""
    from torch.utils.cpp_extension import load

    if not cuda_available():
        raise RuntimeError("the CUDA C++ kernels need a CUDA GPU and a CUDA build of PyTorch")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise RuntimeError(f"the CUDA C++ GEMM uses bf16 mma.sync, which needs sm_80 or newer (this GPU: sm_{major}{minor})")
    # sm_90 builds as sm_90a so that gemm_wgmma.cu gets Hopper's warpgroup MMA.
    arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    folder, tag = build_dir([SOURCE_DIR / name for name in SOURCES + HEADERS], "sm", arch)
    return load(
        name=f"cudacnn_cuda_{tag}",
        sources=[str(SOURCE_DIR / s) for s in SOURCES],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "--use_fast_math",
                           "-lineinfo"] + (["-DCUDACNN_HAVE_SM90A"] if arch.endswith("a") else []),
        extra_include_paths=[str(SOURCE_DIR)],
        build_directory=str(folder),
        verbose=os.environ.get("CUDACNN_CUDA_VERBOSE") == "1",
    )


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def gemm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether cuda_gemm takes a (M, K) @ b (K, N) without copies: bf16/fp16, K-contiguous rows."""
    return (a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and a.dtype == b.dtype
            and a.stride(1) == 1 and b.stride(0) == 1 and a.shape[1] % 8 == 0
            and a.stride(0) % 8 == 0 and b.stride(1) % 8 == 0
            and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0)


# The two GEMM kernels, numbered as in kernels.h and benchmarks/kernels.md: 5, wgmma, needs sm_90a (0.676x
# cuBLAS bf16 4096^3 on an H200); 0, mma.sync, runs on sm_80+ (0.39-0.50x there, as did the other mma.sync tile
# shapes now in dev/). Each GPU gets the faster one it can run.
WGMMA_VARIANT, MMA_SYNC_VARIANT = 5, 0
GEMM_VARIANTS = (MMA_SYNC_VARIANT, WGMMA_VARIANT)


def default_gemm_variant() -> int:
    return WGMMA_VARIANT if torch.cuda.get_device_capability() == (9, 0) else MMA_SYNC_VARIANT


def cuda_gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none",
              out: torch.Tensor | None = None, variant: int | None = None) -> torch.Tensor:
    """out = act(a @ b + bias) on a tensor-core kernel (wgmma on Hopper, else mma.sync); b (K, N) must be a
    transposed view of a K-contiguous (N, K) matrix, like nn.Linear's weight.t() (see gemm_supported).
    variant: 0 mma.sync, 5 wgmma (sm_90a only); default: this GPU's faster one (tests and the benchmark
    pass both)."""
    variant = default_gemm_variant() if variant is None else variant
    if variant not in GEMM_VARIANTS:
        raise ValueError(f"cuda_gemm variant must be one of {GEMM_VARIANTS} (0 mma.sync, 5 wgmma); got {variant}")
    if not gemm_supported(a, b):
        raise ValueError("cuda_gemm needs bf16/fp16 a (M, K) row-major and b = w.t() with w (N, K) row-major, "
                         "K a multiple of 8; use kernels.gemm for other layouts")
    out = check_out(out, (a.shape[0], b.shape[1]), a.dtype, a.device)
    if not out.is_contiguous():
        raise ValueError("cuda_gemm writes a contiguous out; pass none or a contiguous tensor")
    if bias is not None:  # the kernel reads bias in a's dtype
        bias = bias.to(a.dtype).contiguous()
    extension().gemm_tn(a, b.t(), bias, out, activation_code(activation), _stream(), variant)
    return out


def cuda_activation_forward(x: torch.Tensor, kind: str, out: torch.Tensor | None = None) -> torch.Tensor:
    x = x.contiguous()
    out = check_out(out, x.shape, x.dtype, x.device)
    return write_contiguous(out, lambda y: extension().activation_forward(x, y, activation_code(kind), _stream()))


def cuda_activation_backward(grad_out: torch.Tensor, x: torch.Tensor, kind: str,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    grad_out, x = grad_out.contiguous(), x.contiguous()
    out = check_out(out, x.shape, x.dtype, x.device)
    return write_contiguous(out, lambda dx: extension().activation_backward(grad_out, x, dx, activation_code(kind),
                                                                            _stream()))
