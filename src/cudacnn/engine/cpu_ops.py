"""The CPU backend: every engine operation in NumPy. gpu_ops.py has the same functions on Triton kernels;
these double as the references its tests compare against.

Arrays are float32 NumPy arrays. Convolutions return channels-last views (the layout a GEMM over im2col
rows produces), like the GPU backend, so both backends take the same code path through the layers.
"""

from __future__ import annotations

import numpy as np

name = "cpu"


# -- arrays -------------------------------------------------------------------------------------------
def asarray(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float32, copy=False) if x.dtype.kind == "f" else x


def to_numpy(x) -> np.ndarray:
    return np.asarray(x)


def empty(shape) -> np.ndarray:
    return np.empty(shape, np.float32)


def zeros(shape) -> np.ndarray:
    return np.zeros(shape, np.float32)


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    dst[...] = src


def synchronize() -> None:
    pass


# -- matrix products and convolution lowering ---------------------------------------------------------
def matmul(a, b, bias=None, activation="none"):
    out = a @ b
    if bias is not None:
        out += bias
    return activation_forward(out, activation) if activation != "none" else out


def conv_out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def im2col(x, kh, kw, stride, pad):
    """(N, C, H, W) -> (N*OH*OW, C*kh*kw): row (n, oh, ow) holds the receptive field of that output."""
    n, c, h, w = x.shape
    oh, ow = conv_out_size(h, kh, stride, pad), conv_out_size(w, kw, stride, pad)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    sn, sc, sh, sw = xp.strides
    windows = np.lib.stride_tricks.as_strided(
        xp, (n, oh, ow, c, kh, kw), (sn, sh * stride, sw * stride, sc, sh, sw), writeable=False)
    return np.ascontiguousarray(windows).reshape(n * oh * ow, c * kh * kw)


def col2im(dcols, like, kh, kw, stride, pad):
    """The adjoint of im2col: scatter-add every row back onto the input positions it was copied from."""
    n, c, h, w = like.shape
    oh, ow = conv_out_size(h, kh, stride, pad), conv_out_size(w, kw, stride, pad)
    d = dcols.reshape(n, oh, ow, c, kh, kw)
    dxp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), np.float32)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += d[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, pad:pad + h, pad:pad + w]


def rows_to_nchw(rows, n, oh, ow):
    """(N*OH*OW, F) GEMM output -> (N, F, OH, OW) channels-last view, no copy."""
    return rows.reshape(n, oh, ow, -1).transpose(0, 3, 1, 2)


def nchw_to_rows(x):
    """(N, C, H, W) -> (N*H*W, C); a view when x is channels-last."""
    return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def column_sums(a):
    return a.sum(axis=0, dtype=np.float32)


# -- activations --------------------------------------------------------------------------------------
def _erf(x):
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): NumPy has no erf and SciPy is not a dependency
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def activation_forward(x, kind):
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "gelu":  # exact (erf) GELU, torch's default
        return (0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))).astype(np.float32)
    raise ValueError(f"unknown activation {kind!r}")


def activation_backward(dy, x, kind):
    if kind == "relu":
        return dy * (x > 0)
    if kind == "gelu":
        cdf = 0.5 * (1.0 + _erf(x / np.sqrt(2.0)))
        pdf = np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
        return (dy * (cdf + x * pdf)).astype(np.float32)
    raise ValueError(f"unknown activation {kind!r}")


# -- pooling ------------------------------------------------------------------------------------------
def _pool_windows(x, k, stride):
    n, c, h, w = x.shape
    oh, ow = conv_out_size(h, k, stride, 0), conv_out_size(w, k, stride, 0)
    sn, sc, sh, sw = x.strides
    windows = np.lib.stride_tricks.as_strided(x, (n, c, oh, ow, k, k), (sn, sc, sh * stride, sw * stride, sh, sw),
                                              writeable=False)
    return windows.reshape(n, c, oh, ow, k * k)


def maxpool2d(x, k, stride):
    """out = window maxima; arg = winner's position in its window (kh * k + kw), first maximum wins."""
    windows = _pool_windows(x, k, stride)
    arg = windows.argmax(axis=-1).astype(np.int8)
    return np.take_along_axis(windows, arg[..., None].astype(np.intp), -1)[..., 0], arg


def maxpool2d_backward(dy, arg, like, k, stride):
    n, c, oh, ow = dy.shape
    dx = np.zeros(like.shape, np.float32)
    for i in range(k):
        for j in range(k):
            dx[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += dy * (arg == i * k + j)
    return dx


# -- BatchNorm ----------------------------------------------------------------------------------------
def batchnorm_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training):
    """x (N, C, H, W); running stats are updated in place in training, as in torch."""
    if training:
        m = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.mean(axis=(0, 2, 3), dtype=np.float32)
        var = x.var(axis=(0, 2, 3), dtype=np.float32)
        running_mean *= 1 - momentum
        running_mean += momentum * mean
        running_var *= 1 - momentum
        running_var += momentum * var * m / max(m - 1, 1)
    else:
        mean, var = running_mean, running_var
    invstd = (1.0 / np.sqrt(var + eps)).astype(np.float32)
    scale = (gamma * invstd)[:, None, None]
    y = (x - mean[:, None, None]) * scale + beta[:, None, None]
    return y.astype(np.float32), (mean.copy(), invstd)


def batchnorm_backward(dy, x, saved, gamma, training):
    mean, invstd = saved
    c = (slice(None), None, None)
    xhat = (x - mean[c]) * invstd[c]
    dbeta = dy.sum(axis=(0, 2, 3), dtype=np.float32)
    dgamma = (dy * xhat).sum(axis=(0, 2, 3), dtype=np.float32)
    if not training:
        return dy * (gamma * invstd)[c], dgamma, dbeta
    m = x.shape[0] * x.shape[2] * x.shape[3]
    dx = (gamma * invstd)[c] * (dy - dbeta[c] / m - xhat * dgamma[c] / m)
    return dx.astype(np.float32), dgamma, dbeta


# -- dropout, softmax, loss ---------------------------------------------------------------------------
def dropout(x, p, seed):
    """Same seed, same mask: backward calls this on the gradient with the forward's seed."""
    keep = np.random.default_rng(seed).random(x.shape, dtype=np.float32) >= p
    return np.where(keep, x / np.float32(1 - p), np.float32(0)).astype(np.float32)


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def softmax_backward(dy, y):
    return y * (dy - (dy * y).sum(axis=1, keepdims=True))


def softmax_xent(logits, targets, stats):
    """Gradient of the mean cross-entropy w.r.t. logits; stats += [mean loss, number correct]."""
    b = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(b)
    stats[0] += -log_probs[rows, targets].mean()
    stats[1] += (logits.argmax(axis=1) == targets).sum()
    grad = np.exp(log_probs)
    grad[rows, targets] -= 1
    return (grad / b).astype(np.float32)


# -- data movement ------------------------------------------------------------------------------------
def flatten(x):
    return np.ascontiguousarray(x).reshape(x.shape[0], -1)


def unflatten(dy, like):
    return dy.reshape(like.shape)


def gather_rows(src, index, flip_seed=None):
    """A batch src[index]; with flip_seed, each image (N, C, H, W) is mirrored with probability 1/2."""
    batch = src[index]
    if flip_seed is not None:
        flip = np.random.default_rng(flip_seed).random(len(index)) < 0.5
        batch[flip] = batch[flip][..., ::-1]
    return batch


# -- optimizers ---------------------------------------------------------------------------------------
def sgd_step(p, g, buf, lr, momentum, weight_decay):
    g = g + weight_decay * p if weight_decay else g
    if buf is not None:
        buf *= momentum
        buf += g
        g = buf
    p -= lr * g


def adam_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    g = g + weight_decay * p if weight_decay else g
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * g * g
    p -= lr * (m / (1 - beta1 ** step)) / (np.sqrt(v / (1 - beta2 ** step)) + eps)
