"""Elementwise activations relu, gelu (exact and tanh), silu: forward and backward.

One Triton kernel per direction; the activation is a compile-time constant, so each kind compiles to its
own straight-line kernel. Math runs in float32 whatever the storage dtype. The `_act_fwd`/`_act_bwd`
helpers are shared with the GEMM epilogue (gemm.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._launch import launch
from ._runtime import HAS_TRITON, check_out, interpreting, tl, triton, use_triton, write_contiguous

BUILT_FOR_INTERPRETER = interpreting()

KINDS = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)


def activation_code(kind: str) -> int:
    if kind not in KINDS:
        raise ValueError(f"unknown activation {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind]


# ---------------------------------------------------------------- reference (plain PyTorch)

def reference_forward(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "none":
        return x.clone()
    if kind == "relu":
        return F.relu(x)
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {kind!r}")


def reference_backward(grad_out: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    xf, g = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, grad_out
    if kind == "none":
        d = torch.ones_like(xf)
    elif kind == "relu":
        d = (xf > 0).to(xf.dtype)
    elif kind == "gelu":
        d = 0.5 * (1 + torch.erf(xf * _SQRT1_2)) + xf * torch.exp(-0.5 * xf * xf) * _INV_SQRT_2PI
    elif kind == "gelu_tanh":
        t = torch.tanh(_TANH_C * (xf + 0.044715 * xf ** 3))
        d = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * _TANH_C * (1 + 3 * 0.044715 * xf * xf)
    elif kind == "silu":
        s = torch.sigmoid(xf)
        d = s * (1 + xf * (1 - s))
    else:
        raise ValueError(f"unknown activation {kind!r}")
    return (g.to(d.dtype) * d).to(grad_out.dtype)


# ---------------------------------------------------------------- Triton

@triton.jit
def _tanh(u):
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


# The GPU's approximate reciprocal (one MUFU instruction, denormals flushed; `1.0 / x` compiles to a full
# division) through inline PTX; the interpreter, which cannot run PTX, takes the plain division.
# tl.exp2 needs no such help: it already compiles to ex2.approx.ftz.f32 (checked in Triton 3.6 and 3.9 PTX).
PTX_MATH = tl.constexpr(not BUILT_FOR_INTERPRETER) if HAS_TRITON else False


@triton.jit
def _rcp_approx(x):
    if PTX_MATH:
        y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        y = 1.0 / x
    return y


@triton.jit
def _normal_cdf_fast(x):
    """(Phi(x), exp(-x^2 / 2)) for results rounded to bf16/fp16: Abramowitz & Stegun 7.1.26 written as
    erfc(|x| / sqrt 2) = poly(t) exp(-x^2 / 2), |error of Phi| < 1e-7 in exact arithmetic (float32 rounding
    makes it about 3e-7), with no cancellation for x < 0 (relative error 5e-5 at x = -3, growing in the far
    tail, where GELU is below 1e-20). About 14
    instructions against 27 for 0.5 (1 + erf) with IEEE-style division and exp: the GEMM's GELU epilogue is
    compute-bound."""
    t = _rcp_approx(1.0 + 0.23164189699792618 * tl.abs(x))  # 0.3275911 / sqrt 2
    half_poly = t * (0.127414796 + t * (-0.142248368 + t * (0.7107068705 + t * (-0.7265760135
                                                                                  + t * 0.5307027145))))
    gauss = tl.exp2(x * (x * -0.7213475204444817))  # exp(-x^2 / 2) = 2^(-x^2 log2(e) / 2)
    tail = half_poly * gauss  # Phi(-|x|)
    return tl.where(x < 0.0, tail, 1.0 - tail), gauss


@triton.jit
def _act_fwd(x, KIND: tl.constexpr, FAST: tl.constexpr = False):
    """x is float32; FAST: the output is 16-bit (see _normal_cdf_fast)."""
    y = x
    if KIND == 1:
        y = tl.maximum(x, 0.0)
    elif KIND == 2:
        if FAST:
            y = x * _normal_cdf_fast(x)[0]
        else:
            y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif KIND == 3:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif KIND == 4:
        y = x * tl.sigmoid(x)
    return y


@triton.jit
def _act_grad(x, KIND: tl.constexpr, FAST: tl.constexpr = False):
    """d act / dx at x (float32)."""
    d = tl.full(x.shape, 1.0, tl.float32)
    if KIND == 1:
        d = tl.where(x > 0.0, 1.0, 0.0)
    elif KIND == 2:
        if FAST:
            cdf, gauss = _normal_cdf_fast(x)
            d = cdf + x * gauss * 0.3989422804014327
        else:
            d = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif KIND == 3:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif KIND == 4:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    return d


@triton.jit
def _activation_fwd_kernel(x_ptr, y_ptr, n, KIND: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _act_fwd(x, KIND, FAST).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activation_bwd_kernel(g_ptr, x_ptr, dx_ptr, n, KIND: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, (g * _act_grad(x, KIND, FAST)).to(dx_ptr.dtype.element_ty), mask=mask)


def _launch_config(kernel, kind: str, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps): 16 elements a thread keep enough loads in flight to saturate HBM. The exact GELU
    forward in 16 bits was compute-heavy for its 4 bytes an element with the earlier erf formula: 64 elements
    a thread in 4-warp programs reached 0.92 of copy bandwidth on an H200 against 0.81 for (4096, 8)
    (benchmarks/kernels.md, exact-GELU launch shape; not re-swept since _normal_cdf_fast halved its
    instructions)."""
    if interpreting():
        return 256, 4
    if kernel is _activation_fwd_kernel and kind == "gelu" and dtype != torch.float32:
        return 8192, 4
    return 4096, 8


def _elementwise(kernel, inputs, out, kind):
    n = inputs[0].numel()

    def run(flat_out):
        if n:
            block, warps = _launch_config(kernel, kind, out.dtype)
            launch(kernel, (-(-n // block),), *inputs, flat_out, n, KIND=activation_code(kind),
                   FAST=out.dtype != torch.float32, BLOCK=block, num_warps=warps)

    return write_contiguous(out, run)


def activation_forward(x: torch.Tensor, kind: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = act(x), same shape and dtype as x; writes into `out` when given."""
    activation_code(kind)
    out = check_out(out, x.shape, x.dtype, x.device)
    if not use_triton(x) or x.dtype == torch.float64:
        return out.copy_(reference_forward(x, kind))
    return _elementwise(_activation_fwd_kernel, [x.contiguous()], out, kind)


def activation_backward(grad_out: torch.Tensor, x: torch.Tensor, kind: str,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """dx = grad_out * act'(x). For relu, x may also be the forward output (same sign)."""
    activation_code(kind)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out shape {tuple(grad_out.shape)} != x shape {tuple(x.shape)}")
    out = check_out(out, x.shape, grad_out.dtype, x.device)
    if not use_triton(x) or x.dtype == torch.float64:
        return out.copy_(reference_backward(grad_out, x, kind))
    return _elementwise(_activation_bwd_kernel, [grad_out.contiguous(), x.contiguous()], out, kind)
