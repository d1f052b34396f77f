"""Fused BatchNorm + residual add + activation + 2x2 max-pool, forward and backward:
    y = maxpool2x2(act((x - mean) * rstd * weight + bias + residual))      (pool, residual optional)
with batch statistics in training (and the running-stat update PyTorch does: momentum, unbiased variance)
or the running statistics in eval. With normalize=False the kernels apply only act (+ residual) (+ pool).

x is any 4-D layout (strides are arguments); NHWC (channels_last) is the fast one: a program owns a tile
of BLOCK_P positions x BLOCK_C channels, channels the contiguous axis. Math is float32 whatever the
storage dtype.

Forward, training, two launches: _stats_kernel reads x once, each program adding its tiles into per-lane
sums of x - shift and its square (shift: one of the program's own values per channel, so no E[x^2] - mean^2
cancellation) and reducing across lanes once at the end into one (mean, M2) partial per channel; the last
program of a channel block to finish (an atomic counter) merges the partials with Chan's formula, writes
mean and 1/std and updates the running statistics in place. _apply_kernel reads x (and the residual) again
and writes only y (pooled when pooling). Nothing else is saved: backward recomputes the normalized value, the
activation and the pool's argmax from x.
Backward, two launches: _backward_kernel PHASE 0 reads x and dy and writes per-program partial sums of dz
and dz * xhat per channel (dz = gradient at the activation's input, routed through the pool's argmax; summed
per lane, then across lanes once a program); its last program of a channel block sums them and writes
d bias and d weight; PHASE 1 reads x and dy again and writes dx (and d residual = dz). Without batch
statistics one launch: PHASE 1, or PHASE 2 where the sum of dz per channel is wanted too (the gradient of the
bias of the convolution that wrote x): PHASE 0's programs and sums, writing dx as they go.
The counters start at zero and the last program sets its counter back to zero, so one zeroed buffer serves
every launch on a stream (ops.py's eager path keeps one a device; a traced call allocates it zeroed).

The pool takes the first maximum of each window (row-major), comparing the activations rounded to the
output dtype, as PyTorch's max_pool2d does on the rounded tensor; forward and backward recompute z with
the same code, so they agree on the argmax."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import activations as _act
from ._launch import launch as cached_launch
from ._runtime import interpreting, tl, triton, use_triton
from .activations import _act_fwd, _act_grad, activation_code

BUILT_FOR_INTERPRETER = interpreting()


def pooled_shape(x_shape) -> tuple[int, int, int, int]:
    n, c, h, w = x_shape
    return n, c, h // 2, w // 2


def output_like(x: torch.Tensor, pool: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The output buffer: x's layout (channels_last stays channels_last), pooled when pooling. Shared by
    the op and its fake implementation so that torch.compile sees the strides the kernel writes."""
    dtype = dtype or x.dtype
    if not pool:
        return torch.empty_like(x, dtype=dtype)
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(pooled_shape(x.shape), dtype=dtype, device=x.device, memory_format=fmt)


def check_inputs(x, weight, bias, residual, activation: str, pool: bool, training: bool) -> None:
    activation_code(activation)
    if x.dim() != 4:
        raise ValueError(f"batchnorm_act takes a 4-D (N, C, H, W) tensor; got shape {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({c},) for {c} channels")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
    if training and x.numel() // max(c, 1) <= 1:
        raise ValueError(f"batch statistics need more than 1 value per channel; got input {tuple(x.shape)}")


# ---------------------------------------------------------------- reference (plain PyTorch)

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _apply_reference(x, weight, bias, residual, mean, rstd, activation, pool, normalize, out_dtype):
    cd = _compute_dtype(x)
    z = x.to(cd)
    if normalize:
        per_channel = (1, -1, 1, 1)
        z = (z - mean.to(cd).view(per_channel)) * rstd.to(cd).view(per_channel)
        if weight is not None:
            z = z * weight.to(cd).view(per_channel)
        if bias is not None:
            z = z + bias.to(cd).view(per_channel)
    if residual is not None:
        z = z + residual.to(cd)
    a = _act.reference_forward(z, activation).to(out_dtype)
    return F.max_pool2d(a, 2) if pool else a


def _batch_stats(x, eps):
    xf = x.to(_compute_dtype(x))
    var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
    return mean, torch.rsqrt(var + eps), var


def reference_statistics(x, running_mean, running_var, momentum: float, eps: float):
    """(mean, rstd) of the batch; the running statistics updated as F.batch_norm does."""
    mean, rstd, var = _batch_stats(x, eps)
    if running_mean is not None:
        count = x.numel() // x.shape[1]
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_((momentum * mean).to(running_mean.dtype))
            running_var.mul_(1 - momentum).add_((momentum * var * (count / (count - 1))).to(running_var.dtype))
    return mean, rstd


def reference_backward(grad_y, x, weight, bias, residual, mean, rstd, training: bool, normalize: bool,
                       activation: str, pool: bool):
    """(dx, dweight, dbias, dresidual), None where an input is None: BatchNorm's backward written out (autograd
    does not record inside a custom op). In training mean and rstd are x's batch statistics, whose gradient
    terms dx gets: rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))."""
    cd = _compute_dtype(x)
    per_channel, dims = (1, -1, 1, 1), (0, 2, 3)
    xhat = x.to(cd)
    if normalize:
        xhat = (xhat - mean.to(cd).view(per_channel)) * rstd.to(cd).view(per_channel)
    w = weight.to(cd).view(per_channel) if normalize and weight is not None else None
    z = xhat if w is None else xhat * w
    if normalize and bias is not None:
        z = z + bias.to(cd).view(per_channel)
    if residual is not None:
        z = z + residual.to(cd)
    g = grad_y.to(cd)
    if pool:  # the first maximum of each window, among the values rounded to the output dtype, gets dy
        a = _act.reference_forward(z, activation).to(x.dtype).to(cd)
        _, index = F.max_pool2d(a, 2, return_indices=True)
        g = torch.zeros_like(a).flatten(2).scatter_(2, index.flatten(2), g.flatten(2)).view_as(a)
    dz = _act.reference_backward(g, z, activation)
    dx = dz if w is None else dz * w
    dw = db = None
    if normalize:
        if training:
            dx = dx - dx.mean(dims, keepdim=True) - xhat * (dx * xhat).mean(dims, keepdim=True)
        dx = dx * rstd.to(cd).view(per_channel)
        dw = (dz * xhat).sum(dims).to(weight.dtype) if weight is not None else None
        db = dz.sum(dims).to(bias.dtype) if bias is not None else None
    # dres a copy: without normalize, dx is dz itself, and a custom op's outputs may not alias each other
    return dx.to(x.dtype), dw, db, dz.to(residual.dtype, copy=True) if residual is not None else None


# ---------------------------------------------------------------- Triton

@triton.jit
def _rows(m, HW, W, sN, sH, sW):
    """Memory offset of flat position m = (n * H + h) * W + w (int64)."""
    n = m // HW
    hw = m - n * HW
    h = hw // W
    w = hw - h * W
    return n.to(tl.int64) * sN + h.to(tl.int64) * sH + w.to(tl.int64) * sW


@triton.jit
def _last_program(counter_ptr, pid_c):
    """Whether this program is the last of its channel block (the grid's axis 1) to get here: it has seen the
    others' partials. The barrier puts all this program's stores before the release; the acquire side reads
    the partials through L2 (cache_modifier .cg), where the other SMs' stores are."""
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr + pid_c, 1, sem="acq_rel")
    return done == tl.num_programs(0) - 1


@triton.jit
def _stats_kernel(x_ptr, partial_ptr, counter_ptr, mean_ptr, rstd_ptr, rm_ptr, rv_ptr, M, C, HW, W,
                  sN, sC, sH, sW, rows_per_prog, momentum, eps, UPDATE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr):
    """Program (i, j): rows [i * rows_per_prog, ...) of channel block j; its (mean, M2) go to partial (programs,
    2, C). The last program of block j merges them all (BLOCK_F programs' partials at a time)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_off = c.to(tl.int64) * sC
    start = pid_m * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    first = _rows(start + tl.arange(0, 1), HW, W, sN, sH, sW)
    shift = tl.sum(tl.load(x_ptr + first[:, None] + c_off[None, :], mask=c_ok[None, :], other=0.0).to(tl.float32),
                   axis=0)
    s1 = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    s2 = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for m0 in range(start, end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < end
        mask = m_ok[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + _rows(m, HW, W, sN, sH, sW)[:, None] + c_off[None, :], mask=mask, other=0.0)
        s1, s2 = _add_shifted(s1, s2, x.to(tl.float32), shift, mask)
    mean, m2 = _shifted_moments(s1, s2, shift, end - start)
    _store_stats(partial_ptr, counter_ptr, mean_ptr, rstd_ptr, rm_ptr, rv_ptr, pid_m, pid_c, mean, m2, c, c_ok, M,
                 C, rows_per_prog, momentum, eps, UPDATE, BLOCK_C, BLOCK_F)


@triton.jit
def _store_stats(partial_ptr, counter_ptr, mean_ptr, rstd_ptr, rm_ptr, rv_ptr, pid_m, pid_c, mean, m2, c, c_ok, M, C,
                 rows_per_prog, momentum, eps, UPDATE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr):
    """A statistics pass's end: this program's (mean, M2) go to row pid_m of partial; the last program of the
    channel block then merges them all (_finish_stats) and zeroes its counter again for the next launch."""
    tl.store(partial_ptr + pid_m * 2 * C + c, mean, mask=c_ok)
    tl.store(partial_ptr + pid_m * 2 * C + C + c, m2, mask=c_ok)
    if _last_program(counter_ptr, pid_c):
        _finish_stats(partial_ptr, mean_ptr, rstd_ptr, rm_ptr, rv_ptr, c, c_ok, M, C, rows_per_prog, momentum, eps,
                      UPDATE, BLOCK_C, BLOCK_F)
        tl.store(counter_ptr + pid_c, 0)


@triton.jit
def _add_shifted(s1, s2, x, shift, mask):
    """Per-lane sums of d = x - shift and d * d (float32 tiles; masked lanes add nothing). The shift, one of the
    program's own values per channel, keeps d near the spread rather than the mean, so S2 - S1^2 / n does
    not cancel as E[x^2] - mean^2 would for a large mean beside a small spread."""
    d = tl.where(mask, x - shift[None, :], 0.0)
    return s1 + d, s2 + d * d


@triton.jit
def _shifted_moments(s1, s2, shift, count):
    """(mean, M2) per channel of a program's `count` rows from its per-lane shifted sums: one cross-warp
    reduction a program instead of one a tile."""
    n = count.to(tl.float32)
    t1 = tl.sum(s1, axis=0)
    t2 = tl.sum(s2, axis=0)
    return shift + t1 / n, tl.maximum(t2 - t1 * (t1 / n), 0.0)


@triton.jit
def _finish_stats(partial_ptr, mean_ptr, rstd_ptr, rm_ptr, rv_ptr, c, c_ok, M, C, rows_per_prog, momentum, eps,
                  UPDATE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr):
    """The last program of a channel block: merges the programs' (mean, M2) partials (programs, 2, C), each
    over rows_per_prog of the M rows (the last program fewer), BLOCK_F at a time with Chan's formula, writes
    mean and 1/std and with UPDATE the running statistics as F.batch_norm does (unbiased variance)."""
    programs = tl.num_programs(0)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for p0 in range(0, programs, BLOCK_F):
        # BLOCK_F programs' partials: their own (mean, M2), then merged into the total with Chan's formula
        p = p0 + tl.arange(0, BLOCK_F)
        p_ok = p < programs
        count = tl.where(p_ok, tl.minimum(M - p * rows_per_prog, rows_per_prog), 0).to(tl.float32)
        mask = p_ok[:, None] & c_ok[None, :]
        offset = p[:, None] * (2 * C) + c[None, :]
        mu = tl.load(partial_ptr + offset, mask=mask, other=0.0, cache_modifier=".cg")
        part = tl.load(partial_ptr + offset + C, mask=mask, other=0.0, cache_modifier=".cg")
        seen = (p0 * rows_per_prog).to(tl.float32)  # every earlier program had rows_per_prog rows
        n = tl.minimum(M - p0 * rows_per_prog, BLOCK_F * rows_per_prog).to(tl.float32)
        chunk_mean = tl.sum(count[:, None] * mu, axis=0) / n
        d = tl.where(mask, mu - chunk_mean[None, :], 0.0)
        chunk_m2 = tl.sum(part + count[:, None] * d * d, axis=0)
        delta = chunk_mean - mean
        total = seen + n
        mean += delta * (n / total)
        m2 += chunk_m2 + delta * delta * (seen * n / total)
    var = m2 / M
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(rstd_ptr + c, 1.0 / tl.sqrt(var + eps), mask=c_ok)
    if UPDATE:
        rm = tl.load(rm_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        rv = tl.load(rv_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        rm = rm * (1.0 - momentum) + momentum * mean
        rv = rv * (1.0 - momentum) + momentum * (m2 / (M - 1))  # PyTorch's running_var is unbiased
        tl.store(rm_ptr + c, rm.to(rm_ptr.dtype.element_ty), mask=c_ok)
        tl.store(rv_ptr + c, rv.to(rv_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, c, c_ok, NORM: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    mean = tl.zeros((BLOCK_C,), tl.float32)
    rstd = tl.full((BLOCK_C,), 1.0, tl.float32)
    wgt = tl.full((BLOCK_C,), 1.0, tl.float32)
    bias = tl.zeros((BLOCK_C,), tl.float32)
    if NORM:
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
        rstd = tl.load(rstd_ptr + c, mask=c_ok, other=0.0)
        if HAS_W:
            wgt = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        if HAS_B:
            bias = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    return mean, rstd, wgt, bias


@triton.jit
def _pre(x_ptr, res_ptr, x_off, r_off, mask, mean, rstd, wgt, bias, NORM: tl.constexpr, HAS_RES: tl.constexpr):
    """(xhat, z): the normalized input and the activation's input, float32. The one place both directions
    compute them, so the backward's recomputed pool argmax is the forward's."""
    xhat = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        xhat = (xhat - mean[None, :]) * rstd[None, :]
    z = xhat * wgt[None, :] + bias[None, :]
    if HAS_RES:
        z += tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
    return xhat, z


@triton.jit
def _pooled_value(z, mask, KIND: tl.constexpr, FAST: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """The activation as max_pool2d compares it: rounded to the output dtype; -inf where masked."""
    a = _act_fwd(z, KIND, FAST).to(OUT_DTYPE).to(tl.float32)
    return tl.where(mask, a, float("-inf"))


@triton.jit
def _apply_kernel(x_ptr, res_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, P, C, PH, PW, H, W,
                  sxN, sxC, sxH, sxW, srN, srC, srH, srW, syN, syC, syH, syW,
                  NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
                  KIND: tl.constexpr, POOL: tl.constexpr, FAST: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: BLOCK_P output positions (pooled ones when POOL; PH x PW is the output's H x W) x BLOCK_C
    channels."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok, c_ok = p < P, c < C
    mask = p_ok[:, None] & c_ok[None, :]
    mean, rstd, wgt, bias = _channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, c, c_ok, NORM, HAS_W, HAS_B,
                                            BLOCK_C)
    n = p // (PH * PW)
    hw = p - n * (PH * PW)
    oh = hw // PW
    ow = hw - oh * PW
    n64 = n.to(tl.int64)
    cx = c.to(tl.int64)[None, :] * sxC
    cr = c.to(tl.int64)[None, :] * srC
    out_ty = y_ptr.dtype.element_ty
    if POOL:
        best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
        for i in tl.static_range(2):
            for j in tl.static_range(2):
                h64 = (2 * oh + i).to(tl.int64)
                w64 = (2 * ow + j).to(tl.int64)
                x_off = (n64 * sxN + h64 * sxH + w64 * sxW)[:, None] + cx
                r_off = (n64 * srN + h64 * srH + w64 * srW)[:, None] + cr
                _, z = _pre(x_ptr, res_ptr, x_off, r_off, mask, mean, rstd, wgt, bias, NORM, HAS_RES)
                best = tl.maximum(best, _pooled_value(z, mask, KIND, FAST, out_ty))
        y = best
    else:
        x_off = (n64 * sxN + oh.to(tl.int64) * sxH + ow.to(tl.int64) * sxW)[:, None] + cx
        r_off = (n64 * srN + oh.to(tl.int64) * srH + ow.to(tl.int64) * srW)[:, None] + cr
        _, z = _pre(x_ptr, res_ptr, x_off, r_off, mask, mean, rstd, wgt, bias, NORM, HAS_RES)
        y = _act_fwd(z, KIND, FAST)
    y_off = (n64 * syN + oh.to(tl.int64) * syH + ow.to(tl.int64) * syW)[:, None] + c.to(tl.int64)[None, :] * syC
    tl.store(y_ptr + y_off, y.to(out_ty), mask=mask)


@triton.jit
def _backward_element(x_ptr, res_ptr, dx_ptr, dres_ptr, x_off, r_off, mask, dz, xhat, mean_dz, mean_dzx,
                      rstd, wgt, acc_dz, acc_dzx, PHASE: tl.constexpr, TRAINING: tl.constexpr,
                      NORM: tl.constexpr, HAS_RES: tl.constexpr):
    """PHASE 0: add this element's dz and dz * xhat to the per-lane sums (BLOCK_P x BLOCK_C); PHASE 1: write dx
    (and dres); PHASE 2: both."""
    dz = tl.where(mask, dz, 0.0)
    if PHASE != 1:
        acc_dz += dz
    if PHASE == 0:
        acc_dzx += dz * xhat
    if PHASE != 0:
        dx = dz
        if NORM:
            if TRAINING:
                dx = dz - mean_dz[None, :] - xhat * mean_dzx[None, :]
            dx = dx * (rstd * wgt)[None, :]
        tl.store(dx_ptr + x_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_RES:
            tl.store(dres_ptr + r_off, dz.to(dres_ptr.dtype.element_ty), mask=mask)
    return acc_dz, acc_dzx


@triton.jit
def _backward_kernel(dy_ptr, x_ptr, res_ptr, dx_ptr, dres_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sums_ptr, counter_ptr,
                     dw_ptr, db_ptr, P, C, M, PH, PW, OH, OW, H, W, units_per_prog,
                     sxN, sxC, sxH, sxW, srN, srC, srH, srW, sdN, sdC, sdH, sdW,
                     PHASE: tl.constexpr, TRAINING: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_B: tl.constexpr, HAS_RES: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
                     KIND: tl.constexpr, POOL: tl.constexpr, FAST: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr):
    """Units are input positions, or with POOL the ceil(H/2) x ceil(W/2) pool windows (PH x PW), so that
    every input element is visited once; the (OH, OW) real windows get dy, rows/columns left over by an
    odd H/W get dz = 0 (their dx still has the batch-statistics terms). sums is (1 + programs, 2, C) float32:
    PHASE 0 (units_per_prog units a program) writes program i's partial sums of dz and dz * xhat at row
    1 + i, and its last program of a channel block their totals at row 0, d bias = sum dz and d weight =
    sum dz * xhat (HAS_DB, HAS_DW: in the parameters' dtypes); PHASE 1 (one tile a program) reads row 0 and
    writes dx and dres; PHASE 2 (not TRAINING) does both at once: PHASE 0's sums, writing dx and dres as
    PHASE 1. dy's strides: sd*."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean, rstd, wgt, bias = _channel_params(mean_ptr, rstd_ptr, w_ptr, b_ptr, c, c_ok, NORM, HAS_W, HAS_B,
                                            BLOCK_C)
    mean_dz = tl.zeros((BLOCK_C,), tl.float32)
    mean_dzx = tl.zeros((BLOCK_C,), tl.float32)
    if PHASE == 1:
        if TRAINING:
            mean_dz = tl.load(sums_ptr + c, mask=c_ok, other=0.0) / M
            mean_dzx = tl.load(sums_ptr + C + c, mask=c_ok, other=0.0) / M
        start = pid_p * BLOCK_P
        end = tl.minimum(start + BLOCK_P, P)
    else:
        start = pid_p * units_per_prog
        end = tl.minimum(start + units_per_prog, P)
    # per-lane sums, reduced across the tile's rows once at the end: a cross-warp reduction every tile would
    # synchronize the program's warps as often as it loads
    acc_dz = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    acc_dzx = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    cx = c.to(tl.int64)[None, :] * sxC
    cr = c.to(tl.int64)[None, :] * srC
    cd = c.to(tl.int64)[None, :] * sdC
    out_ty = dy_ptr.dtype.element_ty
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < end
        n = p // (PH * PW)
        hw = p - n * (PH * PW)
        uh = hw // PW
        uw = hw - uh * PW
        n64 = n.to(tl.int64)
        if POOL:
            real = p_ok & (uh < OH) & (uw < OW)
            d_off = (n64 * sdN + uh.to(tl.int64) * sdH + uw.to(tl.int64) * sdW)[:, None] + cd
            dy = tl.load(dy_ptr + d_off, mask=real[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            h0 = (2 * uh).to(tl.int64)
            w0 = (2 * uw).to(tl.int64)
            h1 = h0 + 1
            w1 = w0 + 1
            m00 = (p_ok[:, None] & c_ok[None, :])
            m01 = m00 & (2 * uw + 1 < W)[:, None]
            m10 = m00 & (2 * uh + 1 < H)[:, None]
            m11 = m01 & (2 * uh + 1 < H)[:, None]
            x00 = (n64 * sxN + h0 * sxH + w0 * sxW)[:, None] + cx
            x01 = (n64 * sxN + h0 * sxH + w1 * sxW)[:, None] + cx
            x10 = (n64 * sxN + h1 * sxH + w0 * sxW)[:, None] + cx
            x11 = (n64 * sxN + h1 * sxH + w1 * sxW)[:, None] + cx
            r00 = (n64 * srN + h0 * srH + w0 * srW)[:, None] + cr
            r01 = (n64 * srN + h0 * srH + w1 * srW)[:, None] + cr
            r10 = (n64 * srN + h1 * srH + w0 * srW)[:, None] + cr
            r11 = (n64 * srN + h1 * srH + w1 * srW)[:, None] + cr
            xh00, z00 = _pre(x_ptr, res_ptr, x00, r00, m00, mean, rstd, wgt, bias, NORM, HAS_RES)
            xh01, z01 = _pre(x_ptr, res_ptr, x01, r01, m01, mean, rstd, wgt, bias, NORM, HAS_RES)
            xh10, z10 = _pre(x_ptr, res_ptr, x10, r10, m10, mean, rstd, wgt, bias, NORM, HAS_RES)
            xh11, z11 = _pre(x_ptr, res_ptr, x11, r11, m11, mean, rstd, wgt, bias, NORM, HAS_RES)
            # the first maximum in row-major order takes the window's gradient, as in max_pool2d
            best = _pooled_value(z00, m00, KIND, FAST, out_ty)
            pick = tl.zeros((BLOCK_P, BLOCK_C), tl.int32)
            v = _pooled_value(z01, m01, KIND, FAST, out_ty)
            pick = tl.where(v > best, 1, pick)
            best = tl.maximum(best, v)
            v = _pooled_value(z10, m10, KIND, FAST, out_ty)
            pick = tl.where(v > best, 2, pick)
            best = tl.maximum(best, v)
            v = _pooled_value(z11, m11, KIND, FAST, out_ty)
            pick = tl.where(v > best, 3, pick)
            dz = tl.where(pick == 0, dy, 0.0) * _act_grad(z00, KIND, FAST)
            acc_dz, acc_dzx = _backward_element(x_ptr, res_ptr, dx_ptr, dres_ptr, x00, r00, m00, dz, xh00, mean_dz,
                                                mean_dzx, rstd, wgt, acc_dz, acc_dzx, PHASE, TRAINING, NORM, HAS_RES)
            dz = tl.where(pick == 1, dy, 0.0) * _act_grad(z01, KIND, FAST)
            acc_dz, acc_dzx = _backward_element(x_ptr, res_ptr, dx_ptr, dres_ptr, x01, r01, m01, dz, xh01, mean_dz,
                                                mean_dzx, rstd, wgt, acc_dz, acc_dzx, PHASE, TRAINING, NORM, HAS_RES)
            dz = tl.where(pick == 2, dy, 0.0) * _act_grad(z10, KIND, FAST)
            acc_dz, acc_dzx = _backward_element(x_ptr, res_ptr, dx_ptr, dres_ptr, x10, r10, m10, dz, xh10, mean_dz,
                                                mean_dzx, rstd, wgt, acc_dz, acc_dzx, PHASE, TRAINING, NORM, HAS_RES)
            dz = tl.where(pick == 3, dy, 0.0) * _act_grad(z11, KIND, FAST)
            acc_dz, acc_dzx = _backward_element(x_ptr, res_ptr, dx_ptr, dres_ptr, x11, r11, m11, dz, xh11, mean_dz,
                                                mean_dzx, rstd, wgt, acc_dz, acc_dzx, PHASE, TRAINING, NORM, HAS_RES)
        else:
            mask = p_ok[:, None] & c_ok[None, :]
            h64 = uh.to(tl.int64)
            w64 = uw.to(tl.int64)
            x_off = (n64 * sxN + h64 * sxH + w64 * sxW)[:, None] + cx
            r_off = (n64 * srN + h64 * srH + w64 * srW)[:, None] + cr
            d_off = (n64 * sdN + h64 * sdH + w64 * sdW)[:, None] + cd
            dy = tl.load(dy_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
            xhat, z = _pre(x_ptr, res_ptr, x_off, r_off, mask, mean, rstd, wgt, bias, NORM, HAS_RES)
            acc_dz, acc_dzx = _backward_element(
                x_ptr, res_ptr, dx_ptr, dres_ptr, x_off, r_off, mask, dy * _act_grad(z, KIND, FAST), xhat,
                mean_dz, mean_dzx, rstd, wgt, acc_dz, acc_dzx, PHASE, TRAINING, NORM, HAS_RES)
    if PHASE != 1:
        _store_sums(sums_ptr, counter_ptr, dw_ptr, db_ptr, pid_p, pid_c, tl.sum(acc_dz, axis=0),
                    tl.sum(acc_dzx, axis=0), c, c_ok, C, HAS_DW, HAS_DB, BLOCK_C, BLOCK_F)


@triton.jit
def _store_sums(sums_ptr, counter_ptr, dw_ptr, db_ptr, pid_m, pid_c, acc_dz, acc_dzx, c, c_ok, C,
                HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr):
    """A backward reduction's end: this program's partial (sum dz, sum dz * xhat) go to row pid_m + 1 of sums;
    the last program of the channel block then sums them all (_finish_sums) and zeroes its counter again for
    the next launch."""
    tl.store(sums_ptr + (pid_m + 1) * 2 * C + c, acc_dz, mask=c_ok)
    tl.store(sums_ptr + (pid_m + 1) * 2 * C + C + c, acc_dzx, mask=c_ok)
    if _last_program(counter_ptr, pid_c):
        _finish_sums(sums_ptr, dw_ptr, db_ptr, c, c_ok, C, HAS_DW, HAS_DB, BLOCK_C, BLOCK_F)
        tl.store(counter_ptr + pid_c, 0)


@triton.jit
def _finish_sums(sums_ptr, dw_ptr, db_ptr, c, c_ok, C, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr):
    """The last program of a channel block: sums the programs' partial (sum dz, sum dz * xhat) at rows 1.. of
    sums (1 + programs, 2, C) into row 0, and writes them as d bias and d weight (HAS_DB, HAS_DW)."""
    programs = tl.num_programs(0)
    dz = tl.zeros((BLOCK_C,), tl.float32)
    dzx = tl.zeros((BLOCK_C,), tl.float32)
    for p0 in range(0, programs, BLOCK_F):
        p = p0 + tl.arange(0, BLOCK_F)
        mask = (p < programs)[:, None] & c_ok[None, :]
        offset = (p + 1)[:, None] * (2 * C) + c[None, :]
        dz += tl.sum(tl.load(sums_ptr + offset, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
        dzx += tl.sum(tl.load(sums_ptr + offset + C, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
    tl.store(sums_ptr + c, dz, mask=c_ok)
    tl.store(sums_ptr + C + c, dzx, mask=c_ok)
    if HAS_DW:
        tl.store(dw_ptr + c, dzx.to(dw_ptr.dtype.element_ty), mask=c_ok)
    if HAS_DB:
        tl.store(db_ptr + c, dz.to(db_ptr.dtype.element_ty), mask=c_ok)


def _strides(t: torch.Tensor | None, like: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple((t if t is not None else like).stride())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr_function, microseconds a call on the host


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# Elements a tile (a pool window counts once) by (pool, backward), and warps a program. Without the pool: 8192
# elements forward and 4096 backward with 4 warps, timed best of 18 settings (tile x 1/2, 1, 2; 4 or 8 warps;
# 2, 4 or 8 waves) at the four shapes swept (dev/bn_tile_sweep.py; benchmarks/kernels.md), 1.2-1.5x faster
# forward + backward than the 4096 / 2048 elements with 8 warps before. With the pool (not swept): tiles
# chosen from ptxas's register counts for sm_90, where the backward's four recomputed window elements need
# ~100 registers a thread at 1024 elements and 8 warps.
_TILE_ELEMENTS = {(False, False): 8192, (False, True): 4096, (True, False): 2048, (True, True): 1024}
_TILE_WARPS = {False: 4, True: 8}


def _tiles(C: int, pool: bool, backward: bool, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps): channels are NHWC's contiguous axis, so up to 64 of them (128 bytes in
    16 bits) make each position's load one wide transaction."""
    if interpreted:  # the interpreter's cost is per program: about 4K-element tiles (C = 20 spans two)
        block_c = min(_pow2(C), 16 if C <= 32 else 128)
        return max(4096 // block_c, 32), block_c, 4
    block_c = min(_pow2(C), 64)
    return _TILE_ELEMENTS[pool, backward] // block_c, block_c, _TILE_WARPS[pool]


def _merge_rows(block_c: int, interpreted: bool) -> int:
    """BLOCK_F, the partials the last program merges at a step: a 2K-element tile on the GPU (the main loops'
    size, so the merge adds no registers); 2 in the interpreter, so that tests merge in several steps."""
    return 2 if interpreted else max(2048 // block_c, 16)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# Reduction programs in all, in waves of the GPU (one program an SM a wave): 2 for the statistics and the
# backward without the pool (swept with the tiles above), 4 for the pooled backward and the pool op's reductions.
WAVES, POOLED_WAVES = 2, 4


def _programs_per_channel_block(c_blocks: int, device: torch.device, waves: int) -> int:
    """Reduction programs a channel block: about `waves` waves of the GPU in all."""
    if device.type != "cuda":
        return 3  # the interpreter: few programs, each merging several tiles (both levels of the reduction run)
    return max(1, waves * _multiprocessors(device) // c_blocks)


def _reduction_split(units: int, block: int, c_blocks: int, device: torch.device, waves: int) -> tuple[int, int]:
    """(units a program, programs a channel block) of a reduction over `units` rows in tiles of `block`."""
    blocks = _cdiv(units, block)
    per_program = _cdiv(blocks, min(blocks, _programs_per_channel_block(c_blocks, device, waves))) * block
    return per_program, _cdiv(units, per_program)


def shape_cache(fn):
    """functools.cache for a launch configuration taking the sizes (N, C, H, W) first: the per-call host work
    is a dictionary lookup. Symbolic sizes (a graph compiled for a dynamic batch size) are not cached; they are
    computed each trace instead, and the configuration's sizes come out as expressions of them. Only the
    sizes' types are checked, not every argument's: a SymInt is only ever a size, and this runs on every call."""
    cached = functools.cache(fn)

    @functools.wraps(fn)
    def config(N, C, H, W, *rest):
        if type(N) is int and type(C) is int and type(H) is int and type(W) is int:
            return cached(N, C, H, W, *rest)
        return fn(N, C, H, W, *rest)

    config.cache_clear, config.cache_info = cached.cache_clear, cached.cache_info
    return config


# Launch configurations by shape and flags, computed once.

@shape_cache
def _stats_config(N: int, C: int, H: int, W: int, device: torch.device, update: bool):
    """(grid, rows a program, sizes, meta) of _stats_kernel."""
    interpreted = device.type != "cuda"
    block_m, block_c, warps = _tiles(C, False, False, interpreted)
    c_blocks = _cdiv(C, block_c)
    M = N * H * W
    rows, programs = _reduction_split(M, block_m, c_blocks, device, WAVES)
    meta = dict(UPDATE=update, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_F=_merge_rows(block_c, interpreted),
                num_warps=warps)
    return (programs, c_blocks), rows, (M, C, H * W, W), meta


@shape_cache
def _apply_config(N: int, C: int, H: int, W: int, device: torch.device, pool: bool, normalize: bool, has_w: bool,
                  has_b: bool, has_res: bool, activation: str, fast: bool):
    """(grid, sizes, meta) of _apply_kernel; grid[0] is 0 for an empty output."""
    PH, PW = (H // 2, W // 2) if pool else (H, W)
    P = N * PH * PW
    block_p, block_c, warps = _tiles(C, pool, False, device.type != "cuda")
    meta = dict(NORM=normalize, HAS_W=has_w, HAS_B=has_b, HAS_RES=has_res, KIND=activation_code(activation),
                POOL=pool, FAST=fast, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    return (_cdiv(P, block_p), _cdiv(C, block_c)), (P, C, PH, PW, H, W), meta


@shape_cache
def _backward_config(N: int, C: int, H: int, W: int, device: torch.device, pool: bool, training: bool,
                     normalize: bool, has_w: bool, has_b: bool, has_res: bool, activation: str, fast: bool,
                     has_dw: bool, has_db: bool):
    """(reduction grid, units a reduction program, apply grid, sizes, PHASE 0 meta, PHASE 1 meta)."""
    interpreted = device.type != "cuda"
    if pool:
        PH, PW, OH, OW = (H + 1) // 2, (W + 1) // 2, H // 2, W // 2
    else:
        PH, PW, OH, OW = H, W, H, W
    P = N * PH * PW
    block_p, block_c, warps = _tiles(C, pool, True, interpreted)
    c_blocks = _cdiv(C, block_c)
    units, programs = _reduction_split(P, block_p, c_blocks, device, POOLED_WAVES if pool else WAVES)
    meta = dict(TRAINING=training, NORM=normalize, HAS_W=has_w, HAS_B=has_b, HAS_RES=has_res, HAS_DW=has_dw,
                HAS_DB=has_db, KIND=activation_code(activation), POOL=pool, FAST=fast, BLOCK_P=block_p,
                BLOCK_C=block_c, BLOCK_F=_merge_rows(block_c, interpreted), num_warps=warps)
    return ((programs, c_blocks), units, (_cdiv(P, block_p), c_blocks), (P, C, N * H * W, PH, PW, OH, OW, H, W),
            dict(meta, PHASE=0), dict(meta, PHASE=1))


def _launch(kernel, grid, wrap):
    """kernel[grid]: through wrap (torch.library.wrap_triton) when a triton_op's body runs it, so that tracing
    records the kernel; otherwise through the cached launcher, which skips Triton's per-call launch path
    (_launch.py). Every launch goes through here (tests count them)."""
    if wrap is not None:
        return wrap(kernel)[grid]
    return functools.partial(cached_launch, kernel, grid)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int, shared: bool) -> torch.Tensor:
    """n zeroed int32 counters for the last-program merges. shared: the device's one buffer (the kernels leave
    it zeroed, and launches on one stream run in turn), so eager calls allocate and fill nothing; two streams
    running these kernels on one device at once would race on it, which no trainer here does. Otherwise a
    fresh zeroed one (a traced call: its graph owns it, and a CUDA graph replays its fill)."""
    if not shared:
        return torch.zeros(n, dtype=torch.int32, device=device)
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        counters = _COUNTERS[device] = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
    return counters


def _fast(dtype: torch.dtype) -> bool:
    return dtype != torch.float32  # 16-bit outputs take the cheaper GELU (see activations._normal_cdf_fast)


def batch_stats(x: torch.Tensor, running_mean, running_var, momentum: float, eps: float,
                shared_counters: bool = False, wrap=None):
    """(mean, rstd) float32 of x's channels over N, H, W; updates the running statistics when given. One
    launch."""
    N, C, H, W = x.shape
    update = running_mean is not None
    grid, rows, sizes, meta = _stats_config(N, C, H, W, x.device, update)
    partial = torch.empty((grid[0], 2, C), dtype=torch.float32, device=x.device)
    mean = torch.empty(C, dtype=torch.float32, device=x.device)
    rstd = torch.empty(C, dtype=torch.float32, device=x.device)
    _launch(_stats_kernel, grid, wrap)(
        x, partial, _counters(x.device, grid[1], shared_counters), mean, rstd,
        running_mean if update else x, running_var if update else x, *sizes, *x.stride(), rows, float(momentum),
        float(eps), **meta)
    return mean, rstd


def _triton_ok(x: torch.Tensor) -> bool:
    return use_triton(x) and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


def statistics(x, running_mean, running_var, momentum: float, eps: float, shared_counters: bool = False,
               wrap=None):
    """(mean, rstd) of x's channels over N, H, W (float32; float64 for float64 x); updates running_mean/var
    in place when given. x passed check_inputs (ops.batchnorm_act checks once, before any kernel)."""
    if not _triton_ok(x):
        return reference_statistics(x, running_mean, running_var, momentum, eps)
    return batch_stats(x, running_mean, running_var, momentum, eps, shared_counters, wrap)


def apply(x, weight, bias, residual, mean, rstd, normalize: bool, activation: str, pool: bool,
          wrap=None) -> torch.Tensor:
    """y = maxpool?(act((x - mean) * rstd * weight + bias + residual)) in x's dtype and layout; without
    normalize, y = maxpool?(act(x + residual)). The inputs passed check_inputs (as in statistics())."""
    if not _triton_ok(x) or x.numel() == 0:
        return _apply_reference(x, weight, bias, residual, mean, rstd, activation, pool, normalize, x.dtype)
    N, C, H, W = x.shape
    y = output_like(x, pool)
    grid, sizes, meta = _apply_config(N, C, H, W, x.device, pool, normalize, weight is not None, bias is not None,
                                      residual is not None, activation, _fast(x.dtype))
    if grid[0]:
        _launch(_apply_kernel, grid, wrap)(
            x, residual if residual is not None else x, y, mean, rstd, weight if weight is not None else x,
            bias if bias is not None else x, *sizes, *x.stride(), *_strides(residual, x), *y.stride(), **meta)
    return y


def eager_forward(x, weight, bias, residual, running_mean, running_var, training: bool, momentum: float, eps: float,
                  activation: str, pool: bool, normalize: bool):
    """(y, mean, rstd): the forward of an eager call, on the device's shared counters (no allocation, no fill);
    mean and rstd are empty without normalize."""
    if not normalize:
        mean = rstd = x.new_empty((0,))
    elif training:
        mean, rstd = statistics(x, running_mean, running_var, momentum, eps, shared_counters=True)
    else:
        mean, rstd = running_stats(running_mean, running_var, eps, x.dtype)
    return apply(x, weight, bias, residual, mean, rstd, normalize, activation, pool), mean, rstd


def running_stats(running_mean, running_var, eps: float, dtype: torch.dtype):
    """Eval mode's (mean, rstd) from the running statistics."""
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    return running_mean.to(cd), torch.rsqrt(running_var.to(cd) + eps)


def backward(grad_y, x, weight, bias, residual, mean, rstd, training: bool, normalize: bool, activation: str,
             pool: bool, needs_affine: bool = True, shared_counters: bool = False, wrap=None,
             input_sum: bool = False):
    """(dx, dweight, dbias, dresidual), None for an absent input (and for dweight/dbias without needs_affine).
    mean/rstd are forward's outputs. Two launches with batch statistics or affine gradients, else one. Without
    normalize, input_sum puts in dbias's place the sum of dx over each channel (float32; the gradient of a bias
    added to x, as a convolution's before the op), from the same launch."""
    if not normalize:
        training = False
    input_sum = input_sum and not normalize
    grad_y = grad_y.to(x.dtype)  # y's dtype: the pool's argmax is recomputed from values rounded to it
    if grad_y.shape != (pooled_shape(x.shape) if pool else x.shape):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}; the output of input {tuple(x.shape)} "
                         f"{'pooled ' if pool else ''}has another")
    if not _triton_ok(x) or x.numel() == 0:
        dx, dw, db, dres = reference_backward(grad_y, x, weight, bias, residual, mean, rstd, training, normalize,
                                              activation, pool)
        if input_sum:
            return dx, None, dx.sum((0, 2, 3), dtype=torch.float32), dres
        return dx, dw if needs_affine else None, db if needs_affine else None, dres
    N, C, H, W = x.shape
    affine = normalize and needs_affine
    # d weight / d bias straight from the kernel when float32 (BatchNorm's usual parameters); other dtypes
    # are rounded by PyTorch afterwards, as the interpreter's bfloat16 conversion truncates where PyTorch's
    # and the GPU's round to nearest
    has_dw = affine and weight is not None and weight.dtype == torch.float32
    has_db = affine and bias is not None and bias.dtype == torch.float32
    reduce_grid, units, apply_grid, sizes, meta0, meta1 = _backward_config(
        N, C, H, W, x.device, pool, training, normalize, weight is not None, bias is not None,
        residual is not None, activation, _fast(x.dtype), has_dw, has_db)
    dx = torch.empty_like(x)
    dres = torch.empty_like(residual) if residual is not None else None
    pointers = (grad_y, x, residual if residual is not None else x, dx, dres if dres is not None else x, mean, rstd,
                weight if weight is not None else x, bias if bias is not None else x)
    strides = (*x.stride(), *_strides(residual, x), *grad_y.stride())
    sums = x  # read by PHASE 1 only in training, which has PHASE 0
    dw = db = None
    if input_sum or (normalize and (training or needs_affine)):
        has_db = has_db or input_sum  # input_sum: PHASE 2 writes the sum of dz (= dx) as d bias
        sums = torch.empty((1 + reduce_grid[0], 2, C), dtype=torch.float32, device=x.device)
        dw = torch.empty(C, dtype=torch.float32, device=x.device) if has_dw else None
        db = torch.empty(C, dtype=torch.float32, device=x.device) if has_db else None
        _launch(_backward_kernel, reduce_grid, wrap)(
            *pointers, sums, _counters(x.device, reduce_grid[1], shared_counters), dw if has_dw else x,
            db if has_db else x, *sizes, units, *strides, **(dict(meta0, PHASE=2, HAS_DB=True) if input_sum
                                                              else meta0))
        if input_sum:  # that launch wrote dx too
            return dx, None, db, dres
        if affine and weight is not None and not has_dw:
            dw = sums[0, 1].to(weight.dtype)  # another dtype: a copy, so no output aliases `sums`
        if affine and bias is not None and not has_db:
            db = sums[0, 0].to(bias.dtype)
    _launch(_backward_kernel, apply_grid, wrap)(*pointers, sums, x, x, x, *sizes, meta1["BLOCK_P"], *strides,
                                                **meta1)
    return dx, dw, db, dres
