"""Fused 2x2 max-pool, then BatchNorm, then an activation, forward and backward:
    y = act((p - mean) * rstd * weight + bias),   p = maxpool2x2(x)
with the batch statistics of p in training (and the running-stat update F.batch_norm does: momentum,
unbiased variance into running_var) or the running statistics in eval. The pool comes FIRST, as in the fast
nets' conv groups (conv -> pool -> BN -> act); batchnorm.py's op pools after the activation instead.

Why it exists: compiled by Inductor, the backward of fast94's `max_pool2d -> batch_norm -> gelu` is one
pointwise kernel that writes the conv output's gradient (1229x64x31x31 fp16 in the first group) at about a
quarter of an H100's bandwidth, 0.31 ms and 0.20 ms a step in the first two groups. Here the gradient is
written by programs that own BLOCK_P pooled positions x BLOCK_C channels (channels the contiguous axis of
channels_last) and store all four elements of each window, the gradient at the argmax and zeros elsewhere,
so every store fills whole memory sectors.

x is any 4-D (N, C, H, W) layout (strides are arguments); channels_last is the fast one. An odd H or W drops
the last row or column, as F.max_pool2d does (its gradient is zero). Math is float32 whatever the storage
dtype. Passes (M = N * floor(H/2) * floor(W/2) pooled positions a channel):

Forward, two launches.
  _pool_stats_kernel reads x once; writes p (x's dtype), the argmax code (int8: 0..3 = which element of the
    2x2 window in row-major order; the first maximum wins ties, a NaN wins, as max_pool2d) and, in training,
    per-program (mean, M2) partials of p from per-lane sums shifted by an x of the program's first window
    (batchnorm._add_shifted: no E[p^2] - mean^2 cancellation, which a conv output with a large mean would
    suffer in float32); the last program of a channel block (an atomic counter) merges the partials with
    Chan's formula, writes mean and rstd and updates the running statistics (batchnorm._store_stats, shared
    with the plain BatchNorm kernels).
  _apply_kernel reads p, writes y.
  Saved for backward: p, code, mean, rstd (neither x nor y).
Backward, two launches (one in eval without affine gradients).
  _reduce_kernel reads p and dy; writes per-program partial sums of g and g * phat per channel, g = dy *
    act'(z), z = phat * weight + bias recomputed from p; its last program sums them (batchnorm._store_sums)
    into d bias = sum g and d weight = sum g * phat.
  _dx_kernel reads p, dy, code and the sums; writes dx at full resolution: at the argmax slot
    dp = rstd * weight * (g - sum(g) / M - phat * sum(g * phat) / M)  (rstd * weight * g in eval),
    zeros in the window's other slots and in a row or column that an odd size leaves out.
The counters start at zero and the last program sets its counter back to zero; each call allocates them
zeroed (a traced call's graph owns them, and a CUDA graph replays their fill)."""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from . import activations as _act
from . import batchnorm as _bn
from ._runtime import interpreting, tl, triton
from .activations import _act_fwd, _act_grad, activation_code
from .batchnorm import _add_shifted, _shifted_moments, _store_stats, _store_sums

BUILT_FOR_INTERPRETER = interpreting()


def pooled_shape(x_shape) -> tuple[int, int, int, int]:
    n, c, h, w = x_shape
    return n, c, h // 2, w // 2


def pooled_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """p, the code or y: pooled, in x's memory format. Shared by the kernels and the fake implementations."""
    return _bn.output_like(x, pool=True, dtype=dtype)


def grad_input_like(shape, channels_last: bool, dtype: torch.dtype, device) -> torch.Tensor:
    """dx: x's shape, channels_last when x was (else contiguous)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=fmt)


def check_inputs(x, weight, bias, activation: str, training: bool) -> None:
    activation_code(activation)
    if x.dim() != 4:
        raise ValueError(f"pool_bn_act takes a 4-D (N, C, H, W) tensor; got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if h < 2 or w < 2:
        raise ValueError(f"pool_bn_act pools 2x2 windows: H and W must be >= 2; got input {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({c},) for {c} channels")
    if training and n * (h // 2) * (w // 2) <= 1:
        raise ValueError(f"batch statistics need more than 1 pooled value per channel; got input {tuple(x.shape)}")


# ---------------------------------------------------------------- reference (plain PyTorch)

def reference(x, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float,
              activation: str) -> torch.Tensor:
    """act(F.batch_norm(F.max_pool2d(x, 2), ...)): the block the op replaces, in x's dtype (F.batch_norm
    runs in float32 for 16-bit x, as cuDNN's does with float32 parameters)."""
    p = F.max_pool2d(x, 2)
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = F.batch_norm(p.to(cd), running_mean, running_var, weight, bias, training, momentum, eps)
    return _act.reference_forward(z, activation).to(x.dtype)


def reference_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, code) from F.max_pool2d's indices (flat h * W + w): code = 2 * (h odd) + (w odd)."""
    p, index = F.max_pool2d(x, 2, return_indices=True)
    w = x.shape[-1]
    code = 2 * ((index // w) % 2) + (index % w) % 2
    return p, code.to(torch.int8)


def reference_backward(grad_y, p, code, weight, bias, mean, rstd, x_shape, channels_last: bool, training: bool,
                       activation: str):
    """(dx, dweight, dbias): BatchNorm's backward on p (batchnorm.reference_backward), placed at the argmax."""
    dp, dw, db, _ = _bn.reference_backward(grad_y, p, weight, bias, None, mean, rstd, training, True, activation,
                                           False)
    n, c, h, w = x_shape
    oh, ow = h // 2, w // 2
    slot = torch.arange(4, device=p.device).view(1, 1, 1, 1, 4)
    windows = torch.where(code.long().unsqueeze(-1) == slot, dp.unsqueeze(-1), 0.0)  # (N, C, OH, OW, 4)
    full = windows.view(n, c, oh, ow, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * oh, 2 * ow)
    dx = grad_input_like(x_shape, channels_last, p.dtype, p.device).zero_()
    dx[:, :, :2 * oh, :2 * ow] = full
    return dx, dw, db


# ---------------------------------------------------------------- Triton

@triton.jit
def _pooled_offsets(m, OH, OW, sN, sH, sW, STEP: tl.constexpr):
    """(n, oh, ow) of pooled flat position m = (n * OH + oh) * OW + ow, and the memory offset (int64) of
    element (STEP * oh, STEP * ow) of a tensor with strides sN, sH, sW: STEP 2 is a window's first element
    in x, STEP 1 the pooled element itself."""
    n = m // (OH * OW)
    hw = m - n * (OH * OW)
    oh = hw // OW
    ow = hw - oh * OW
    off = n.to(tl.int64) * sN + (STEP * oh).to(tl.int64) * sH + (STEP * ow).to(tl.int64) * sW
    return oh, ow, off


@triton.jit
def _params(mean_ptr, rstd_ptr, w_ptr, b_ptr, c, c_ok, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
            BLOCK_C: tl.constexpr):
    """(mean, rstd * weight, bias, rstd) per channel, float32."""
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
    rstd = tl.load(rstd_ptr + c, mask=c_ok, other=0.0)
    scale = rstd
    if HAS_W:
        scale = rstd * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_B:
        bias = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    return mean, scale, bias, rstd


@triton.jit
def _later_max(best, code, v, k: tl.constexpr):
    """The window's running maximum and its code after element k (value v): v takes over only when greater
    (the first maximum wins ties) or NaN."""
    v = v.to(tl.float32)
    take = (v > best) | (v != v)
    return tl.where(take, v, best), tl.where(take, k, code)


@triton.jit
def _pool_stats_kernel(x_ptr, p_ptr, code_ptr, partial_ptr, counter_ptr, mean_ptr, rstd_ptr, rm_ptr, rv_ptr,
                       M, C, OH, OW, sxN, sxC, sxH, sxW, spN, spC, spH, spW, rows_per_prog, momentum, eps,
                       STATS: tl.constexpr, UPDATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_F: tl.constexpr):
    """Program (i, j): pooled positions [i * rows_per_prog, ...) of channel block j. p and code share strides
    sp*. With STATS, (mean, M2) partials go to partial (programs, 2, C) and the last program merges them."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    cx = c.to(tl.int64)[None, :] * sxC
    cp = c.to(tl.int64)[None, :] * spC
    start = pid_m * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    if STATS:  # shifted per-lane sums (batchnorm._add_shifted), by the first window element of the first row
        # (named: `_` is assigned a tile of another shape in the loop below, which Triton rejects)
        first_h, first_w, first = _pooled_offsets(start + tl.arange(0, 1), OH, OW, sxN, sxH, sxW, 2)
        shift = tl.sum(tl.load(x_ptr + first[:, None] + cx, mask=c_ok[None, :], other=0.0).to(tl.float32), axis=0)
    s1 = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    s2 = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for m0 in range(start, end, BLOCK_P):
        m = m0 + tl.arange(0, BLOCK_P)
        mask = (m < end)[:, None] & c_ok[None, :]
        _, _, x_row = _pooled_offsets(m, OH, OW, sxN, sxH, sxW, 2)
        _, _, p_row = _pooled_offsets(m, OH, OW, spN, spH, spW, 1)
        x_off = x_row[:, None] + cx
        # row-major window order; a later element wins only when greater (first maximum) or NaN (max_pool2d).
        # Compared in float32 (exact for every storage dtype; the interpreter compares bfloat16's raw bits)
        best = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        code = tl.zeros((BLOCK_P, BLOCK_C), tl.int32)
        best, code = _later_max(best, code, tl.load(x_ptr + x_off + sxW, mask=mask, other=0.0), 1)
        best, code = _later_max(best, code, tl.load(x_ptr + x_off + sxH, mask=mask, other=0.0), 2)
        best, code = _later_max(best, code, tl.load(x_ptr + x_off + sxH + sxW, mask=mask, other=0.0), 3)
        p_off = p_row[:, None] + cp
        tl.store(p_ptr + p_off, best.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(code_ptr + p_off, code.to(tl.int8), mask=mask)
        if STATS:
            s1, s2 = _add_shifted(s1, s2, best, shift, mask)
    if STATS:
        mean, m2 = _shifted_moments(s1, s2, shift, end - start)
        _store_stats(partial_ptr, counter_ptr, mean_ptr, rstd_ptr, rm_ptr, rv_ptr, pid_m, pid_c, mean, m2, c, c_ok,
                     M, C, rows_per_prog, momentum, eps, UPDATE, BLOCK_C, BLOCK_F)


@triton.jit
def _apply_kernel(p_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, M, C, OH, OW, spN, spC, spH, spW,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, KIND: tl.constexpr, FAST: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = act((p - mean) * rstd * w + b); y shares p's strides. One tile a program."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    m = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (m < M)[:, None] & c_ok[None, :]
    mean, scale, bias, _ = _params(mean_ptr, rstd_ptr, w_ptr, b_ptr, c, c_ok, HAS_W, HAS_B, BLOCK_C)
    _, _, row = _pooled_offsets(m, OH, OW, spN, spH, spW, 1)
    off = row[:, None] + c.to(tl.int64)[None, :] * spC
    p = tl.load(p_ptr + off, mask=mask, other=0.0).to(tl.float32)
    z = (p - mean[None, :]) * scale[None, :] + bias[None, :]
    tl.store(y_ptr + off, _act_fwd(z, KIND, FAST).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_z(dy_ptr, p_ptr, d_off, p_off, mask, mean, scale, bias, rstd, KIND: tl.constexpr, FAST: tl.constexpr):
    """(g, phat): g = dy * act'(z) at the activation's input z = phat * w + b, recomputed from p. The one
    place both backward passes compute them."""
    dy = tl.load(dy_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
    centered = p - mean[None, :]
    phat = centered * rstd[None, :]
    z = centered * scale[None, :] + bias[None, :]
    return dy * _act_grad(z, KIND, FAST), phat


@triton.jit
def _reduce_kernel(dy_ptr, p_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sums_ptr, counter_ptr, dw_ptr, db_ptr,
                   M, C, OH, OW, spN, spC, spH, spW, sdN, sdC, sdH, sdW, rows_per_prog,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
                   KIND: tl.constexpr, FAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_F: tl.constexpr):
    """sums (1 + programs, 2, C) float32: program i's partial (sum g, sum g * phat) at row 1 + i, the totals
    at row 0 (the last program of a channel block), also as d bias / d weight (HAS_DB, HAS_DW)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean, scale, bias, rstd = _params(mean_ptr, rstd_ptr, w_ptr, b_ptr, c, c_ok, HAS_W, HAS_B, BLOCK_C)
    cp = c.to(tl.int64)[None, :] * spC
    cd = c.to(tl.int64)[None, :] * sdC
    start = pid_m * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    # per-lane sums, reduced across rows once at the end (one cross-warp reduction a program, not one a tile)
    acc_g = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    acc_gp = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for m0 in range(start, end, BLOCK_P):
        m = m0 + tl.arange(0, BLOCK_P)
        mask = (m < end)[:, None] & c_ok[None, :]
        _, _, p_row = _pooled_offsets(m, OH, OW, spN, spH, spW, 1)
        _, _, d_row = _pooled_offsets(m, OH, OW, sdN, sdH, sdW, 1)
        g, phat = _grad_z(dy_ptr, p_ptr, d_row[:, None] + cd, p_row[:, None] + cp, mask, mean, scale, bias, rstd,
                          KIND, FAST)
        acc_g += g  # masked lanes have dy = 0, so g = 0
        acc_gp += g * phat
    _store_sums(sums_ptr, counter_ptr, dw_ptr, db_ptr, pid_m, pid_c, tl.sum(acc_g, axis=0), tl.sum(acc_gp, axis=0), c,
                c_ok, C, HAS_DW, HAS_DB, BLOCK_C, BLOCK_F)


@triton.jit
def _dx_kernel(dy_ptr, p_ptr, code_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sums_ptr, dx_ptr, Q, C, M, OH, OW,
               QH, QW, H, W, spN, spC, spH, spW, sdN, sdC, sdH, sdW, sxN, sxC, sxH, sxW,
               TRAINING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, KIND: tl.constexpr,
               FAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One tile of the ceil(H/2) x ceil(W/2) windows (Q = N * QH * QW) a program, so that every element of dx
    is written once: the OH x OW real windows get dp at their argmax, a window cut by an odd H or W zeros.
    The four stores of a window row are BLOCK_C channels wide each (whole sectors in channels_last)."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean, scale, bias, rstd = _params(mean_ptr, rstd_ptr, w_ptr, b_ptr, c, c_ok, HAS_W, HAS_B, BLOCK_C)
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok = q < Q
    qh, qw, x_row = _pooled_offsets(q, QH, QW, sxN, sxH, sxW, 2)
    n = q // (QH * QW)
    real = q_ok & (qh < OH) & (qw < OW)
    # the pooled tensors' offsets of window (n, qh, qw), where it is a real one
    p_row = n.to(tl.int64) * spN + qh.to(tl.int64) * spH + qw.to(tl.int64) * spW
    d_row = n.to(tl.int64) * sdN + qh.to(tl.int64) * sdH + qw.to(tl.int64) * sdW
    c64 = c.to(tl.int64)[None, :]
    load_mask = real[:, None] & c_ok[None, :]
    g, phat = _grad_z(dy_ptr, p_ptr, d_row[:, None] + c64 * sdC, p_row[:, None] + c64 * spC, load_mask, mean, scale,
                      bias, rstd, KIND, FAST)
    if TRAINING:
        mean_g = tl.load(sums_ptr + c, mask=c_ok, other=0.0) / M
        mean_gp = tl.load(sums_ptr + C + c, mask=c_ok, other=0.0) / M
        g = g - mean_g[None, :] - phat * mean_gp[None, :]
    dp = (g * scale[None, :]).to(dx_ptr.dtype.element_ty)
    code = tl.load(code_ptr + p_row[:, None] + c64 * spC, mask=load_mask, other=-1).to(tl.int32)
    zero = tl.zeros((BLOCK_P, BLOCK_C), dx_ptr.dtype.element_ty)
    x_off = x_row[:, None] + c64 * sxC
    row_ok = q_ok[:, None] & c_ok[None, :]
    right = (2 * qw + 1 < W)[:, None]
    below = (2 * qh + 1 < H)[:, None]
    tl.store(dx_ptr + x_off, tl.where(code == 0, dp, zero), mask=row_ok)
    tl.store(dx_ptr + x_off + sxW, tl.where(code == 1, dp, zero), mask=row_ok & right)
    tl.store(dx_ptr + x_off + sxH, tl.where(code == 2, dp, zero), mask=row_ok & below)
    tl.store(dx_ptr + x_off + sxH + sxW, tl.where(code == 3, dp, zero), mask=row_ok & below & right)


# ---------------------------------------------------------------- tiles, autotuning, launches

def _cfg(block_p: int, block_c: int, warps: int):
    return triton.Config({"BLOCK_P": block_p, "BLOCK_C": block_c}, num_warps=warps)


# The two one-tile-a-program kernels are autotuned per (C, size, layout) on a GPU. Each pooled element is
# 4 bytes of traffic in _apply_kernel (p in, y out, 16-bit) and 13 in _dx_kernel (p, dy, code in; four
# dx out): 2K-8K-element tiles, 32 to 128 channels wide (64-256 bytes a row in 16 bits: whole sectors), 4 or 8
# warps. Not yet measured: dev/pool_bn_act_bench.py prints the autotuner's choice per shape.
APPLY_CONFIGS = [_cfg(64, 64, 4), _cfg(128, 64, 8), _cfg(32, 128, 4), _cfg(64, 128, 8)]
DX_CONFIGS = [_cfg(32, 64, 4), _cfg(64, 64, 8), _cfg(128, 32, 8), _cfg(16, 128, 4), _cfg(32, 128, 8)]
# The reductions' tiles are fixed (an autotuner would rerun the running-stat update and the counters):
# BLOCK_P x BLOCK_C elements, 8 warps; the forward loads the four window elements of its tile at once.
_REDUCE_TILE = {"forward": 2048, "backward": 4096}


def _prune_wide(configs, named_args, **kwargs):
    """Drop configs with BLOCK_C beyond the channels (rounded up to a power of 2, at least 32)."""
    c = {**named_args, **kwargs}["C"]
    kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_C"] <= max(32, _bn._pow2(c))]
    return kept or configs[:1]


def _quick_bench(kernel_call, quantiles):
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


_PRUNE = {"early_config_prune": _prune_wide}
_apply_tuned = triton.autotune(APPLY_CONFIGS, key=["M", "C", "spC"], prune_configs_by=_PRUNE,
                               do_bench=_quick_bench)(_apply_kernel)
_dx_tuned = triton.autotune(DX_CONFIGS, key=["Q", "C", "spC", "sdC", "sxC"], prune_configs_by=_PRUNE,
                            do_bench=_quick_bench)(_dx_kernel)


def autotuning() -> bool:
    """Autotune on a GPU unless CUDACNN_POOL_AUTOTUNE=0; never under the interpreter (every config would run
    through numpy)."""
    return not interpreting() and os.environ.get("CUDACNN_POOL_AUTOTUNE", "1") != "0"


def _fixed_tile(C: int, interpreted: bool) -> dict:
    """The one-tile kernels' tile when not autotuning. The interpreter: small tiles (C = 20 spans two channel
    blocks, a few dozen positions make several programs), so the tests exercise the masks and the merges."""
    if interpreted:
        return dict(BLOCK_P=8, BLOCK_C=16)
    return dict(BLOCK_P=64, BLOCK_C=min(max(_bn._pow2(C), 32), 64), num_warps=8)


def _reduce_tile(C: int, kind: str, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of a reduction kernel."""
    if interpreted:
        return 8, 16, 4
    block_c = min(_bn._pow2(C), 64)
    return _REDUCE_TILE[kind] // block_c, block_c, 8


def _one_tile_launch(tuned, kernel, grid, wrap, C: int, interpreted: bool):
    """The autotuned kernel on a GPU (grid a function of its config), else the plain one at the fixed tile."""
    if autotuning() and not interpreted:
        return _bn._launch(tuned, grid, wrap)
    fixed = _fixed_tile(C, interpreted)
    launch = _bn._launch(kernel, grid(fixed), wrap)
    return lambda *args, **meta: launch(*args, **meta, **fixed)


@_bn.shape_cache
def _reduction_config(N: int, C: int, OH: int, OW: int, device: torch.device, kind: str):
    """(grid, rows a program, meta) of a reduction kernel over the N * OH * OW pooled positions."""
    interpreted = device.type != "cuda"
    block_p, block_c, warps = _reduce_tile(C, kind, interpreted)
    c_blocks = _bn._cdiv(C, block_c)
    rows, programs = _bn._reduction_split(N * OH * OW, block_p, c_blocks, device, _bn.POOLED_WAVES)
    meta = dict(BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_F=_bn._merge_rows(block_c, interpreted), num_warps=warps)
    return (programs, c_blocks), rows, meta


def _grid(units: int, C: int):
    return lambda meta: (_bn._cdiv(units, meta["BLOCK_P"]), _bn._cdiv(C, meta["BLOCK_C"]))


def _interpreted(x: torch.Tensor) -> bool:
    return x.device.type != "cuda"


def pool_forward(x: torch.Tensor, running_mean, running_var, training: bool, momentum: float, eps: float,
                 wrap=None):
    """(p, code, mean, rstd): the pooled x, its argmax code (int8), and the batch statistics of p (training;
    the running statistics updated in place when given) or those from the running statistics (eval; fresh
    tensors, never the buffers themselves). x passed check_inputs. One launch."""
    if not _bn._triton_ok(x):
        p, code = reference_pool(x)
        if training:
            mean, rstd = _bn.reference_statistics(p, running_mean, running_var, momentum, eps)
        else:
            mean, rstd = running_statistics(running_mean, running_var, eps, x.dtype)
        return p, code, mean, rstd
    N, C, H, W = x.shape
    OH, OW = H // 2, W // 2
    update = training and running_mean is not None
    grid, rows, meta = _reduction_config(N, C, OH, OW, x.device, "forward")
    p = pooled_like(x)
    code = pooled_like(x, torch.int8)
    if training:
        partial = torch.empty((grid[0], 2, C), dtype=torch.float32, device=x.device)
        mean = torch.empty(C, dtype=torch.float32, device=x.device)
        rstd = torch.empty(C, dtype=torch.float32, device=x.device)
        counters = torch.zeros(grid[1], dtype=torch.int32, device=x.device)
    else:
        partial = counters = x
        mean, rstd = running_statistics(running_mean, running_var, eps, x.dtype)
    _bn._launch(_pool_stats_kernel, grid, wrap)(
        x, p, code, partial, counters, mean, rstd, running_mean if update else x, running_var if update else x,
        N * OH * OW, C, OH, OW, *x.stride(), *p.stride(), rows, float(momentum), float(eps), STATS=training,
        UPDATE=update, **meta)
    return p, code, mean, rstd


def running_statistics(running_mean, running_var, eps: float, dtype: torch.dtype):
    """Eval mode's (mean, rstd), copies (an op's outputs may not alias its inputs)."""
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    return running_mean.to(cd, copy=True), torch.rsqrt(running_var.to(cd) + eps)


def apply(p, weight, bias, mean, rstd, activation: str, wrap=None) -> torch.Tensor:
    """y = act((p - mean) * rstd * weight + bias) in p's dtype and layout."""
    if not _bn._triton_ok(p) or p.numel() == 0:
        return _bn._apply_reference(p, weight, bias, None, mean, rstd, activation, False, True, p.dtype)
    N, C, OH, OW = p.shape
    y = torch.empty_like(p)
    interpreted = _interpreted(p)
    _one_tile_launch(_apply_tuned, _apply_kernel, _grid(N * OH * OW, C), wrap, C, interpreted)(
        p, y, mean, rstd, weight if weight is not None else p, bias if bias is not None else p, N * OH * OW, C, OH,
        OW, *p.stride(), HAS_W=weight is not None, HAS_B=bias is not None, KIND=activation_code(activation),
        FAST=_bn._fast(p.dtype))
    return y


def backward(grad_y, p, code, weight, bias, mean, rstd, x_shape, channels_last: bool, training: bool,
             activation: str, needs_affine: bool = True, wrap=None):
    """(dx, dweight, dbias); dweight/dbias None without needs_affine or without that parameter. mean/rstd are
    the forward's. Two launches with batch statistics or affine gradients, else one."""
    x_shape = tuple(x_shape)
    if tuple(grad_y.shape) != tuple(p.shape):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}; the pooled output has {tuple(p.shape)}")
    grad_y = grad_y.to(p.dtype)
    if not _bn._triton_ok(p) or p.numel() == 0:
        dx, dw, db = reference_backward(grad_y, p, code, weight, bias, mean, rstd, x_shape, channels_last, training,
                                        activation)
        return dx, dw if needs_affine else None, db if needs_affine else None
    N, C, OH, OW = p.shape
    H, W = x_shape[2], x_shape[3]
    interpreted = _interpreted(p)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, KIND=activation_code(activation),
                 FAST=_bn._fast(p.dtype))
    # d weight / d bias straight from the kernel when float32 (BatchNorm's usual parameters); other dtypes are
    # rounded by PyTorch afterwards (the interpreter's bfloat16 conversion truncates)
    has_dw = needs_affine and weight is not None and weight.dtype == torch.float32
    has_db = needs_affine and bias is not None and bias.dtype == torch.float32
    params = (mean, rstd, weight if weight is not None else p, bias if bias is not None else p)
    sums = p  # read by _dx_kernel only in training, which runs the reduction
    dw = db = None
    if training or needs_affine:
        grid, rows, meta = _reduction_config(N, C, OH, OW, p.device, "backward")
        sums = torch.empty((1 + grid[0], 2, C), dtype=torch.float32, device=p.device)
        dw = torch.empty(C, dtype=torch.float32, device=p.device) if has_dw else None
        db = torch.empty(C, dtype=torch.float32, device=p.device) if has_db else None
        counters = torch.zeros(grid[1], dtype=torch.int32, device=p.device)
        _bn._launch(_reduce_kernel, grid, wrap)(
            grad_y, p, *params, sums, counters, dw if has_dw else p, db if has_db else p, N * OH * OW, C, OH, OW,
            *p.stride(), *grad_y.stride(), rows, HAS_DW=has_dw, HAS_DB=has_db, **flags, **meta)
        if needs_affine and weight is not None and not has_dw:
            dw = sums[0, 1].to(weight.dtype)  # another dtype: a copy, so no output aliases `sums`
        if needs_affine and bias is not None and not has_db:
            db = sums[0, 0].to(bias.dtype)
    dx = grad_input_like(x_shape, channels_last, p.dtype, p.device)
    QH, QW = (H + 1) // 2, (W + 1) // 2
    Q = N * QH * QW
    _one_tile_launch(_dx_tuned, _dx_kernel, _grid(Q, C), wrap, C, interpreted)(
        grad_y, p, code, *params, sums, dx, Q, C, N * OH * OW, OH, OW, QH, QW, H, W, *p.stride(), *grad_y.stride(),
        *dx.stride(), TRAINING=training, **flags)
    return dx, dw, db
