"""GEMM with a fused epilogue: C = act(A @ B + bias), and its backward pass on the same kernel.

A (M, K) and B (K, N) may be any strided views (a transposed weight is just swapped strides), inputs
float32 (exact or tf32), bfloat16 or float16; the accumulator is always float32 and the epilogue (bias,
activation, the optional pre-activation copy kept for backward) runs on it before the one store.
Tiles walk the output in grouped order (GROUP_M row-blocks at a time) so that A and B stay in L2.

Two kernels share that math: a persistent TMA kernel (Hopper: one program per SM, tiles moved by the
tensor-memory accelerator), which every GEMM that use_tma() accepts runs, and a pointer-based one for the
rest (any strides, any GPU). Each is autotuned over a few Hopper-sized configs. Full-precision float32
(TF32 off) always takes the pointer kernel with CUDA-core configs (see kernel_path)."""

from __future__ import annotations

import os
import warnings

import torch

from ._runtime import HAS_TRITON, check_out, interpreting, tl, triton, use_triton
from .activations import _act_fwd, activation_backward, activation_code, reference_forward

BUILT_FOR_INTERPRETER = interpreting()

try:
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAS_TENSOR_DESCRIPTOR = HAS_TRITON
except ImportError:  # older triton: the pointer kernel does everything
    HAS_TENSOR_DESCRIPTOR = False

GEMM_ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")


# ---------------------------------------------------------------- Triton

@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles share each column sweep, so B tiles are reused from L2."""
    pids_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile_id // pids_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % pids_in_group) % group_size_m
    pid_n = (tile_id % pids_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _tma_dot(a_desc, b_desc, off_m, off_n, K, B_IS_NK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
             UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One output tile's fp32 accumulator, A and B tiles moved by TMA (B read as (K, N) or (N, K))."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([off_m, k * BLOCK_K])
        if B_IS_NK:
            b = b_desc.load([off_n, k * BLOCK_K]).T
        else:
            b = b_desc.load([k * BLOCK_K, off_n])
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _tma_store_tile(acc, c_desc, z_desc, off_m, off_n, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
                    FAST: tl.constexpr):
    if STORE_PRE:
        z_desc.store([off_m, off_n], acc.to(z_desc.dtype))
    c_desc.store([off_m, off_n], _act_fwd(acc, ACTIVATION, FAST).to(c_desc.dtype))


@triton.jit
def _tma_epilogue(acc, c_desc, z_desc, bias_ptr, off_m, off_n, N, HAS_BIAS: tl.constexpr,
                  ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr, FAST: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr):
    """Bias, the pre-activation copy (for backward), the activation, and the clipped TMA store.
    EPILOGUE_SPLIT=2 stores the tile as two column halves: half the shared-memory staging buffer, room for
    one more pipeline stage (the autotuner's choice for bias+GELU on an H200, benchmarks/kernels.md)."""
    if HAS_BIAS:
        offs_n = off_n + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE_SPLIT == 2:
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        _tma_store_tile(left, c_desc, z_desc, off_m, off_n, ACTIVATION, STORE_PRE, FAST)
        _tma_store_tile(right, c_desc, z_desc, off_m, off_n + BLOCK_N // 2, ACTIVATION, STORE_PRE, FAST)
    else:
        _tma_store_tile(acc, c_desc, z_desc, off_m, off_n, ACTIVATION, STORE_PRE, FAST)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, z_ptr, M, N, K,
                 stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                 HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrap out-of-range rows/columns onto valid ones: loads need no M/N mask, the store masks them.
    rows = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    cols = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :].to(tl.int64) * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (triton 3.9); bf16 products are exact in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    c_offs = offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if STORE_PRE:
        tl.store(z_ptr + c_offs, acc.to(z_ptr.dtype.element_ty), mask=c_mask)
    acc = _act_fwd(acc, ACTIVATION, FAST)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _gemm_persistent_kernel(a_desc, b_desc, c_desc, z_desc, bias_ptr, M, N, K, B_IS_NK: tl.constexpr,
                            HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
                            INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FAST: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr):
    """The GEMM with tiles moved by the Hopper tensor-memory accelerator (TMA): no address arithmetic,
    out-of-range rows, columns and K read as zeros and stores are clipped by the hardware. B is read either
    as (K, N) or, for a transposed weight, as its (N, K) original (B_IS_NK).

    Persistent: one program per SM walks the output tiles (the launcher sizes the grid; the kernel strides
    by it), and the flattened loop lets the compiler pipeline the next tile's loads under this tile's
    epilogue (bias, activation); on an H200 that ran bf16 4096^3 at 0.968x cuBLAS against 0.858x for one
    program per tile (benchmarks/kernels.md). Warp specialisation of this loop (`warp_specialize=True`)
    does not compile for 16-bit inputs on Hopper with Triton 3.6 and gained nothing for TF32 there."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    programs = tl.num_programs(0)
    # The epilogue's tile: always equal to tile_id, but kept as its own counter (as in Triton's persistent
    # matmul) so the epilogue does not depend on the loop variable the pipeliner advances for the loads.
    tile_c = tl.program_id(0) - programs
    for tile_id in tl.range(tl.program_id(0), num_tiles, programs, flatten=True):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        acc = _tma_dot(a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K, B_IS_NK, INPUT_PRECISION, UPCAST,
                       BLOCK_M, BLOCK_N, BLOCK_K)
        tile_c += programs
        pid_m, pid_n = _tile_coords(tile_c, num_pid_m, num_pid_n, GROUP_M)
        _tma_epilogue(acc, c_desc, z_desc, bias_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, N, HAS_BIAS, ACTIVATION,
                      STORE_PRE, FAST, BLOCK_M, BLOCK_N, EPILOGUE_SPLIT)


def _set_tma_blocks(nargs):
    """Autotune pre-hook: the descriptors' block shapes follow the config being tried."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_IS_NK"] else [bk, bn]
    store_n = bn // nargs.get("EPILOGUE_SPLIT", 1)
    nargs["c_desc"].block_shape = [bm, store_n]
    nargs["z_desc"].block_shape = [bm, store_n]


def _config(bm, bn, bk, stages, warps, group=8, pre_hook=None, split=None):
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}
    if split is not None:  # the TMA kernel only
        meta["EPILOGUE_SPLIT"] = split
    return triton.Config(meta, num_stages=stages, num_warps=warps, pre_hook=pre_hook)


def _configs(*shapes, tma=False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps[, epilogue split]) -> autotune configs; for the TMA kernel
    they also set its descriptors' block shapes."""
    if tma:
        return [_config(*shape[:5], pre_hook=_set_tma_blocks, split=shape[5] if len(shape) > 5 else 1)
                for shape in shapes]
    return [_config(*shape[:5]) for shape in shapes]  # an epilogue split applies to the TMA kernel only


# Hopper: 128x256 / 256x128 tiles run two warpgroups of wgmma; a smaller tile for skinny problems.
_CONFIGS_16BIT = _configs((128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
                          (64, 128, 64, 4, 4))
# float32 tiles take twice the shared memory per element: halve BLOCK_K.
_CONFIGS_32BIT = _configs((128, 256, 32, 3, 8), (256, 128, 32, 3, 8), (128, 256, 32, 4, 8), (128, 128, 32, 4, 8),
                          (64, 128, 32, 4, 4))
# Full-precision float32 (FMA units, no tensor cores): small tiles keep A, B fragments and the accumulator in
# registers.
_CONFIGS_FULL_FP32 = _configs((128, 128, 16, 3, 8), (128, 64, 32, 3, 4), (64, 128, 32, 3, 4), (64, 64, 32, 3, 4),
                              (64, 64, 16, 4, 2))
_AUTOTUNE_KEY = ["M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "ACTIVATION", "HAS_BIAS"]
_gemm_16bit = triton.autotune(configs=_CONFIGS_16BIT, key=_AUTOTUNE_KEY)(_gemm_kernel)
_gemm_32bit = triton.autotune(configs=_CONFIGS_32BIT, key=_AUTOTUNE_KEY)(_gemm_kernel)
_gemm_full_fp32 = triton.autotune(configs=_CONFIGS_FULL_FP32, key=_AUTOTUNE_KEY)(_gemm_kernel)
_TMA_KEY = ["M", "N", "K", "B_IS_NK", "ACTIVATION", "HAS_BIAS", "STORE_PRE"]
# A split epilogue frees 32 KB of shared memory: 128x256 tiles then fit a fourth stage (16-bit), and 128x256x32
# TF32 tiles fit at all (the autotuner's TF32 choice on an H200). Configs with two programs per SM (one
# warpgroup each, so one's epilogue could overlap the other's loop) were never chosen there, so none is listed.
_gemm_persistent_16bit = triton.autotune(
    configs=_configs((128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (256, 128, 64, 3, 8),
                     (128, 256, 64, 3, 8, 2), (128, 256, 64, 4, 8, 2), (256, 128, 64, 3, 8, 2), tma=True),
    key=_TMA_KEY)(_gemm_persistent_kernel)
_gemm_persistent_32bit = triton.autotune(
    configs=_configs((128, 256, 32, 3, 8), (128, 128, 32, 4, 8), (128, 128, 64, 3, 8),
                     (128, 256, 32, 3, 8, 2), (256, 128, 32, 3, 8, 2), (128, 128, 32, 5, 8, 2), tma=True),
    key=_TMA_KEY)(_gemm_persistent_kernel)


def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


_tma_failed = False


def _tma_layout_ok(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def _b_is_nk(b: torch.Tensor) -> bool:
    """b (K, N) is the transposed view of a row-major (N, K) matrix (an nn.Linear weight)."""
    return b.stride(1) != 1


def use_tma(a, b, c, z) -> bool:
    """TMA needs sm_90+, 16-byte aligned rows and one unit-stride dimension per operand.
    CUDACNN_GEMM_TMA=0 turns it off (the pointer kernel then runs everything, e.g. to time it on Hopper);
    =1 turns it on under the interpreter, which has no GPU to ask, so that the CPU tests run the TMA kernel."""
    flag = os.environ.get("CUDACNN_GEMM_TMA", "")
    if flag == "0" or not HAS_TENSOR_DESCRIPTOR or _tma_failed:
        return False
    if a.is_cuda:
        if torch.cuda.get_device_capability(a.device)[0] < 9:
            return False
    elif flag != "1":
        return False
    b_rows = b.t() if _b_is_nk(b) else b
    return all(_tma_layout_ok(t) for t in (a, b_rows, c) + ((z,) if z is not None else ()))


def _autotuning() -> bool:
    """Autotune on a GPU unless CUDACNN_GEMM_AUTOTUNE=0 (quick test runs); never under the interpreter,
    which would run every config through numpy."""
    return not interpreting() and os.environ.get("CUDACNN_GEMM_AUTOTUNE", "1") != "0"


# Epilogue split of the TMA kernel when not autotuning (under the interpreter, or CUDACNN_GEMM_AUTOTUNE=0). The
# autotuner picks both 1 and 2 on Hopper; the CPU tests set 2 here, as the only way to reach the split path
# under the interpreter.
FIXED_EPILOGUE_SPLIT = 1


def _fixed_config(dtype, full_fp32=False) -> tuple[dict, dict]:
    """(block sizes, launch options) used when not autotuning."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2), {}
    if full_fp32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8), dict(num_stages=3, num_warps=4)
    bk = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8), dict(num_stages=3, num_warps=8)


def _launch_tma(a, b, c, bias, z, meta):
    M, K = a.shape
    N = b.shape[1]
    b_is_nk = _b_is_nk(b)
    b_rows = b.t() if b_is_nk else b
    placeholder = [16, 16]  # replaced by the config's block shape (pre-hook)
    descs = [TensorDescriptor.from_tensor(t, placeholder) for t in (a, b_rows, c, z if z is not None else c)]
    args = (*descs, bias if bias is not None else c, M, N, K)
    meta = dict(meta, B_IS_NK=b_is_nk)
    sms = _num_sms(a.device)

    def grid(m):  # one program per SM, or per tile where there are fewer tiles
        return (min(sms, triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"])),)

    if not _autotuning():
        blocks, options = _fixed_config(a.dtype)
        blocks["EPILOGUE_SPLIT"] = FIXED_EPILOGUE_SPLIT
        _set_tma_blocks({"a_desc": descs[0], "b_desc": descs[1], "c_desc": descs[2], "z_desc": descs[3],
                         "B_IS_NK": b_is_nk, **blocks})
        _gemm_persistent_kernel[grid(blocks)](*args, **meta, **blocks, **options)
        return
    kernel = _gemm_persistent_32bit if a.dtype == torch.float32 else _gemm_persistent_16bit
    kernel[grid](*args, **meta)


def kernel_path(a, b, c, z, allow_tf32) -> str:
    """Which kernel a GEMM runs: "persistent" (TMA) or "pointers". Full-precision float32 always takes the
    pointer kernel with its CUDA-core configs: an ieee tl.dot runs on FMA units, where the TMA kernel's large
    tensor-core tiles spill registers (the engine's 1024^2 matmul ran 2.7x slower than cuBLAS there)."""
    if a.dtype == torch.float32 and not allow_tf32:
        return "pointers"
    return "persistent" if use_tma(a, b, c, z) else "pointers"


def _launch(a, b, c, bias, z, activation, allow_tf32):
    M, K = a.shape
    N = b.shape[1]
    args = (a, b, c, bias if bias is not None else c, z if z is not None else c, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    full_fp32 = a.dtype == torch.float32 and not allow_tf32
    meta = dict(HAS_BIAS=bias is not None, ACTIVATION=activation_code(activation), STORE_PRE=z is not None,
                INPUT_PRECISION="tf32" if (allow_tf32 and a.dtype == torch.float32) else "ieee",
                UPCAST=interpreting() and a.dtype == torch.bfloat16, FAST=c.dtype != torch.float32)
    if kernel_path(a, b, c, z, allow_tf32) != "pointers":
        try:
            _launch_tma(a, b, c, bias, z, meta)
            return
        except Exception as exc:  # an older triton without this TMA API: use the pointer kernel from now on
            global _tma_failed
            _tma_failed = True
            warnings.warn(f"cudacnn: the TMA GEMM failed ({type(exc).__name__}: {exc}); using the pointer-based "
                          "kernel", RuntimeWarning, stacklevel=3)
    if not _autotuning():
        blocks, options = _fixed_config(a.dtype, full_fp32)
        grid = (triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(N, blocks["BLOCK_N"]),)
        _gemm_kernel[grid](*args, **meta, **blocks, **options)
        return
    kernel = _gemm_full_fp32 if full_fp32 else _gemm_32bit if a.dtype == torch.float32 else _gemm_16bit
    grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)  # noqa: E731
    kernel[grid](*args, **meta)


def _check(a, b, bias, activation):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm needs a (M, K) and b (K, N); got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"a is {a.dtype} but b is {b.dtype}")
    if bias is not None and (bias.shape != (b.shape[1],)):
        raise ValueError(f"bias must have shape ({b.shape[1]},); got {tuple(bias.shape)}")
    if activation not in GEMM_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {GEMM_ACTIVATIONS}")


def gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none",
         out: torch.Tensor | None = None, allow_tf32: bool = False,
         pre_activation_out: torch.Tensor | None = None) -> torch.Tensor:
    """out = act(a @ b + bias). a (M, K), b (K, N), any strides; bias (N,). Writes into `out` (M, N) when
    given; `pre_activation_out` (M, N) also receives a @ b + bias (what the backward pass needs for gelu)."""
    _check(a, b, bias, activation)
    M, N = a.shape[0], b.shape[1]
    out = check_out(out, (M, N), a.dtype, a.device)
    if pre_activation_out is not None:
        check_out(pre_activation_out, (M, N), a.dtype, a.device)
    if M == 0 or N == 0:
        return out
    if not use_triton(a) or a.dtype == torch.float64 or a.shape[1] == 0:
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        z = a.to(acc) @ b.to(acc) + (bias.to(acc) if bias is not None else 0)
        if pre_activation_out is not None:
            pre_activation_out.copy_(z)
        return out.copy_(reference_forward(z, activation))
    _launch(a, b, out, bias, pre_activation_out, activation, allow_tf32)
    return out


# ---------------------------------------------------------------- backward

@triton.jit
def _column_sum_kernel(x_ptr, out_ptr, M, N, stride_m, stride_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n] = sum over m of x[m, n], float32 accumulation (the bias gradient)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_m + offs_n[None, :] * stride_n, mask=mask,
                    other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def column_sum(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    M, N = x.shape
    out = check_out(out, (N,), x.dtype, x.device)
    if not use_triton(x) or x.dtype == torch.float64:
        return out.copy_(x.sum(0, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))
    block_m, block_n = (16, 16) if interpreting() else (64, 64)
    _column_sum_kernel[(triton.cdiv(N, block_n),)](x, out, M, N, x.stride(0), x.stride(1),
                                                    BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def gemm_backward(grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, saved: torch.Tensor | None,
                  activation: str = "none", has_bias: bool = False, allow_tf32: bool = False,
                  needs_a: bool = True, needs_b: bool = True):
    """Gradients of out = act(a @ b + bias): returns (grad_a, grad_b, grad_bias), None where not needed.
    `saved` is the pre-activation a @ b + bias (for relu the forward output works too); unused for 'none'."""
    if activation == "none":
        grad_z = grad_out
    else:
        grad_z = activation_backward(grad_out, saved, activation)
    grad_a = gemm(grad_z, b.t(), allow_tf32=allow_tf32) if needs_a else None
    # computed as (grad_z^T a)^T: a (K, N) view of a row-major (N, K) result, which is what an nn.Linear weight's
    # gradient needs, so the caller's .t().contiguous() copies nothing
    grad_b = gemm(grad_z.t(), a, allow_tf32=allow_tf32).t() if needs_b else None
    grad_bias = column_sum(grad_z) if has_bias else None
    return grad_a, grad_b, grad_bias
