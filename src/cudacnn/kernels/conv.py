"""Implicit-GEMM 2-D convolution for NHWC (channels_last) tensors, forward and backward, with the BatchNorm
work around a convolution fused into its loads and stores:

    y = conv(act(x * scale + shift), w)        the PROLOGUE (optional): the previous BatchNorm's normalize +
                                               affine folded into a per-input-channel scale and shift, and
                                               its activation, applied while x is loaded; the normalized
                                               tensor is never written. Padding is zero AFTER the prologue.
    sums = (sum y, sum y^2) per output channel the EPILOGUE (optional): what the next BatchNorm's statistics
                                               need, from the values stored in y (rounded to its dtype).

Shapes: 3x3 stride 1 padding 1, and 1x1 stride 1 or 2 padding 0; groups 1, dilation 1 (`supported`).
Every kernel computes a stride-1 "same" convolution over strided views: a 1x1 stride-2 convolution is the
1x1 stride-1 one on x[:, :, ::2, ::2] (and its input gradient is written into the same view of a zeroed dx).
Storage float16, bfloat16 or float32 (and float64 under the interpreter, for gradcheck), float32
accumulation.

As GEMMs (M rows of positions, reduction over taps x channels):
  forward  y[m, k]   = sum_{r,s,c} a[m + tap(r,s), c] w[k, c, r, s]       M = N*H*W, N = K_out, red. 9*C
  dgrad    da[m, c]  = sum_{r,s,k} dy[m - tap(r,s), k] w[k, c, r, s]     M = N*H*W, N = C,     red. 9*K_out
           then, through the prologue: dx = da act'(z) scale, d shift = sum da act'(z), d scale = sum .. x
  wgrad    dw[k, (r,s,c)] = sum_m dy[m, k] a[m + tap(r,s), c]            K_out x 9*C, reduction over M, split
           over programs (partials, summed by PyTorch): few output tiles, millions of rows.
with a = act(x * scale + shift) recomputed from x wherever it is read. Per-channel sums (the epilogue's
statistics, d scale / d shift) are per-program partials summed afterwards: deterministic, no atomics.

`dispatch` is the one place that decides whether a call runs these kernels or cuDNN (F.conv2d with the
prologue and epilogue as separate PyTorch ops, `reference_forward`); measurements change it there."""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from . import activations as _act
from ._runtime import interpreting, tl, triton, use_triton
from .activations import _act_fwd, _act_grad, activation_code
from .gemm import _tile_coords

BUILT_FOR_INTERPRETER = interpreting()

STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PROLOGUE_ACTIVATIONS = ("none", "relu", "gelu", "silu")


# ---------------------------------------------------------------- shapes and the dispatch rule

def supported(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> bool:
    """The shapes the kernels implement: 3x3 stride 1 padding 1, 1x1 stride 1 or 2 padding 0."""
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        return False
    r, s = weight.shape[2:]
    return (r, s, stride, padding) in ((3, 3, 1, 1), (1, 1, 1, 0), (1, 1, 2, 0))


def channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.stride(1) == 1 and t.is_contiguous(memory_format=torch.channels_last)


def dispatch(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> str:
    """"triton" or "cudnn" for this call. Now: Triton for every supported shape in NHWC, where Triton can
    run (a CUDA GPU, or the interpreter; float64 only under the interpreter, where the tests take float64
    gradients through the kernels). Everything else, cuDNN."""
    dtypes = STORAGE_DTYPES + ((torch.float64,) if interpreting() and x.device.type == "cpu" else ())
    if (supported(x, weight, stride, padding) and channels_last(x) and x.dtype in dtypes
            and weight.dtype == x.dtype and x.numel() > 0 and use_triton(x)):
        return "triton"
    return "cudnn"


def output_shape(x_shape, weight_shape, stride: int, padding: int) -> tuple[int, int, int, int]:
    n, _, h, w = x_shape
    k, _, r, s = weight_shape
    return n, k, (h + 2 * padding - r) // stride + 1, (w + 2 * padding - s) // stride + 1


def check_inputs(x, weight, scale, shift, stride: int, padding: int, activation: str) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv2d_fused takes 4-D x (N, C, H, W) and weight (K, C, R, S); got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} expects {weight.shape[1]} input channels; x has "
                         f"{x.shape[1]} (groups are not supported)")
    if (scale is None) != (shift is None):
        raise ValueError("the prologue needs both scale and shift (per input channel); pass both or neither")
    if scale is None and activation != "none":
        raise ValueError(f"activation {activation!r} is the prologue's: pass scale and shift too (ones and "
                         "zeros for the activation alone)")
    if activation not in PROLOGUE_ACTIVATIONS:
        raise ValueError(f"unknown prologue activation {activation!r}; expected one of {PROLOGUE_ACTIVATIONS}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and tuple(t.shape) != (x.shape[1],):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({x.shape[1]},) for {x.shape[1]} "
                             "input channels")
    if min(output_shape(x.shape, weight.shape, stride, padding)[2:]) < 1 or stride < 1 or padding < 0:
        raise ValueError(f"stride {stride} padding {padding} leave no output for input {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")


# ---------------------------------------------------------------- reference (PyTorch: cuDNN on a GPU)

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype).view(1, -1, 1, 1)


def reference_prologue(x, scale, shift, activation):
    """act(x * scale + shift) rounded to x's dtype (the kernels' GEMM operand), or x itself."""
    if scale is None:
        return x
    cd = _compute_dtype(x)
    z = x.to(cd) * _per_channel(scale, cd) + _per_channel(shift, cd)
    return _act.reference_forward(z, activation).to(x.dtype)


def reference_stats(y: torch.Tensor) -> torch.Tensor:
    """(2, K): per-channel sum and sum of squares of y's stored values, float32 (float64 for float64 y)."""
    yc = y.to(_compute_dtype(y))
    return torch.stack([yc.sum((0, 2, 3)), (yc * yc).sum((0, 2, 3))])


def reference_forward(x, weight, scale, shift, stride: int, padding: int, activation: str, stats: bool):
    """(y, sums or None): F.conv2d with the prologue and epilogue as separate PyTorch ops; the zero padding
    is F.conv2d's, so it applies after the prologue, as in the kernels."""
    y = F.conv2d(reference_prologue(x, scale, shift, activation), weight, stride=stride, padding=padding)
    return y, (reference_stats(y) if stats else None)


def mean_rstd(sums: torch.Tensor, count: int, eps: float):
    """(mean, 1 / sqrt(var + eps)) per channel from the epilogue's sums over `count` values a channel (the
    biased variance, as BatchNorm normalizes with). Plain PyTorch, so autograd carries a loss's gradient back
    into sums (and through conv2d_fused into y). var = E[y^2] - mean^2 loses digits only where |mean| is
    many standard deviations, which BatchNorm's inputs are not."""
    mean = sums[0] / count
    var = (sums[1] / count - mean * mean).clamp_min(0)
    return mean, torch.rsqrt(var + eps)


def stats_gradient(grad_y, grad_sums, y):
    """grad_y plus the gradient that reaches y through sums = (sum y, sum y^2): g0 + 2 y g1 per channel."""
    if grad_sums is None:
        return grad_y
    cd = _compute_dtype(y)
    g = grad_y.to(cd) + _per_channel(grad_sums[0], cd) + 2 * y.to(cd) * _per_channel(grad_sums[1], cd)
    return g.to(grad_y.dtype)


def reference_backward(grad_y, x, weight, scale, shift, stride: int, padding: int, activation: str,
                       needs_x: bool = True, needs_w: bool = True):
    """(dx, dw, dscale, dshift) of y = conv(act(x * scale + shift), w), None where not needed or absent; grad_y
    already holds the statistics' part (stats_gradient). Written out: autograd does not record inside a
    custom op."""
    a = reference_prologue(x, scale, shift, activation)
    prologue = scale is not None
    da, dw, _ = torch.ops.aten.convolution_backward(
        grad_y.to(x.dtype), a, weight, None, (stride, stride), (padding, padding), (1, 1), False, (0, 0), 1,
        (needs_x or prologue, needs_w, False))
    if not prologue:
        return (da if needs_x else None), dw, None, None
    cd = _compute_dtype(x)
    z = x.to(cd) * _per_channel(scale, cd) + _per_channel(shift, cd)
    g = _act.reference_backward(da.to(cd), z, activation)
    dx = (g * _per_channel(scale, cd)).to(x.dtype) if needs_x else None
    dscale = (g * x.to(cd)).sum((0, 2, 3)).to(scale.dtype)
    dshift = g.sum((0, 2, 3)).to(shift.dtype)
    return dx, dw, dscale, dshift


# ---------------------------------------------------------------- Triton

@triton.jit
def _positions(offs, HW, W, sN, sH, sW):
    """(row offset int64, h, w) of flat positions offs = (n * H + h) * W + w of an NHWC tensor with these
    strides."""
    n = offs // HW
    hw = offs - n * HW
    h = hw // W
    w = hw - h * W
    return n.to(tl.int64) * sN + h.to(tl.int64) * sH + w.to(tl.int64) * sW, h, w


@triton.jit
def _load_input(x_ptr, scale_ptr, shift_ptr, base, h, w, row_ok, dh, dw, H, W, sxH, sxW, c, C,
                PROLOGUE: tl.constexpr, KIND: tl.constexpr, FAST: tl.constexpr, CT: tl.constexpr):
    """The (rows, channels) tile of a = act(x * scale + shift) at positions (h + dh, w + dw); zero outside
    the image (padding after the prologue) and on masked rows and channels. In x's dtype."""
    hh = h + dh
    ww = w + dw
    ok = row_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    c_ok = c < C
    mask = ok[:, None] & c_ok[None, :]
    ptrs = x_ptr + (base + dh * sxH + dw * sxW)[:, None] + c[None, :]
    a = tl.load(ptrs, mask=mask, other=0.0)
    if PROLOGUE:
        sc = tl.load(scale_ptr + c, mask=c_ok, other=0.0).to(CT)
        sh = tl.load(shift_ptr + c, mask=c_ok, other=0.0).to(CT)
        z = a.to(CT) * sc[None, :] + sh[None, :]
        a = tl.where(mask, _act_fwd(z, KIND, FAST), 0.0).to(x_ptr.dtype.element_ty)
    return a


@triton.jit
def _channel_partials(part_ptr, v0, v1, pid_m, P, offs_n, N, BLOCK_M: tl.constexpr, STAT_BLOCK: tl.constexpr):
    """Per-program partial sums v0, v1 (BLOCK_N,) into rows (P, 2, N) of STAT_BLOCK positions each: this
    program's first row gets them, its other rows zeros, so whatever BLOCK_M an autotuner tries, every row
    of the buffer is written (and the sum over rows is the total)."""
    n_ok = offs_n < N
    row = pid_m * (BLOCK_M // STAT_BLOCK)
    tl.store(part_ptr + row.to(tl.int64) * 2 * N + offs_n, v0, mask=n_ok)
    tl.store(part_ptr + row.to(tl.int64) * 2 * N + N + offs_n, v1, mask=n_ok)
    for i in tl.static_range(1, BLOCK_M // STAT_BLOCK):
        zero = tl.zeros_like(v0)
        ok = n_ok & (offs_n * 0 + row + i < P)
        tl.store(part_ptr + (row + i).to(tl.int64) * 2 * N + offs_n, zero, mask=ok)
        tl.store(part_ptr + (row + i).to(tl.int64) * 2 * N + N + offs_n, zero, mask=ok)


# Integers whose divisibility by 16 does not change the code (sizes of the position axis): not specialized,
# so the zoo's many spatial sizes share one compiled kernel per tile config (compiling is most of a first
# call's time). Channel counts and strides stay specialized: they decide vector widths.
_ANY_SIZE = ["M", "H", "W", "P"]


@triton.jit(do_not_specialize=_ANY_SIZE)
def _conv_fwd_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, shift_ptr, part_ptr, M, C, H, W, K, P, sxN, sxH, sxW,
                     R: tl.constexpr, PROLOGUE: tl.constexpr, KIND: tl.constexpr, FAST: tl.constexpr,
                     STATS: tl.constexpr, STAT_BLOCK: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr, CT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y (M, K) = implicit GEMM of x (N, H, W, C; strides sxN, sxH, sxW, channel stride 1) with w (R*R*C, K)
    rows ordered (r, s, c). One flat loop over taps x channel blocks, so the compiler pipelines it whole."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < K
    base, h, w = _positions(offs_m, H * W, W, sxN, sxH, sxW)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=CT)
    c_steps = tl.cdiv(C, BLOCK_K)
    for it in range(0, R * R * c_steps):
        rs = it // c_steps
        c0 = (it - rs * c_steps) * BLOCK_K
        dh = rs // R - R // 2
        dw = rs % R - R // 2
        c = c0 + tl.arange(0, BLOCK_K)
        a = _load_input(x_ptr, scale_ptr, shift_ptr, base, h, w, m_ok, dh, dw, H, W, sxH, sxW, c, C,
                        PROLOGUE, KIND, FAST, CT)
        b = tl.load(w_ptr + (rs * C + c)[:, None] * K + offs_n[None, :], mask=(c < C)[:, None] & n_ok[None, :],
                    other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (triton 3.9); bf16 products are exact in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * K + offs_n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])
    if STATS:  # rows past M and channels past K hold zeros (their operands were masked)
        v = y.to(CT)
        _channel_partials(part_ptr, tl.sum(v, axis=0), tl.sum(v * v, axis=0), pid_m, P, offs_n, K, BLOCK_M,
                          STAT_BLOCK)


@triton.jit(do_not_specialize=_ANY_SIZE)
def _conv_dgrad_kernel(dy_ptr, w_ptr, dx_ptr, x_ptr, scale_ptr, shift_ptr, part_ptr, M, C, H, W, K, P,
                       sdN, sdH, sdW, sxN, sxH, sxW,
                       R: tl.constexpr, PROLOGUE: tl.constexpr, KIND: tl.constexpr, FAST: tl.constexpr,
                       STAT_BLOCK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, CT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """da (M, C) = implicit GEMM of dy (N, H, W, K contiguous) with w (R*R*K, C) rows ordered (r, s, k): tap
    (r, s) reads dy at (h - dh, w - dw). dx is written through its strides (sdN, sdH, sdW); with PROLOGUE
    the epilogue reads x, multiplies by act'(z) and scale, and writes d shift / d scale partials."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < C
    base, h, w = _positions(offs_m, H * W, W, W * H * K, W * K, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=CT)
    k_steps = tl.cdiv(K, BLOCK_K)
    for it in range(0, R * R * k_steps):
        rs = it // k_steps
        k0 = (it - rs * k_steps) * BLOCK_K
        dh = R // 2 - rs // R
        dw = R // 2 - rs % R
        k = k0 + tl.arange(0, BLOCK_K)
        g = _load_input(dy_ptr, scale_ptr, shift_ptr, base, h, w, m_ok, dh, dw, H, W, W * K, K, k, K,
                        False, 0, False, CT)
        b = tl.load(w_ptr + (rs * K + k)[:, None] * C + offs_n[None, :], mask=(k < K)[:, None] & n_ok[None, :],
                    other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(g, b, acc, input_precision=PRECISION)
    mask = m_ok[:, None] & n_ok[None, :]
    dx_off, _, _ = _positions(offs_m, H * W, W, sdN, sdH, sdW)
    dx = acc
    if PROLOGUE:
        x_off, _, _ = _positions(offs_m, H * W, W, sxN, sxH, sxW)
        x = tl.load(x_ptr + x_off[:, None] + offs_n[None, :], mask=mask, other=0.0).to(CT)
        sc = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0).to(CT)
        sh = tl.load(shift_ptr + offs_n, mask=n_ok, other=0.0).to(CT)
        dz = tl.where(mask, acc * _act_grad(x * sc[None, :] + sh[None, :], KIND, FAST), 0.0)
        dx = dz * sc[None, :]
        _channel_partials(part_ptr, tl.sum(dz * x, axis=0), tl.sum(dz, axis=0), pid_m, P, offs_n, C, BLOCK_M,
                          STAT_BLOCK)
    tl.store(dx_ptr + dx_off[:, None] + offs_n[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_ANY_SIZE[:3])
def _conv_wgrad_kernel(dy_ptr, x_ptr, scale_ptr, shift_ptr, part_ptr, M, C, H, W, K, rows_per_split,
                       sxN, sxH, sxW,
                       R: tl.constexpr, PROLOGUE: tl.constexpr, KIND: tl.constexpr, FAST: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr, CT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program: a BLOCK_M (output channels k) x BLOCK_N (input channels c of one tap) tile of dw, summed
    over rows [split * rows_per_split, +rows_per_split) in BLOCK_K steps; written to part (splits, K, R*R*C)
    with columns ordered (r, s, c)."""
    k_blocks = tl.cdiv(K, BLOCK_M)
    c_blocks = tl.cdiv(C, BLOCK_N)
    pid = tl.program_id(0)
    pid_k = pid % k_blocks
    pid_c = (pid // k_blocks) % c_blocks
    rs = pid // (k_blocks * c_blocks)
    dh = rs // R - R // 2
    dw = rs % R - R // 2
    split = tl.program_id(1)
    offs_k = pid_k * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=CT)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    for m0 in range(start, end, BLOCK_K):
        offs_m = m0 + tl.arange(0, BLOCK_K)
        m_ok = offs_m < end
        g = tl.load(dy_ptr + offs_m.to(tl.int64)[None, :] * K + offs_k[:, None],
                    mask=m_ok[None, :] & k_ok[:, None], other=0.0)
        base, h, w = _positions(offs_m, H * W, W, sxN, sxH, sxW)
        a = _load_input(x_ptr, scale_ptr, shift_ptr, base, h, w, m_ok, dh, dw, H, W, sxH, sxW, c, C,
                        PROLOGUE, KIND, FAST, CT)
        if UPCAST:
            g = g.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(g, a, acc, input_precision=PRECISION)
    cols = rs * C + c
    out = part_ptr + split.to(tl.int64) * K * (R * R * C) + offs_k[:, None] * (R * R * C) + cols[None, :]
    tl.store(out, acc, mask=k_ok[:, None] & (c < C)[None, :])


# ---------------------------------------------------------------- tile configs and autotuning

def _cfg(bm, bn, bk, stages, warps, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_stages=stages,
                         num_warps=warps)


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps): Hopper-sized tiles; a pruning step drops the ones wider than
# the problem (64 output channels never take BLOCK_N 128). Not yet measured: dev/conv_bench.py prints the
# autotuner's choice per shape.
CONFIGS = [_cfg(128, 128, 64, 3, 8), _cfg(128, 128, 32, 4, 8), _cfg(128, 64, 64, 3, 4), _cfg(128, 64, 32, 4, 4),
           _cfg(64, 128, 64, 3, 4), _cfg(64, 64, 64, 4, 4), _cfg(64, 64, 32, 3, 4), _cfg(128, 128, 64, 4, 8)]
STAT_BLOCK = 64  # the smallest BLOCK_M of CONFIGS: rows of the per-channel partial sums


def _cap(n: int) -> int:
    return max(64, triton.next_power_of_2(n))


def _prune(n_name: str, k_name: str | None, m_name: str | None = None):
    """Drop configs whose BLOCK_N (BLOCK_K, BLOCK_M) exceed the GEMM's N (reduction channels, M) rounded up."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kept = [cfg for cfg in configs
                if cfg.kwargs["BLOCK_N"] <= _cap(args[n_name])
                and (k_name is None or cfg.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(args[k_name])))
                and (m_name is None or cfg.kwargs["BLOCK_M"] <= _cap(args[m_name]))]
        return kept or configs[-1:]
    return prune


def _quick_bench(kernel_call, quantiles):
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


_KEY = ["M", "C", "K", "H", "W", "sxW", "R", "PROLOGUE", "KIND", "PRECISION"]
_fwd_tuned = triton.autotune(CONFIGS, key=_KEY + ["STATS"], prune_configs_by={"early_config_prune": _prune("K", "C")},
                             do_bench=_quick_bench)(_conv_fwd_kernel)
_dgrad_tuned = triton.autotune(CONFIGS, key=_KEY + ["sdW"], prune_configs_by={"early_config_prune": _prune("C", "K")},
                               do_bench=_quick_bench)(_conv_dgrad_kernel)
_WGRAD_CONFIGS = [triton.Config({k: v for k, v in cfg.kwargs.items() if k != "GROUP_M"}, num_stages=cfg.num_stages,
                                num_warps=cfg.num_warps) for cfg in CONFIGS]
_wgrad_tuned = triton.autotune(_WGRAD_CONFIGS, key=_KEY + ["rows_per_split"],
                               prune_configs_by={"early_config_prune": _prune("C", None, "K")},
                               do_bench=_quick_bench)(_conv_wgrad_kernel)


def autotuning() -> bool:
    """Autotune on a GPU unless CUDACNN_CONV_AUTOTUNE=0; never under the interpreter (every config would run
    through numpy)."""
    return not interpreting() and os.environ.get("CUDACNN_CONV_AUTOTUNE", "1") != "0"


def _fixed_config() -> dict:
    """Tiles when not autotuning. The interpreter's cost is per program and per op: few, wide tiles."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_stages=3, num_warps=4)


def _partials(shape, dtype, device) -> torch.Tensor:
    """Buffer for per-program partial sums; the kernels write every element."""
    return torch.empty(shape, dtype=dtype, device=device)


def _stat_block() -> int:
    return _fixed_config()["BLOCK_M"] if not autotuning() else STAT_BLOCK


def _launch(tuned, kernel, grid, args, meta):
    """The autotuned kernel, or the plain one at the fixed config; grid(meta) -> launch grid."""
    if autotuning():
        tuned[grid](*args, **meta)
    else:
        fixed = _fixed_config()
        if kernel is _conv_wgrad_kernel:
            fixed.pop("GROUP_M")
        kernel[grid(fixed)](*args, **meta, **fixed)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _common_meta(x: torch.Tensor, activation: str, allow_tf32: bool) -> dict:
    ct = tl.float64 if x.dtype == torch.float64 else tl.float32
    precision = "tf32" if (x.dtype == torch.float32 and allow_tf32 and not interpreting()) else "ieee"
    return dict(KIND=activation_code(activation), FAST=x.dtype in (torch.float16, torch.bfloat16),
                UPCAST=interpreting() and x.dtype == torch.bfloat16, PRECISION=precision, CT=ct)


def _stride1_view(x: torch.Tensor, stride: int) -> torch.Tensor:
    """The input positions a 1x1 convolution of this stride reads (a view, no copy)."""
    return x if stride == 1 else x[:, :, ::stride, ::stride]


def _gemm_rows(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, int, int, int]:
    """(the positions read, as _stride1_view, their height and width, and the GEMM's row count N*H*W)."""
    xs = _stride1_view(x, stride)
    h, w = xs.shape[2:]
    return xs, h, w, x.shape[0] * h * w


def _nhwc_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(2), t.stride(3)


def _weight_rows(weight: torch.Tensor, reduce_dim: int) -> torch.Tensor:
    """weight (K, C, R, S) as the GEMM's B: rows (r, s, c) x columns k for the forward (reduce_dim=1),
    rows (r, s, k) x columns c for dgrad (reduce_dim=0). A small copy (weights are at most 2.4 M values)."""
    other = 1 - reduce_dim
    return weight.permute(2, 3, reduce_dim, other).contiguous()


def forward(x, weight, scale, shift, stride: int, padding: int, activation: str, stats: bool,
            allow_tf32: bool = False):
    """(y channels_last in x's dtype, sums (2, K) float32 or None) by the Triton kernels; the caller checked
    dispatch(...) == "triton" and check_inputs."""
    N, C, _, _ = x.shape
    K, _, R, _ = weight.shape
    xs, H, W, M = _gemm_rows(x, stride)
    y = torch.empty((N, K, H, W), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    stat_block = _stat_block()
    P = triton.cdiv(M, stat_block)
    cd = _compute_dtype(x)
    part = _partials((P, 2, K) if stats else (1,), cd, x.device)
    prologue = scale is not None
    args = (xs, _weight_rows(weight, 1), y, scale if prologue else x, shift if prologue else x, part,
            M, C, H, W, K, P, *_nhwc_strides(xs))
    meta = dict(R=R, PROLOGUE=prologue, STATS=stats, STAT_BLOCK=stat_block, **_common_meta(x, activation, allow_tf32))
    _launch(_fwd_tuned, _conv_fwd_kernel, lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(K, m["BLOCK_N"]),),
            args, meta)
    return y, (part.sum(0) if stats else None)


def input_grad(grad_y, x, weight, scale, shift, stride: int, activation: str, allow_tf32: bool = False):
    """(dx, dscale, dshift) by the dgrad kernel; dscale/dshift None without a prologue. grad_y already holds
    the statistics' part (stats_gradient)."""
    C = x.shape[1]
    K, _, R, _ = weight.shape
    dy = grad_y.contiguous(memory_format=torch.channels_last)
    xs, H, W, M = _gemm_rows(x, stride)
    dx = torch.empty_like(x, memory_format=torch.channels_last) if stride == 1 else \
        torch.zeros_like(x, memory_format=torch.channels_last)  # positions a strided 1x1 conv skips: zero
    dxs = _stride1_view(dx, stride)
    prologue = scale is not None
    stat_block = _stat_block()
    P = triton.cdiv(M, stat_block)
    part = _partials((P, 2, C) if prologue else (1,), _compute_dtype(x), x.device)
    args = (dy, _weight_rows(weight, 0), dxs, xs, scale if prologue else x, shift if prologue else x, part,
            M, C, H, W, K, P, *_nhwc_strides(dxs), *_nhwc_strides(xs))
    meta = dict(R=R, PROLOGUE=prologue, STAT_BLOCK=stat_block, **_common_meta(x, activation, allow_tf32))
    _launch(_dgrad_tuned, _conv_dgrad_kernel,
            lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(C, m["BLOCK_N"]),), args, meta)
    if not prologue:
        return dx, None, None
    sums = part.sum(0)
    return dx, sums[0].to(scale.dtype, copy=True), sums[1].to(shift.dtype, copy=True)  # no aliasing outputs


def _splits(M: int, tiles: int, device: torch.device) -> int:
    """Programs along the rows for wgrad: about 4 waves of the GPU over its output tiles, at least 512 rows
    each."""
    if device.type != "cuda":
        return min(3, triton.cdiv(M, 64))  # the interpreter: a few, so the partial sum is exercised
    return max(1, min(triton.cdiv(4 * _multiprocessors(device), tiles), triton.cdiv(M, 512)))


def weight_grad(grad_y, x, weight, scale, shift, stride: int, activation: str, allow_tf32: bool = False):
    """dw (weight's shape, dtype and layout) by the wgrad kernel."""
    C = x.shape[1]
    K, _, R, _ = weight.shape
    dy = grad_y.contiguous(memory_format=torch.channels_last)
    xs, H, W, M = _gemm_rows(x, stride)
    splits = _splits(M, triton.cdiv(K, 64) * R * R * triton.cdiv(C, 64), x.device)
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), 64) * 64  # a multiple of every BLOCK_K
    splits = triton.cdiv(M, rows_per_split)
    part = _partials((splits, K, R * R * C), _compute_dtype(x), x.device)
    prologue = scale is not None
    args = (dy, xs, scale if prologue else x, shift if prologue else x, part, M, C, H, W, K, rows_per_split,
            *_nhwc_strides(xs))
    meta = dict(R=R, PROLOGUE=prologue, **_common_meta(x, activation, allow_tf32))
    _launch(_wgrad_tuned, _conv_wgrad_kernel,
            lambda m: (triton.cdiv(K, m["BLOCK_M"]) * R * R * triton.cdiv(C, m["BLOCK_N"]), splits), args, meta)
    dw = torch.empty_like(weight)
    return dw.copy_(part.sum(0).view(K, R, R, C).permute(0, 3, 1, 2))
