"""Triton kernels the engine adds on top of cudacnn.kernels (GEMM, activations): convolution lowering,
pooling, reductions, BatchNorm, dropout, softmax, the fused loss, optimizer updates and data movement.

Each kernel has a NumPy twin of the same name in cpu_ops.py, which is both the CPU backend and the
reference the tests compare against. The launch wrappers (allocation, grids) live in gpu_ops.py.

4-D activations are dense in one of two memory orders, NCHW or NHWC ("channels last", what a GEMM
over im2col rows produces); CL says which, and kernels walk the output in memory order so that
writes are coalesced.
"""

from __future__ import annotations

import triton
import triton.language as tl

from cudacnn.kernels._runtime import interpreting

BUILT_FOR_INTERPRETER = interpreting()


@triton.jit
def _decode_nchw(idx, C, H, W, CL: tl.constexpr):
    """(n, c, h, w) of the element at flat memory index idx of a dense NCHW or NHWC tensor."""
    if CL:
        c = idx % C
        w = (idx // C) % W
        h = (idx // (C * W)) % H
        n = idx // (C * W * H)
    else:
        w = idx % W
        h = (idx // W) % H
        c = (idx // (W * H)) % C
        n = idx // (W * H * C)
    return n, c, h, w


# -- convolution lowering ---------------------------------------------------------------------------
@triton.jit
def im2col_kernel(x_ptr, cols_ptr, C, H, W, OH, OW, M, K, sxn, sxc, sxh, sxw, stride, pad,
                  KH: tl.constexpr, KW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """cols[m, k] = x[n, c, oh*stride - pad + kh, ow*stride - pad + kw] (0 outside), with
    m = (n, oh, ow) and k = (c, kh, kw): the layout of a torch conv weight reshaped to (F, C*KH*KW)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    ow = m % OW
    oh = (m // OW) % OH
    n = m // (OW * OH)
    kw = k % KW
    kh = (k // KW) % KH
    c = k // (KW * KH)
    h = oh * stride - pad + kh
    w = ow * stride - pad + kw
    inside = (m < M) & (k < K) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    value = tl.load(x_ptr + n * sxn + c * sxc + h * sxh + w * sxw, mask=inside, other=0.0)
    tl.store(cols_ptr + m * K + k, value, mask=(m < M) & (k < K))


@triton.jit
def col2im_kernel(dcols_ptr, dx_ptr, total, C, H, W, OH, OW, K, stride, pad,
                  KH: tl.constexpr, KW: tl.constexpr, CL: tl.constexpr, BLOCK: tl.constexpr):
    """The adjoint of im2col, as a gather: each dx element sums the cols entries that copied it."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    n, c, h, w = _decode_nchw(idx, C, H, W, CL)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            th = h + pad - kh
            tw = w + pad - kw
            oh = th // stride
            ow = tw // stride
            hit = live & (th >= 0) & (tw >= 0) & (th % stride == 0) & (tw % stride == 0) & (oh < OH) & (ow < OW)
            row = (n * OH + oh) * OW + ow
            col = (c * KH + kh) * KW + kw
            acc += tl.load(dcols_ptr + row * K + col, mask=hit, other=0.0)
    tl.store(dx_ptr + idx, acc, mask=live)


# -- pooling ------------------------------------------------------------------------------------------
@triton.jit
def maxpool_forward_kernel(x_ptr, out_ptr, arg_ptr, total, C, OH, OW, sxn, sxc, sxh, sxw, stride,
                           KS: tl.constexpr, CL: tl.constexpr, BLOCK: tl.constexpr):
    """out = max over each KS x KS window; arg = the winner's position in its window (kh * KS + kw)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    n, c, oh, ow = _decode_nchw(idx, C, OH, OW, CL)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK], dtype=tl.int32)
    base = x_ptr + n * sxn + c * sxc
    for kh in tl.static_range(KS):
        for kw in tl.static_range(KS):
            value = tl.load(base + (oh * stride + kh) * sxh + (ow * stride + kw) * sxw, mask=live,
                            other=float("-inf"))
            better = value > best  # strict: the first maximum wins, as in NumPy's argmax
            best = tl.where(better, value, best)
            arg = tl.where(better, kh * KS + kw, arg)
    tl.store(out_ptr + idx, best, mask=live)
    tl.store(arg_ptr + idx, arg.to(tl.int8), mask=live)


@triton.jit
def maxpool_backward_kernel(dy_ptr, arg_ptr, dx_ptr, total, C, H, W, OH, OW, syn, syc, syh, syw, stride,
                            KS: tl.constexpr, CL: tl.constexpr, BLOCK: tl.constexpr):
    """dx[h, w] = sum of dy over the windows whose winner was (h, w): a gather, no atomics."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    n, c, h, w = _decode_nchw(idx, C, H, W, CL)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = n * syn + c * syc
    for kh in tl.static_range(KS):
        for kw in tl.static_range(KS):
            th = h - kh
            tw = w - kw
            oh = th // stride
            ow = tw // stride
            hit = live & (th >= 0) & (tw >= 0) & (th % stride == 0) & (tw % stride == 0) & (oh < OH) & (ow < OW)
            offset = base + oh * syh + ow * syw
            won = tl.load(arg_ptr + offset, mask=hit, other=-1) == kh * KS + kw
            acc += tl.load(dy_ptr + offset, mask=hit & won, other=0.0)
    tl.store(dx_ptr + idx, acc, mask=live)


# -- reductions and BatchNorm -------------------------------------------------------------------------
@triton.jit
def column_sums_kernel(a_ptr, b_ptr, out_ptr, M, C, ROWS, HAS_B: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[:C] += column sums of a (M, C); out[C:] += column sums of a * b. A program sums ROWS rows
    and adds its partial sums atomically, so out must be zeroed first."""
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row0 = tl.program_id(0) * ROWS
    acc_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_ab = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(row0, row0 + ROWS, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)[:, None]
        mask = (rows < M) & (rows < row0 + ROWS) & (cols[None, :] < C)
        a = tl.load(a_ptr + rows * C + cols[None, :], mask=mask, other=0.0)
        acc_a += tl.sum(a, axis=0)
        if HAS_B:
            b = tl.load(b_ptr + rows * C + cols[None, :], mask=mask, other=0.0)
            acc_ab += tl.sum(a * b, axis=0)
    tl.atomic_add(out_ptr + cols, acc_a, mask=cols < C)
    if HAS_B:
        tl.atomic_add(out_ptr + C + cols, acc_ab, mask=cols < C)


@triton.jit
def batchnorm_stats_kernel(sums_ptr, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, C, M, eps,
                           momentum, TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    """Per-channel mean and 1/std: from the batch sums in training (and update the running stats with
    the unbiased variance, as torch does), from the running stats in eval."""
    c = tl.arange(0, BLOCK)
    live = c < C
    if TRAINING:
        mean = tl.load(sums_ptr + c, mask=live, other=0.0) / M
        var = tl.maximum(tl.load(sums_ptr + C + c, mask=live, other=0.0) / M - mean * mean, 0.0)
        running_mean = tl.load(running_mean_ptr + c, mask=live)
        running_var = tl.load(running_var_ptr + c, mask=live)
        unbiased = var * M / tl.maximum(M - 1, 1)
        tl.store(running_mean_ptr + c, (1 - momentum) * running_mean + momentum * mean, mask=live)
        tl.store(running_var_ptr + c, (1 - momentum) * running_var + momentum * unbiased, mask=live)
    else:
        mean = tl.load(running_mean_ptr + c, mask=live)
        var = tl.load(running_var_ptr + c, mask=live)
    tl.store(mean_ptr + c, mean, mask=live)
    tl.store(invstd_ptr + c, 1.0 / tl.sqrt(var + eps), mask=live)


@triton.jit
def batchnorm_forward_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, total, C,
                             BLOCK: tl.constexpr):
    """y = (x - mean) * invstd * gamma + beta over a channels-last (M, C) buffer."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    c = idx % C
    x = tl.load(x_ptr + idx, mask=live)
    scale = tl.load(invstd_ptr + c, mask=live) * tl.load(gamma_ptr + c, mask=live)
    shift = tl.load(beta_ptr + c, mask=live) - tl.load(mean_ptr + c, mask=live) * scale
    tl.store(y_ptr + idx, x * scale + shift, mask=live)


@triton.jit
def batchnorm_backward_kernel(dy_ptr, x_ptr, dx_ptr, sums_ptr, mean_ptr, invstd_ptr, gamma_ptr, total, C, M,
                              TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    """dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)); sums holds sum(dy), sum(dy * x)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    c = idx % C
    dy = tl.load(dy_ptr + idx, mask=live)
    invstd = tl.load(invstd_ptr + c, mask=live)
    scale = invstd * tl.load(gamma_ptr + c, mask=live)
    if TRAINING:
        mean = tl.load(mean_ptr + c, mask=live)
        sum_dy = tl.load(sums_ptr + c, mask=live)
        sum_dy_xhat = invstd * (tl.load(sums_ptr + C + c, mask=live) - mean * sum_dy)
        xhat = (tl.load(x_ptr + idx, mask=live) - mean) * invstd
        dx = scale * (dy - sum_dy / M - xhat * sum_dy_xhat / M)
    else:
        dx = scale * dy
    tl.store(dx_ptr + idx, dx, mask=live)


@triton.jit
def batchnorm_param_grads_kernel(sums_ptr, mean_ptr, invstd_ptr, dgamma_ptr, dbeta_ptr, C, BLOCK: tl.constexpr):
    c = tl.arange(0, BLOCK)
    live = c < C
    sum_dy = tl.load(sums_ptr + c, mask=live)
    mean = tl.load(mean_ptr + c, mask=live)
    invstd = tl.load(invstd_ptr + c, mask=live)
    tl.store(dgamma_ptr + c, invstd * (tl.load(sums_ptr + C + c, mask=live) - mean * sum_dy), mask=live)
    tl.store(dbeta_ptr + c, sum_dy, mask=live)


# -- elementwise --------------------------------------------------------------------------------------
@triton.jit
def fill_kernel(x_ptr, total, value, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + idx, tl.full([BLOCK], value, tl.float32).to(x_ptr.dtype.element_ty), mask=idx < total)


@triton.jit
def dropout_kernel(x_ptr, y_ptr, total, p, seed, BLOCK: tl.constexpr):
    """y = x * keep / (1 - p) with keep = (rand >= p) drawn from (seed, index): backward calls this same
    kernel with the same seed, so the mask is never stored."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    keep = tl.rand(seed, idx) >= p
    x = tl.load(x_ptr + idx, mask=live)
    tl.store(y_ptr + idx, tl.where(keep, x / (1 - p), 0.0), mask=live)


@triton.jit
def copy_4d_kernel(src_ptr, dst_ptr, total, S1, S2, S3, ss0, ss1, ss2, ss3, sd0, sd1, sd2, sd3,
                   BLOCK: tl.constexpr):
    """dst[i] = src[i] for 4-D tensors of any strides (logical row-major walk)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    i3 = idx % S3
    i2 = (idx // S3) % S2
    i1 = (idx // (S3 * S2)) % S1
    i0 = idx // (S3 * S2 * S1)
    value = tl.load(src_ptr + i0 * ss0 + i1 * ss1 + i2 * ss2 + i3 * ss3, mask=live)
    tl.store(dst_ptr + i0 * sd0 + i1 * sd1 + i2 * sd2 + i3 * sd3, value, mask=live)


@triton.jit
def gather_rows_kernel(src_ptr, index_ptr, dst_ptr, D, W, seed, FLIP: tl.constexpr, BLOCK: tl.constexpr):
    """dst[r] = src[index[r]], a batch from a device-resident data set. With FLIP, each row is mirrored
    along its last axis (width W) with probability 1/2: horizontal-flip augmentation for free."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < D
    source = tl.load(index_ptr + row).to(tl.int64)
    read = cols
    if FLIP:
        flip = tl.rand(seed, row + tl.zeros([BLOCK], tl.int32)) < 0.5  # one coin per row
        w = cols % W
        read = tl.where(flip, cols - w + (W - 1 - w), cols)
    tl.store(dst_ptr + row * D + cols, tl.load(src_ptr + source * D + read, mask=live), mask=live)


# -- softmax and the loss -----------------------------------------------------------------------------
@triton.jit
def softmax_forward_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * N + cols, mask=cols < N, other=float("-inf"))
    e = tl.exp(x - tl.max(x, axis=0))
    tl.store(y_ptr + row * N + cols, e / tl.sum(e, axis=0), mask=cols < N)


@triton.jit
def softmax_backward_kernel(dy_ptr, y_ptr, dx_ptr, N, BLOCK: tl.constexpr):
    """dx = y * (dy - sum(dy * y)): the softmax Jacobian applied row by row."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    dy = tl.load(dy_ptr + row * N + cols, mask=mask, other=0.0)
    y = tl.load(y_ptr + row * N + cols, mask=mask, other=0.0)
    tl.store(dx_ptr + row * N + cols, y * (dy - tl.sum(dy * y, axis=0)), mask=mask)


@triton.jit
def softmax_xent_kernel(logits_ptr, targets_ptr, grad_ptr, stats_ptr, N, inv_batch, BLOCK: tl.constexpr):
    """Per row: the cross-entropy of softmax(logits) against the target class, its gradient
    (softmax - onehot) / batch, and whether the argmax is right. stats[0] += loss / batch and
    stats[1] += correct, so an epoch's metrics stay on the device until it ends."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(logits_ptr + row * N + cols, mask=mask, other=float("-inf"))
    target = tl.load(targets_ptr + row).to(tl.int32)
    top = tl.max(x, axis=0)
    e = tl.exp(x - top)
    total = tl.sum(e, axis=0)
    x_target = tl.sum(tl.where(cols == target, x, 0.0), axis=0)
    loss = tl.log(total) + top - x_target
    grad = (e / total - tl.where(cols == target, 1.0, 0.0)) * inv_batch
    tl.store(grad_ptr + row * N + cols, grad, mask=mask)
    first_max = tl.min(tl.where(x == top, cols, BLOCK), axis=0)
    tl.atomic_add(stats_ptr, loss * inv_batch)
    tl.atomic_add(stats_ptr + 1, (first_max == target).to(tl.float32))


# -- optimizers ---------------------------------------------------------------------------------------
@triton.jit
def sgd_kernel(p_ptr, g_ptr, buf_ptr, total, lr, momentum, weight_decay, MOMENTUM: tl.constexpr,
               BLOCK: tl.constexpr):
    """torch.optim.SGD's update: g += wd * p; buf = momentum * buf + g; p -= lr * buf."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    p = tl.load(p_ptr + idx, mask=live)
    g = tl.load(g_ptr + idx, mask=live) + weight_decay * p
    if MOMENTUM:
        g = momentum * tl.load(buf_ptr + idx, mask=live) + g
        tl.store(buf_ptr + idx, g, mask=live)
    tl.store(p_ptr + idx, p - lr * g, mask=live)


@triton.jit
def adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, total, lr, beta1, beta2, eps, weight_decay, bias1, bias2,
                BLOCK: tl.constexpr):
    """torch.optim.Adam's update (L2 weight decay folded into g), bias corrections bias1 = 1 - beta1^t,
    bias2 = 1 - beta2^t precomputed on the host."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < total
    p = tl.load(p_ptr + idx, mask=live)
    g = tl.load(g_ptr + idx, mask=live) + weight_decay * p
    m = beta1 * tl.load(m_ptr + idx, mask=live) + (1 - beta1) * g
    v = beta2 * tl.load(v_ptr + idx, mask=live) + (1 - beta2) * g * g
    tl.store(m_ptr + idx, m, mask=live)
    tl.store(v_ptr + idx, v, mask=live)
    tl.store(p_ptr + idx, p - lr * (m / bias1) / (tl.sqrt(v / bias2) + eps), mask=live)


# -- split-K GEMM for weight gradients ----------------------------------------------------------------
@triton.jit
def gemm_split_k_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sam, sak, sbk, sbn, K_PER_SPLIT,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c (M, N) += a[:, ks] @ b[ks, :] for this program's slice ks of K; c must be zeroed first.
    A weight gradient (F, C*kh*kw) = dy_rows.T @ cols reduces over every output pixel of the batch
    (K ~ 10^5) into a few tiles: without splitting K, one or two SMs would do all the work."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(2) * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * sam + rk[None, :] * sak, mask=(rm[:, None] < M) & (rk[None, :] < k_end),
                    other=0.0)
        b = tl.load(b_ptr + rk[:, None] * sbk + rn[None, :] * sbn, mask=(rk[:, None] < k_end) & (rn[None, :] < N),
                    other=0.0)
        acc += tl.dot(a, b, input_precision="ieee")
    tl.atomic_add(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))
