"""Fused softmax + cross-entropy with label smoothing: one pass over the logits computes the loss and
writes the gradient.

With smoothing eps over C classes the target distribution is (1 - eps) one-hot + eps / C, so
    loss_r = logsumexp(x_r) - (1 - eps) x_r[t_r] - eps / C * sum_j x_r[j]
    dloss_r / dx_r[j] = softmax(x_r)[j] - (1 - eps) [j == t_r] - eps / C          (times 1/R for 'mean')
Each program owns a tile of BLOCK_R rows: for CIFAR's 10 classes that is hundreds of rows a program, so
the grid stays small and the loads wide. Rows wider than one tile loop over column chunks with an online
max/sum, then a second loop writes the gradient. Each program writes one partial loss sum (no atomics:
the result is deterministic)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._launch import launch
from ._runtime import check_out, interpreting, tl, triton, use_triton

BUILT_FOR_INTERPRETER = interpreting()

REDUCTIONS = ("mean", "sum")


def reference_cross_entropy(logits, targets, label_smoothing=0.0, reduction="mean"):
    return F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                           targets, label_smoothing=label_smoothing, reduction=reduction)


def reference_grad(logits, targets, label_smoothing=0.0, reduction="mean"):
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    n, c = x.shape
    g = torch.softmax(x, dim=1) - label_smoothing / c
    g[torch.arange(n), targets] -= 1.0 - label_smoothing
    if reduction == "mean":
        g = g / n
    return g.to(logits.dtype)


@triton.jit
def _ce_kernel(x_ptr, t_ptr, g_ptr, partial_ptr, R, C, stride_r, stride_c, g_stride_r, g_stride_c,
               smoothing, grad_scale, WRITE_GRAD: tl.constexpr, SINGLE_TILE: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    target = tl.load(t_ptr + rows, mask=row_ok, other=0)
    cols = tl.arange(0, BLOCK_C)
    x_row = x_ptr + rows64[:, None] * stride_r
    g_row = g_ptr + rows64[:, None] * g_stride_r
    off_target = smoothing / C
    on_target = 1.0 - smoothing

    if SINGLE_TILE:  # the whole row lives in registers: one read, one write
        mask = row_ok[:, None] & (cols[None, :] < C)
        x = tl.load(x_row + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(cols[None, :] < C, x, float("-inf"))
        row_max = tl.max(x, axis=1)
        e = tl.exp(x - row_max[:, None])
        row_sum = tl.sum(e, axis=1)
        x_target = tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), axis=1)
        x_total = tl.sum(tl.where(cols[None, :] < C, x, 0.0), axis=1)
        if WRITE_GRAD:
            g = e / row_sum[:, None] - off_target - tl.where(cols[None, :] == target[:, None], on_target, 0.0)
            tl.store(g_row + cols[None, :] * g_stride_c, (g * grad_scale).to(g_ptr.dtype.element_ty), mask=mask)
    else:  # wide rows: online softmax over column chunks, then a second sweep for the gradient
        row_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_R,), tl.float32)
        x_target = tl.zeros((BLOCK_R,), tl.float32)
        x_total = tl.zeros((BLOCK_R,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            mask = row_ok[:, None] & (c[None, :] < C)
            x = tl.load(x_row + c[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
            x = tl.where(c[None, :] < C, x, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(x, axis=1))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
            row_max = new_max
            x_target += tl.sum(tl.where(c[None, :] == target[:, None], x, 0.0), axis=1)
            x_total += tl.sum(tl.where(c[None, :] < C, x, 0.0), axis=1)
        if WRITE_GRAD:
            for c0 in range(0, C, BLOCK_C):
                c = c0 + cols
                mask = row_ok[:, None] & (c[None, :] < C)
                x = tl.load(x_row + c[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - row_max[:, None]) / row_sum[:, None] - off_target
                g -= tl.where(c[None, :] == target[:, None], on_target, 0.0)
                tl.store(g_row + c[None, :] * g_stride_c, (g * grad_scale).to(g_ptr.dtype.element_ty), mask=mask)

    loss = row_max + tl.log(row_sum) - on_target * x_target - off_target * x_total
    # scaled here as the gradient is (1/R for a mean), so the host's sum of the partials is the loss
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(row_ok, loss, 0.0), axis=0) * grad_scale)


def _tile(C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): about 4K elements a program."""
    cap = 64 if interpreting() else 4096
    block_c = min(triton.next_power_of_2(max(C, 1)), cap)
    block_r = max(1, cap // block_c)
    if interpreting():
        block_r = min(block_r, 8)
    return block_r, block_c, 4 if block_c * block_r <= 2048 else 8


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                          reduction: str = "mean", return_grad: bool = False,
                          grad_out: torch.Tensor | None = None):
    """Loss (float32 scalar) of logits (R, C) against class indices targets (R,), in [0, C) (not checked:
    checking costs a device sync). With return_grad, also d loss / d logits (dtype of logits), written
    by the same kernel, into `grad_out` when given."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"need logits (R, C) and targets (R,); got {tuple(logits.shape)}, {tuple(targets.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
    R, C = logits.shape
    if grad_out is not None:
        check_out(grad_out, logits.shape, logits.dtype, logits.device)
    if not use_triton(logits) or logits.dtype == torch.float64 or R == 0:
        loss = reference_cross_entropy(logits, targets, label_smoothing, reduction)
        if not return_grad:
            return loss
        grad = reference_grad(logits, targets, label_smoothing, reduction)
        return loss, (grad if grad_out is None else grad_out.copy_(grad))

    grad = torch.empty_like(logits) if grad_out is None else grad_out
    block_r, block_c, warps = _tile(C)
    n_programs = -(-R // block_r)  # triton.cdiv is a constexpr_function, slow on the host
    partial = torch.empty(n_programs, dtype=torch.float32, device=logits.device)
    scale = 1.0 / R if reduction == "mean" else 1.0
    launch(_ce_kernel, (n_programs,), logits, targets, grad, partial, R, C, logits.stride(0), logits.stride(1),
           grad.stride(0), grad.stride(1), float(label_smoothing), scale, WRITE_GRAD=return_grad,
           SINGLE_TILE=C <= block_c, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    loss = partial.sum()
    return (loss, grad) if return_grad else loss
