"""The GPU backend: the functions of cpu_ops.py on our own kernels. Torch tensors serve only as raw
device storage carved from the engine's pool (memory.py); every computation is a Triton kernel, either
from cudacnn.kernels (GEMM, activations) or from gpu_kernels.py.

Layout rule: a gradient always has the memory order of the tensor it belongs to, so elementwise kernels
can walk both as flat buffers.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch
import triton

from cudacnn.engine import gpu_kernels as K
from cudacnn.engine.cpu_ops import conv_out_size
from cudacnn.engine.memory import default_pool
from cudacnn.kernels._runtime import interpreting as _interpreting

# the submodules themselves (the package re-exports functions of the same names)
kact = importlib.import_module("cudacnn.kernels.activations")
kgemm = importlib.import_module("cudacnn.kernels.gemm")

name = "cuda"
BLOCK = 1024  # elements per program for elementwise kernels


def _kernels():
    """gpu_kernels, rebuilt once if TRITON_INTERPRET changed after it was imported (triton picks compiled
    or interpreted kernels when the module is imported). reload re-executes the module in place."""
    if K.BUILT_FOR_INTERPRETER != _interpreting():
        importlib.reload(K)
    return K


def _block() -> int:
    return 128 if _interpreting() else BLOCK


def _grid(total: int):
    return (triton.cdiv(total, _block()),)


def _whole_block(n: int) -> int:
    """A power-of-two block that covers n in one program: all channels (BatchNorm) or a whole row (softmax)."""
    return triton.next_power_of_2(max(n, 16))


# -- arrays -------------------------------------------------------------------------------------------
def empty(shape, dtype=torch.float32, strides=None) -> torch.Tensor:
    return default_pool().empty(shape, dtype, strides)


def empty_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """Same shape and memory order as x (x must be dense)."""
    return empty(x.shape, dtype or x.dtype, x.stride())


def zeros(shape) -> torch.Tensor:
    out = empty(shape)
    fill(out, 0.0)
    return out


def fill(x: torch.Tensor, value: float) -> None:
    n = x.numel()
    if n:
        _kernels().fill_kernel[_grid(n)](flat(x), n, float(value), BLOCK=_block())


def asarray(x) -> torch.Tensor:
    """Upload a NumPy array (float -> float32; integer labels keep their type) into pool memory."""
    x = np.asarray(x)
    if x.dtype.kind == "f":
        x = x.astype(np.float32, copy=False)
    host = torch.from_numpy(np.ascontiguousarray(x))
    out = empty(host.shape, host.dtype)
    out.copy_(host)  # a host-to-device transfer, not a computation
    return out


def to_numpy(x: torch.Tensor) -> np.ndarray:
    # always a copy: under the interpreter the pool lives in host memory, and a NumPy view of a block
    # would change when the pool hands the block out again
    return x.detach().cpu().numpy().copy() if x.device.type == "cpu" else x.detach().cpu().numpy()


def copy_into(dst: torch.Tensor, src) -> None:
    dst.copy_(torch.as_tensor(src) if isinstance(src, np.ndarray) else src)


def synchronize() -> None:
    if torch.cuda.is_available() and not _interpreting():
        torch.cuda.synchronize()


def is_dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def flat(x: torch.Tensor) -> torch.Tensor:
    """The dense buffer behind x as a 1-D view (for kernels that do not care about the shape)."""
    assert is_dense(x), f"expected a dense tensor, got shape {tuple(x.shape)} strides {x.stride()}"
    return x.as_strided((x.numel(),), (1,))


# -- matrix products and convolution lowering ---------------------------------------------------------
allow_tf32 = False  # float32 GEMMs in full precision, so both backends agree to ~1e-6


def matmul(a, b, bias=None, activation="none"):
    m, k = a.shape
    n = b.shape[1]
    if bias is None and activation == "none" and k >= 4096 and triton.cdiv(m, 64) * triton.cdiv(n, 64) < 32:
        return matmul_split_k(a, b)
    if b.stride(1) != 1 and b.stride(0) == 1:
        # A transposed weight (the forward pass's W.T): hand the GEMM a row-major copy (weights of at most
        # 65k floats), so every engine GEMM reads B the same way, the layout measured fast on the H200.
        b = contiguous(b)
    out = empty((m, n))
    return kgemm.gemm(a, b, bias=bias, activation=activation, out=out, allow_tf32=allow_tf32)


def matmul_split_k(a, b):
    """a @ b for a small output and a long reduction (weight gradients): K is cut into slices that
    separate programs reduce in parallel, adding their partial tiles atomically."""
    m, k = a.shape
    n = b.shape[1]
    out = zeros((m, n))
    block = 16 if _interpreting() else 64
    tiles = triton.cdiv(m, block) * triton.cdiv(n, block)
    splits = max(1, min(triton.cdiv(k, 4 * block), 264 // tiles))  # ~2 programs per SM on an H100
    k_per_split = triton.cdiv(triton.cdiv(k, splits), 32) * 32
    grid = (triton.cdiv(m, block), triton.cdiv(n, block), triton.cdiv(k, k_per_split))
    _kernels().gemm_split_k_kernel[grid](a, b, out, m, n, k, *a.stride(), *b.stride(), k_per_split,
                                         BLOCK_M=block, BLOCK_N=block, BLOCK_K=16 if _interpreting() else 32)
    return out


def im2col(x, kh, kw, stride, pad):
    n, c, h, w = x.shape
    oh, ow = conv_out_size(h, kh, stride, pad), conv_out_size(w, kw, stride, pad)
    m, k = n * oh * ow, c * kh * kw
    cols = empty((m, k))
    block_m, block_k = (32, 16) if _interpreting() else (64, 32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
    _kernels().im2col_kernel[grid](x, cols, c, h, w, oh, ow, m, k, *x.stride(), stride, pad,
                                   KH=kh, KW=kw, BLOCK_M=block_m, BLOCK_K=block_k)
    return cols


def col2im(dcols, like, kh, kw, stride, pad):
    n, c, h, w = like.shape
    dx = empty_like(like)
    total = dx.numel()
    _kernels().col2im_kernel[_grid(total)](
        dcols, dx, total, c, h, w, conv_out_size(h, kh, stride, pad), conv_out_size(w, kw, stride, pad),
        dcols.shape[1], stride, pad, KH=kh, KW=kw, CL=is_channels_last(dx), BLOCK=_block())
    return dx


def rows_to_nchw(rows, n, oh, ow):
    """(N*OH*OW, F) -> (N, F, OH, OW) channels-last view, no copy."""
    return rows.view(n, oh, ow, -1).permute(0, 3, 1, 2)


def nchw_to_rows(x):
    """(N, C, H, W) channels-last -> (N*H*W, C) view; other layouts are copied to channels-last first."""
    if not is_channels_last(x) and not (x.shape[2] == x.shape[3] == 1):
        x = to_channels_last(x)
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def to_channels_last(x):
    n, c, h, w = x.shape
    out = empty(x.shape, strides=(h * w * c, 1, w * c, c))
    copy_strided(x, out)
    return out


def column_sums(a, b=None):
    """Column sums of a (M, C) contiguous; with b, also the column sums of a * b (stacked: (2, C))."""
    m, c = a.shape
    out = zeros((2 if b is not None else 1, c))
    block_m, block_c = (16, 32) if _interpreting() else (32, 64)
    rows = max(block_m, triton.cdiv(triton.cdiv(m, 264), block_m) * block_m)  # ~2 waves of programs
    grid = (triton.cdiv(m, rows), triton.cdiv(c, block_c))
    _kernels().column_sums_kernel[grid](a, b if b is not None else a, out, m, c, rows, HAS_B=b is not None,
                                        BLOCK_M=block_m, BLOCK_C=block_c)
    return out if b is not None else out[0]


# -- activations --------------------------------------------------------------------------------------
def activation_forward(x, kind):
    out = empty_like(x)
    kact.activation_forward(flat(x), kind, out=flat(out))
    return out


def activation_backward(dy, x, kind):
    assert dy.stride() == x.stride(), "a gradient must share its tensor's layout"
    out = empty_like(x)
    kact.activation_backward(flat(dy), flat(x), kind, out=flat(out))
    return out


# -- pooling ------------------------------------------------------------------------------------------
def maxpool2d(x, k, stride):
    n, c, h, w = x.shape
    oh, ow = conv_out_size(h, k, stride, 0), conv_out_size(w, k, stride, 0)
    cl = is_channels_last(x)
    strides = (oh * ow * c, 1, ow * c, c) if cl else None
    out = empty((n, c, oh, ow), strides=strides)
    arg = empty((n, c, oh, ow), torch.int8, strides=out.stride())
    total = out.numel()
    _kernels().maxpool_forward_kernel[_grid(total)](x, out, arg, total, c, oh, ow, *x.stride(), stride,
                                                    KS=k, CL=cl, BLOCK=_block())
    return out, arg


def maxpool2d_backward(dy, arg, like, k, stride):
    n, c, h, w = like.shape
    assert dy.stride() == arg.stride()
    dx = empty_like(like)
    total = dx.numel()
    _kernels().maxpool_backward_kernel[_grid(total)](dy, arg, dx, total, c, h, w, dy.shape[2], dy.shape[3],
                                                     *dy.stride(), stride, KS=k, CL=is_channels_last(dx),
                                                     BLOCK=_block())
    return dx


# -- BatchNorm ----------------------------------------------------------------------------------------
def batchnorm_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training):
    rows = nchw_to_rows(x)  # (M, C) channels-last view
    m, c = rows.shape
    mean, invstd = empty((c,)), empty((c,))
    sums = column_sums(rows, rows) if training else mean  # (unused in eval)
    _kernels().batchnorm_stats_kernel[(1,)](sums, mean, invstd, running_mean, running_var, c, m, eps, momentum,
                                            TRAINING=training, BLOCK=_whole_block(c))
    y_rows = empty((m, c))
    _kernels().batchnorm_forward_kernel[_grid(m * c)](rows, y_rows, mean, invstd, gamma, beta, m * c, c,
                                                      BLOCK=_block())
    return rows_to_nchw(y_rows, x.shape[0], x.shape[2], x.shape[3]), (mean, invstd, rows)


def batchnorm_backward(dy, x, saved, gamma, training):
    mean, invstd, rows = saved
    dy_rows = nchw_to_rows(dy)
    m, c = rows.shape
    sums = column_sums(dy_rows, rows)
    dgamma, dbeta = empty((c,)), empty((c,))
    _kernels().batchnorm_param_grads_kernel[(1,)](sums, mean, invstd, dgamma, dbeta, c, BLOCK=_whole_block(c))
    dx_rows = empty((m, c))
    _kernels().batchnorm_backward_kernel[_grid(m * c)](dy_rows, rows, dx_rows, sums, mean, invstd, gamma, m * c, c,
                                                       m, TRAINING=training, BLOCK=_block())
    dx = rows_to_nchw(dx_rows, x.shape[0], x.shape[2], x.shape[3])
    if dx.stride() != x.stride():  # x came in NCHW: hand back the gradient in x's layout
        out = empty_like(x)
        copy_strided(dx, out)
        dx = out
    return dx, dgamma, dbeta


# -- dropout, softmax, loss ---------------------------------------------------------------------------
def dropout(x, p, seed):
    y = empty_like(x)
    total = x.numel()
    _kernels().dropout_kernel[_grid(total)](flat(x), flat(y), total, float(p), int(seed), BLOCK=_block())
    return y


def softmax(x):
    b, n = x.shape
    y = empty((b, n))
    _kernels().softmax_forward_kernel[(b,)](contiguous(x), y, n, BLOCK=_whole_block(n))
    return y


def softmax_backward(dy, y):
    b, n = y.shape
    dx = empty((b, n))
    _kernels().softmax_backward_kernel[(b,)](contiguous(dy), y, dx, n, BLOCK=_whole_block(n))
    return dx


def softmax_xent(logits, targets, stats):
    """Gradient of the mean cross-entropy w.r.t. logits; stats (2,) += [mean loss, number correct]."""
    b, n = logits.shape
    grad = empty((b, n))
    _kernels().softmax_xent_kernel[(b,)](contiguous(logits), targets, grad, stats, n, 1.0 / b,
                                         BLOCK=_whole_block(n))
    return grad


# -- data movement ------------------------------------------------------------------------------------
def copy_strided(src, dst) -> None:
    """dst[...] = src for tensors of up to 4 dims and any strides."""
    shape = (1,) * (4 - src.dim()) + tuple(src.shape)
    ss = (0,) * (4 - src.dim()) + tuple(src.stride())
    sd = (0,) * (4 - dst.dim()) + tuple(dst.stride())
    total = src.numel()
    _kernels().copy_4d_kernel[_grid(total)](src, dst, total, shape[1], shape[2], shape[3], *ss, *sd,
                                            BLOCK=_block())


def contiguous(x):
    if x.is_contiguous():
        return x
    out = empty(x.shape)
    copy_strided(x, out)
    return out


def flatten(x):
    return contiguous(x).view(x.shape[0], -1)


def unflatten(dy, like):
    dy = dy.view(like.shape)
    if dy.stride() == like.stride():
        return dy
    out = empty_like(like)
    copy_strided(dy, out)
    return out


def gather_rows(src, index, flip_seed=None):
    """A batch src[index] (index: device int tensor); with flip_seed, images mirrored with probability 1/2."""
    b = index.shape[0]
    d = src[0].numel()
    out = empty((b,) + tuple(src.shape[1:]))
    block = 256 if _interpreting() else 1024
    _kernels().gather_rows_kernel[(b, triton.cdiv(d, block))](
        src, index, out, d, src.shape[-1], int(flip_seed or 0), FLIP=flip_seed is not None, BLOCK=block)
    return out


# -- optimizers ---------------------------------------------------------------------------------------
def sgd_step(p, g, buf, lr, momentum, weight_decay):
    total = p.numel()
    _kernels().sgd_kernel[_grid(total)](p, g, buf if buf is not None else p, total, float(lr), float(momentum),
                                        float(weight_decay), MOMENTUM=buf is not None, BLOCK=_block())


def adam_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    total = p.numel()
    _kernels().adam_kernel[_grid(total)](p, g, m, v, total, float(lr), float(beta1), float(beta2), float(eps),
                                         float(weight_decay), 1 - beta1 ** step, 1 - beta2 ** step,
                                         BLOCK=_block())
