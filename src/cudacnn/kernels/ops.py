"""torch.library custom ops over the kernels, so they run in eager mode, under autograd and inside
torch.compile (fake implementations give shapes; no graph breaks). The fused BatchNorm ops are triton_ops,
whose kernels torch.compile sees (see their section).

backend "triton": the Triton kernels. backend "cuda": the CUDA C++ GEMM (forward, bf16/fp16) and
activations, the Triton kernels elsewhere (GEMM backward, cross-entropy, BatchNorm). Without a GPU both fall
back to the PyTorch references with one warning (see _runtime.use_triton). conv2d_fused is a convolution
with the BatchNorm work around it fused in (kernels/conv.py); the zoo's models do not use it yet: their
convolutions stay PyTorch's (cuDNN), and batchnorm_act fuses what follows them."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import activations as _act
from . import batchnorm as _bn
from . import conv as _conv
from . import cross_entropy as _ce
from . import cuda_ext as _cuda
from . import planned as _planned
from . import pool_bn_act as _pba
from .gemm import gemm as _gemm_fn
from .gemm import gemm_backward as _gemm_backward_fn

BACKENDS = ("torch", "triton", "cuda")
# Activations whose derivative needs the pre-activation (relu's can be read off its output).
NEEDS_PRE_ACTIVATION = ("gelu", "gelu_tanh", "silu")


CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the CUDA C++ kernels are built for


def _use_cuda(backend: str, t: Tensor) -> bool:
    """The CUDA C++ kernels run this tensor; otherwise the Triton / reference path does (float64 included)."""
    return backend == "cuda" and t.is_cuda and t.dtype in CUDA_DTYPES and _cuda.cuda_available()


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# Eager calls go through one autograd.Function per op (_Linear, _Activation, _CrossEntropy, _BatchNormAct,
# _PoolBatchNormAct) that runs the op's kernels and formula without the dispatcher; traced calls (torch.compile,
# fake tensors) go through the ops. False: every call through the ops (tests run both).
DIRECT_EAGER = True


def _direct(x: Tensor) -> bool:
    """Whether this call may skip the dispatcher: eager, on a plain tensor, with no dispatch mode (fake
    tensors, FlopCounterMode) or functorch transform that must see the op."""
    return (DIRECT_EAGER and not torch.compiler.is_compiling() and type(x) is Tensor
            and _get_current_dispatch_mode() is None and not torch._C._are_functorch_transforms_active())


# ---------------------------------------------------------------- linear: y = act(x @ w^T + b)

def _linear_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, backend: str,
                 allow_tf32: bool, save_pre: bool) -> tuple[Tensor, Tensor]:
    b = weight.t()
    if _use_cuda(backend, x) and _cuda.gemm_supported(x, b):
        if not save_pre:
            return _cuda.cuda_gemm(x, b, bias, activation), _empty(x)
        pre = _cuda.cuda_gemm(x, b, bias, "none")
        return _cuda.cuda_activation_forward(pre, activation), pre
    pre = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device) if save_pre else None
    y = _gemm_fn(x, b, bias, activation, allow_tf32=allow_tf32, pre_activation_out=pre)
    return y, (pre if save_pre else _empty(x))


@torch.library.custom_op("cudacnn::linear", mutates_args=())
def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, backend: str,
            allow_tf32: bool, save_pre: bool) -> tuple[Tensor, Tensor]:
    return _linear_impl(x, weight, bias, activation, backend, allow_tf32, save_pre)


@_linear.register_fake
def _(x, weight, bias, activation, backend, allow_tf32, save_pre):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    return y, (torch.empty_like(y) if save_pre else x.new_empty((0,)))


def _linear_backward_impl(grad_y: Tensor, x: Tensor, weight: Tensor, saved: Tensor, activation: str, backend: str,
                          allow_tf32: bool, has_bias: bool, needs_x: bool,
                          needs_w: bool) -> tuple[Tensor, Tensor, Tensor]:
    grad_y = grad_y.contiguous()
    if activation != "none" and _use_cuda(backend, x):
        grad_y = _cuda.cuda_activation_backward(grad_y, saved, activation)
        activation = "none"
    gx, gw_t, gb = _gemm_backward_fn(grad_y, x, weight.t(), saved, activation, has_bias, allow_tf32,
                                       needs_a=needs_x, needs_b=needs_w)
    # gemm_backward returns d(w^T) (K, N) as the transposed view of a row-major (N, K): its .t() is contiguous.
    return (gx if needs_x else _empty(x), gw_t.t().contiguous() if needs_w else _empty(x),
            gb if has_bias else _empty(x))


@torch.library.custom_op("cudacnn::linear_backward", mutates_args=())
def _linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, saved: Tensor, activation: str, backend: str,
                     allow_tf32: bool, has_bias: bool, needs_x: bool, needs_w: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _linear_backward_impl(grad_y, x, weight, saved, activation, backend, allow_tf32, has_bias, needs_x,
                                 needs_w)


@_linear_backward.register_fake
def _(grad_y, x, weight, saved, activation, backend, allow_tf32, has_bias, needs_x, needs_w):
    return (torch.empty_like(x) if needs_x else x.new_empty((0,)),
            torch.empty_like(weight) if needs_w else x.new_empty((0,)),
            weight.new_empty((weight.shape[0],)) if has_bias else x.new_empty((0,)))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, activation, backend, allow_tf32, save_pre = inputs
    y, pre = output
    saved = pre if activation in NEEDS_PRE_ACTIVATION else y
    ctx.save_for_backward(x, weight, saved)
    ctx.config = (activation, backend, allow_tf32, bias is not None)


def _linear_grads(ctx, grad_y, backward) -> tuple:
    """(dx, dweight, dbias), None where not needed, from a context that saved (x, weight, y or pre-activation)
    and config (activation, backend, allow_tf32, has bias); `backward`: the op or its body."""
    x, weight, saved = ctx.saved_tensors
    activation, backend, allow_tf32, has_bias = ctx.config
    needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
    gx, gw, gb = backward(grad_y, x, weight, saved, activation, backend, allow_tf32, has_bias and needs_b, needs_x,
                          needs_w)
    return gx if needs_x else None, gw if needs_w else None, gb if (has_bias and needs_b) else None


def _linear_grad(ctx, grad_y, grad_pre):
    saved, activation = ctx.saved_tensors[2], ctx.config[0]
    if activation in NEEDS_PRE_ACTIVATION and saved.numel() != grad_y.numel():
        raise RuntimeError("cudacnn::linear was called with save_pre=False; call kernels.ops.linear instead")
    return *_linear_grads(ctx, grad_y, _linear_backward), None, None, None, None


_linear.register_autograd(_linear_grad, setup_context=_linear_setup)


class _Linear(torch.autograd.Function):
    """The eager path of linear: the op's kernels and autograd formula without the dispatcher, whose custom op
    and autograd node cost about twice the host time of this (scripts/profile_eager_host.py; see _direct)."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, backend, allow_tf32):
        inputs = (x, weight, bias, activation, backend, allow_tf32, activation in NEEDS_PRE_ACTIVATION)
        output = _linear_impl(*inputs)
        _linear_setup(ctx, inputs, output)  # the op's context: _linear_grads reads both the same way
        return output[0]

    @staticmethod
    def backward(ctx, grad_y):
        return *_linear_grads(ctx, grad_y, _linear_backward_impl), None, None, None


# Smallest output (rows x features) at which a Linear with an activation runs our GEMM: with the activation in its
# epilogue it beat cuBLAS + the separate activation pass at 4096 x 4096 outputs (1.02x) and more (1.12x at
# 16384 x 4096); a plain GEMM never beat cuBLAS, and a CNN's small Linear layers are host-bound, where the GEMM's
# launch path (autotuner, TMA descriptors) took 3-7x cuBLAS's host time in training (benchmarks/kernels.md).
GEMM_MIN_OUTPUTS = 4096 * 4096


def gemm_pays(rows: int, features: int, activation: str, backend: str) -> bool:
    """Whether a Linear of this size runs faster on our GEMM than on cuBLAS (F.linear) + the activation. The
    CUDA C++ GEMM never did (0.72x eager at the sizes where the Triton one wins)."""
    return backend == "triton" and activation != "none" and rows * features >= GEMM_MIN_OUTPUTS


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "none",
           backend: str = "triton", allow_tf32: bool = False) -> Tensor:
    """act(x @ weight^T + bias) over the last dimension of x, like F.linear followed by the activation."""
    if backend == "torch":
        y = F.linear(x, weight, bias)
        return y if activation == "none" else _act.reference_forward(y, activation)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if _direct(x2) and type(weight) in (Tensor, torch.nn.Parameter):
        y = (_Linear.apply(x2, weight, bias, activation, backend, allow_tf32) if grad else
             _linear_impl(x2, weight, bias, activation, backend, allow_tf32, False)[0])
    else:
        y, _ = _linear(x2, weight, bias, activation, backend, allow_tf32, grad and activation in NEEDS_PRE_ACTIVATION)
    return y.reshape(*lead, weight.shape[0])


# ---------------------------------------------------------------- elementwise activation

def channels_last_4d(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _nhwc(t: Tensor) -> Tensor:
    """A channels_last tensor as the contiguous (N, H, W, C) view of the same memory: the elementwise kernels
    index flat memory, so they run on it without the copy to and from NCHW that .contiguous() would make."""
    return t.permute(0, 2, 3, 1) if channels_last_4d(t) else t


def _activation_impl(x: Tensor, kind: str, backend: str) -> Tensor:
    out = torch.empty_like(x)  # x's layout: a conv net's channels_last activations stay channels_last
    if _use_cuda(backend, x):
        _cuda.cuda_activation_forward(_nhwc(x), kind, out=_nhwc(out))
    else:
        _act.activation_forward(_nhwc(x), kind, out=_nhwc(out))
    return out


@torch.library.custom_op("cudacnn::activation", mutates_args=())
def _activation(x: Tensor, kind: str, backend: str) -> Tensor:
    return _activation_impl(x, kind, backend)


@_activation.register_fake
def _(x, kind, backend):
    return torch.empty_like(x)


def _activation_backward_impl(grad_y: Tensor, x: Tensor, kind: str, backend: str) -> Tensor:
    out = torch.empty_like(x)
    # grad_y in x's layout (a no-op when it already is): _nhwc views both the same way only then
    grad_y = grad_y.contiguous(memory_format=torch.channels_last if channels_last_4d(x) else torch.contiguous_format)
    if _use_cuda(backend, x):
        _cuda.cuda_activation_backward(_nhwc(grad_y), _nhwc(x), kind, out=_nhwc(out))
    else:
        _act.activation_backward(_nhwc(grad_y), _nhwc(x), kind, out=_nhwc(out))
    return out


@torch.library.custom_op("cudacnn::activation_backward", mutates_args=())
def _activation_backward(grad_y: Tensor, x: Tensor, kind: str, backend: str) -> Tensor:
    return _activation_backward_impl(grad_y, x, kind, backend)


@_activation_backward.register_fake
def _(grad_y, x, kind, backend):
    return torch.empty_like(x)


def _activation_setup(ctx, inputs, output):
    x, kind, backend = inputs
    ctx.save_for_backward(x)
    ctx.config = (kind, backend)


def _activation_grad(ctx, grad_y):
    (x,) = ctx.saved_tensors
    kind, backend = ctx.config
    return _activation_backward(grad_y, x, kind, backend), None, None


_activation.register_autograd(_activation_grad, setup_context=_activation_setup)


class _Activation(torch.autograd.Function):
    """The eager path of activation (see _direct)."""

    @staticmethod
    def forward(ctx, x, kind, backend):
        _activation_setup(ctx, (x, kind, backend), None)
        return _activation_impl(x, kind, backend)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        return _activation_backward_impl(grad_y, x, *ctx.config), None, None


# Smallest tensor on which a standalone activation module runs our kernel: at 64 Mi elements our activations ran
# at 0.89-1.04 of copy bandwidth and exact GELU 1.17x eager F.gelu; a CNN's standalone activations (after a
# classifier head's Linear) are thousands of times smaller, where each call is host-bound and our autograd
# Function costs more host time than PyTorch's op (benchmarks/kernels.md, the eager profiles).
ACTIVATION_MIN_ELEMENTS = 1 << 26


def activation_pays(numel: int) -> bool:
    """Whether a standalone activation of this many elements runs our kernel rather than PyTorch's."""
    return numel >= ACTIVATION_MIN_ELEMENTS


def activation(x: Tensor, kind: str, backend: str = "triton") -> Tensor:
    if backend == "torch":
        return _act.reference_forward(x, kind)
    if _direct(x):
        if torch.is_grad_enabled() and x.requires_grad:
            return _Activation.apply(x, kind, backend)
        return _activation_impl(x, kind, backend)
    return _activation(x, kind, backend)


# ---------------------------------------------------------------- softmax + cross-entropy

def _cross_entropy_impl(logits: Tensor, targets: Tensor, label_smoothing: float, reduction: str,
                        compute_grad: bool) -> tuple[Tensor, Tensor]:
    if not compute_grad:
        return _ce.softmax_cross_entropy(logits, targets, label_smoothing, reduction), _empty(logits)
    return _ce.softmax_cross_entropy(logits, targets, label_smoothing, reduction, return_grad=True)


@torch.library.custom_op("cudacnn::cross_entropy", mutates_args=())
def _cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float, reduction: str,
                   compute_grad: bool) -> tuple[Tensor, Tensor]:
    return _cross_entropy_impl(logits, targets, label_smoothing, reduction, compute_grad)


@_cross_entropy.register_fake
def _(logits, targets, label_smoothing, reduction, compute_grad):
    loss = logits.new_empty((), dtype=torch.float32 if logits.dtype != torch.float64 else torch.float64)
    return loss, (torch.empty_like(logits) if compute_grad else logits.new_empty((0,)))


def _cross_entropy_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _cross_entropy_grad(ctx, grad_loss, grad_grad):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0:
        raise RuntimeError("cudacnn::cross_entropy was called with compute_grad=False; use kernels.ops.cross_entropy")
    return grad * grad_loss.to(grad.dtype), None, None, None, None


_cross_entropy.register_autograd(_cross_entropy_grad, setup_context=_cross_entropy_setup)


class _CrossEntropy(torch.autograd.Function):
    """The eager path of cross_entropy (see _direct): the forward kernel writes the gradient too."""

    @staticmethod
    def forward(ctx, logits, targets, label_smoothing, reduction):
        output = _cross_entropy_impl(logits, targets, label_smoothing, reduction, True)
        _cross_entropy_setup(ctx, None, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None


# Fewest rows at which the loss module runs our fused kernel: F.cross_entropy took 1.8 ms a million rows
# (10 classes, fwd+bwd) against our 0.12 ms, and an eager call of ours costs about 0.25 ms more host time than
# PyTorch's (its autograd Function and launch); below ~130K rows, a CNN's batch, PyTorch's is faster.
CROSS_ENTROPY_MIN_ROWS = 1 << 17


def cross_entropy_pays(rows: int) -> bool:
    """Whether a loss over this many rows runs our fused kernel rather than F.cross_entropy."""
    return rows >= CROSS_ENTROPY_MIN_ROWS


def cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0, reduction: str = "mean",
                  backend: str = "triton") -> Tensor:
    """Mean (or summed) softmax cross-entropy; the gradient comes from the forward kernel."""
    if backend == "torch":
        return torch.nn.functional.cross_entropy(logits, targets, label_smoothing=label_smoothing,
                                                 reduction=reduction)
    grad = torch.is_grad_enabled() and logits.requires_grad
    if _direct(logits):
        if grad:
            return _CrossEntropy.apply(logits, targets, float(label_smoothing), reduction)
        return _cross_entropy_impl(logits, targets, float(label_smoothing), reduction, False)[0]
    loss, _ = _cross_entropy(logits, targets, float(label_smoothing), reduction, grad)
    return loss


# ---------------------------------------------------------------- fused BatchNorm + residual + activation + pool
# Three ops: batchnorm_stats mutates the running statistics (torch.library allows no autograd formula on a
# mutating op) and returns the batch's (mean, rstd), constants for autograd; batchnorm_act is functional and
# its backward, batchnorm_act_backward, adds the batch statistics' gradient terms itself (training=True).
# They are triton_ops: torch.compile traces their bodies, so Inductor sees the Triton kernels (and CUDA
# graphs capture them) instead of an opaque call. Triton's interpreter cannot be traced that way (wrap_triton
# hands its kernels back unwrapped, and they would run on fake tensors), so on the CPU the bodies call an
# opaque custom op, the *_interpreted twin, that runs the same launchers.
# Eager calls skip the dispatcher: batchnorm_act() and pool_bn_act() run the launchers through one
# autograd.Function each, whose host cost is a fraction of a custom op's (see _direct); batchnorm_act's eager
# training calls on a GPU go further, to launch plans run from C++ (planned.py).

def _interpreted(x: Tensor) -> bool:
    return x.device.type == "cpu" and _bn._triton_ok(x)


def _stats_fake(x, running_mean, running_var, momentum, eps):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[1],), dtype=dtype), x.new_empty((x.shape[1],), dtype=dtype)


def _backward_fake(grad_y, x, weight, bias, residual, mean, rstd, training, normalize, activation, pool,
                   needs_affine):
    def grad_of(t, wanted=True):
        return torch.empty_like(t) if t is not None and wanted else x.new_empty((0,))

    affine = needs_affine and normalize
    return torch.empty_like(x), grad_of(weight, affine), grad_of(bias, affine), grad_of(residual)


def _backward_outputs(dx, dw, db, dres, x):
    return tuple(t if t is not None else _empty(x) for t in (dx, dw, db, dres))


@torch.library.custom_op("cudacnn::batchnorm_stats_interpreted", mutates_args=("running_mean", "running_var"))
def _batchnorm_stats_interpreted(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                                 momentum: float, eps: float) -> tuple[Tensor, Tensor]:
    return _bn.statistics(x, running_mean, running_var, momentum, eps)


_batchnorm_stats_interpreted.register_fake(_stats_fake)


@torch.library.triton_op("cudacnn::batchnorm_stats", mutates_args=("running_mean", "running_var"))
def _batchnorm_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                     eps: float) -> tuple[Tensor, Tensor]:
    if _interpreted(x):
        return _batchnorm_stats_interpreted(x, running_mean, running_var, momentum, eps)
    return _bn.statistics(x, running_mean, running_var, momentum, eps, wrap=torch.library.wrap_triton)


@torch.library.custom_op("cudacnn::batchnorm_act_interpreted", mutates_args=())
def _batchnorm_act_interpreted(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                               residual: Optional[Tensor], mean: Tensor, rstd: Tensor, training: bool,
                               normalize: bool, activation: str, pool: bool) -> Tensor:
    return _bn.apply(x, weight, bias, residual, mean, rstd, normalize, activation, pool)


@_batchnorm_act_interpreted.register_fake
def _(x, weight, bias, residual, mean, rstd, training, normalize, activation, pool):
    return _bn.output_like(x, pool)


@torch.library.triton_op("cudacnn::batchnorm_act", mutates_args=())
def _batchnorm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, training: bool, normalize: bool, activation: str,
                   pool: bool) -> Tensor:
    if _interpreted(x):
        return _batchnorm_act_interpreted(x, weight, bias, residual, mean, rstd, training, normalize, activation,
                                          pool)
    return _bn.apply(x, weight, bias, residual, mean, rstd, normalize, activation, pool,
                     wrap=torch.library.wrap_triton)


@torch.library.custom_op("cudacnn::batchnorm_act_backward_interpreted", mutates_args=())
def _batchnorm_act_backward_interpreted(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                        residual: Optional[Tensor], mean: Tensor, rstd: Tensor, training: bool,
                                        normalize: bool, activation: str, pool: bool,
                                        needs_affine: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward_outputs(*_bn.backward(grad_y, x, weight, bias, residual, mean, rstd, training, normalize,
                                           activation, pool, needs_affine), x)


_batchnorm_act_backward_interpreted.register_fake(_backward_fake)


@torch.library.triton_op("cudacnn::batchnorm_act_backward", mutates_args=())
def _batchnorm_act_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            residual: Optional[Tensor], mean: Tensor, rstd: Tensor, training: bool, normalize: bool,
                            activation: str, pool: bool, needs_affine: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if _interpreted(x):
        return _batchnorm_act_backward_interpreted(grad_y, x, weight, bias, residual, mean, rstd, training, normalize,
                                                   activation, pool, needs_affine)
    return _backward_outputs(*_bn.backward(grad_y, x, weight, bias, residual, mean, rstd, training, normalize,
                                           activation, pool, needs_affine, wrap=torch.library.wrap_triton), x)


def _batchnorm_act_setup(ctx, inputs, output):
    x, weight, bias, residual, mean, rstd, training, normalize, activation, pool = inputs
    ctx.save_for_backward(x, weight, bias, residual, mean, rstd)
    ctx.config = (training, normalize, activation, pool)


def _batchnorm_act_grad(ctx, grad_y):
    x, weight, bias, residual, mean, rstd = ctx.saved_tensors
    training, normalize, activation, pool = ctx.config
    needs_x, needs_w, needs_b, needs_res = ctx.needs_input_grad[:4]
    dx, dw, db, dres = _batchnorm_act_backward(grad_y, x, weight, bias, residual, mean, rstd, training, normalize,
                                               activation, pool, needs_w or needs_b)
    return (dx if needs_x else None, dw if needs_w else None, db if needs_b else None,
            dres if needs_res else None, None, None, None, None, None, None)


_batchnorm_act.register_autograd(_batchnorm_act_grad, setup_context=_batchnorm_act_setup)


class _BatchNormAct(torch.autograd.Function):
    """The eager path: the ops' launchers and autograd formula, without the dispatcher."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation,
                pool, normalize):
        y, mean, rstd = _bn.eager_forward(x, weight, bias, residual, running_mean, running_var, training, momentum,
                                          eps, activation, pool, normalize)
        ctx.save_for_backward(x, weight, bias, residual, mean, rstd)
        ctx.config = (training and normalize, normalize, activation, pool)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, residual, mean, rstd = ctx.saved_tensors
        training, normalize, activation, pool = ctx.config
        needs_x, needs_w, needs_b, needs_res = ctx.needs_input_grad[:4]
        dx, dw, db, dres = _bn.backward(grad_y, x, weight, bias, residual, mean, rstd, training, normalize,
                                        activation, pool, needs_w or needs_b, shared_counters=True)
        return (dx if needs_x else None, dw if needs_w else None, db if needs_b else None,
                dres if needs_res else None, None, None, None, None, None, None, None, None)


# Under torch.compile, Inductor writes BatchNorm + residual add + activation as its own fused kernels. Against
# them (device time of forward + backward in a CUDA graph, bf16 channels_last, benchmarks/kernels.md) ours were
# faster where they also fuse the 2x2 max-pool over a large input (1.33x at 256x64x32x32; 0.90x at 256x256x8x8),
# or compute GELU (1.33x, fast96's first group), and slower for BatchNorm + ReLU with or without the add
# (0.74-0.82x, four shapes). That was before batchnorm.py's swept launch settings, with which resnet18's
# layer1 BN+ReLU came level (230 us against Inductor's 236, in another process); not yet measured side by side.
# Eager calls always take ours (1.00-2.89x eager PyTorch's).
COMPILED_ACTIVATIONS = ("gelu",)
COMPILED_POOL_MIN_ELEMENTS = 1 << 24


def batchnorm_act_pays(activation: str, pool: bool, numel: int) -> bool:
    """Whether a BatchNorm (+ add) (+ activation) (+ pool) module with an input of `numel` elements runs our op
    rather than PyTorch's ops: always in eager mode; under torch.compile with GELU, or with the pool at
    COMPILED_POOL_MIN_ELEMENTS and more."""
    if not torch.compiler.is_compiling():
        return True
    return activation in COMPILED_ACTIVATIONS or (pool and numel >= COMPILED_POOL_MIN_ELEMENTS)


def batchnorm_act(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None = None,
                  running_mean: Tensor | None = None, running_var: Tensor | None = None, training: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, activation: str = "none", pool: bool = False,
                  backend: str = "triton", normalize: bool = True) -> Tensor:
    """maxpool2x2?(act(batch_norm(x) + residual)) on 4-D x, like F.batch_norm's arguments: batch statistics
    in training (updating the running ones in place when given), the running ones otherwise. normalize=False
    leaves out the BatchNorm (act + residual + pool). Backends "triton" and "cuda" both run the Triton
    kernels (there is no CUDA C++ BatchNorm); "torch" the PyTorch modules' functions."""
    if not normalize and (weight is not None or bias is not None):
        raise ValueError("batchnorm_act with normalize=False takes no weight or bias (they scale and shift the "
                         "normalized value); pass None for both, or normalize=True")
    if backend == "torch":
        if normalize:
            x = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        if residual is not None:
            x = x + residual
        x = _act.reference_forward(x, activation) if activation != "none" else x
        return F.max_pool2d(x, 2) if pool else x
    if training and x.is_cuda and _planned.ENABLED and torch.is_grad_enabled() and x.requires_grad and _direct(x):
        y = _planned.batchnorm_act(x, weight, bias, residual, running_mean, running_var, float(momentum),
                                   float(eps), activation, pool, normalize)  # a training step's call, from C++
        if y is not None:
            return y
    _bn.check_inputs(x, weight, bias, residual, activation, pool, training and normalize)  # before any kernel
    if normalize and not training and (running_mean is None or running_var is None):
        raise ValueError("batchnorm_act with training=False needs running_mean and running_var")
    momentum, eps = float(momentum), float(eps)
    if _direct(x):
        if torch.is_grad_enabled() and (x.requires_grad or any(
                t is not None and t.requires_grad for t in (weight, bias, residual))):
            return _BatchNormAct.apply(x, weight, bias, residual, running_mean, running_var, training, momentum,
                                       eps, activation, pool, normalize)
        return _bn.eager_forward(x, weight, bias, residual, running_mean, running_var, training, momentum, eps,
                                 activation, pool, normalize)[0]
    if not normalize:
        mean = rstd = x.new_empty((0,), dtype=torch.float32)
        training = False
    elif training:
        mean, rstd = _batchnorm_stats(x.detach(), running_mean, running_var, momentum, eps)
    else:
        mean, rstd = _bn.running_stats(running_mean, running_var, eps, x.dtype)
    return _batchnorm_act(x, weight, bias, residual, mean, rstd, training, normalize, activation, pool)


def conv_batchnorm_act(x: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, stride: tuple, padding: tuple,
                       dilation: tuple, groups: int, weight: Tensor | None, bias: Tensor | None,
                       residual: Tensor | None = None, running_mean: Tensor | None = None,
                       running_var: Tensor | None = None, training: bool = True, momentum: float = 0.1,
                       eps: float = 1e-5, activation: str = "none", pool: bool = False, backend: str = "triton",
                       normalize: bool = True) -> Tensor:
    """batchnorm_act(F.conv2d(x, conv_weight, conv_bias, stride, padding, dilation, groups), ...), padding as
    integers. An eager training call on a GPU runs both under one C++ autograd node (the convolution stays
    PyTorch's: cuDNN, autocast's casts included), where the two calls make three (the convolution's, the weight
    cast's and the op's) with Python between them; every other call is the two calls. With normalize, the node
    returns the convolution's bias gradient as zeros without computing it: a BatchNorm with batch statistics
    gives the same output for any per-channel shift of its input, so that gradient is zero (the two calls compute
    it, to within rounding of zero). Without normalize, the op's backward launch sums the gradient per channel as
    it writes it, and the node returns that sum as the bias gradient."""
    conv = (conv_weight, conv_bias, stride, padding, dilation, groups)
    norm = (weight, bias, residual, running_mean, running_var)
    fused = (backend != "torch" and training and x.is_cuda and _planned.ENABLED and torch.is_grad_enabled()
             and (x.requires_grad or conv_weight.requires_grad) and _direct(x))
    if fused:
        y = _planned.conv_batchnorm_act(x, *conv, *norm, float(momentum), float(eps), activation, pool, normalize)
        if y is not None:
            return y
    z = F.conv2d(x, *conv)
    y = batchnorm_act(z, *norm, training, momentum, eps, activation, pool, backend, normalize)
    if fused:  # the op recorded z's plans (if it could): the call's next steps take the one node
        _planned.link_conv(x, *conv, z, *norm, activation, pool, normalize)
    return y


# ---------------------------------------------------------------- fused 2x2 max-pool + BatchNorm + activation
# The pool comes first (a conv group's conv -> pool -> BN -> act; kernels/pool_bn_act.py). Three triton_ops,
# as for batchnorm_act: pool_bn_stats pools x (detached) and mutates the running statistics, returning
# (p, code, mean, rstd), constants for autograd; pool_bn_act(x, p, code, ...) is functional: it reads p only,
# takes x so that autograd routes dx to it, and its backward, pool_bn_act_backward, adds the batch
# statistics' gradient terms itself and writes dx in x's shape from p, code and dy (x is never saved). On the
# CPU the bodies call opaque *_interpreted twins (see the batchnorm_act section).

def _pool_stats_fake(x, running_mean, running_var, training, momentum, eps):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.shape[1]
    return (_pba.pooled_like(x), _pba.pooled_like(x, torch.int8), x.new_empty((c,), dtype=dtype),
            x.new_empty((c,), dtype=dtype))


@torch.library.custom_op("cudacnn::pool_bn_stats_interpreted", mutates_args=("running_mean", "running_var"))
def _pool_bn_stats_interpreted(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                               training: bool, momentum: float, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _pba.pool_forward(x, running_mean, running_var, training, momentum, eps)


_pool_bn_stats_interpreted.register_fake(_pool_stats_fake)


@torch.library.triton_op("cudacnn::pool_bn_stats", mutates_args=("running_mean", "running_var"))
def _pool_bn_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                   momentum: float, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if _interpreted(x):
        return _pool_bn_stats_interpreted(x, running_mean, running_var, training, momentum, eps)
    return _pba.pool_forward(x, running_mean, running_var, training, momentum, eps, wrap=torch.library.wrap_triton)


@torch.library.custom_op("cudacnn::pool_bn_act_interpreted", mutates_args=())
def _pool_bn_act_interpreted(x: Tensor, p: Tensor, code: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                             mean: Tensor, rstd: Tensor, training: bool, activation: str) -> Tensor:
    return _pba.apply(p, weight, bias, mean, rstd, activation)


@_pool_bn_act_interpreted.register_fake
def _(x, p, code, weight, bias, mean, rstd, training, activation):
    return torch.empty_like(p)


@torch.library.triton_op("cudacnn::pool_bn_act", mutates_args=())
def _pool_bn_act(x: Tensor, p: Tensor, code: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                 rstd: Tensor, training: bool, activation: str) -> Tensor:
    if _interpreted(p):
        return _pool_bn_act_interpreted(x, p, code, weight, bias, mean, rstd, training, activation)
    return _pba.apply(p, weight, bias, mean, rstd, activation, wrap=torch.library.wrap_triton)


def _pool_backward_fake(grad_y, p, code, weight, bias, mean, rstd, x_shape, channels_last, training, activation,
                        needs_affine):
    def grad_of(t):
        return torch.empty_like(t) if t is not None and needs_affine else p.new_empty((0,))

    return (_pba.grad_input_like(x_shape, channels_last, p.dtype, p.device), grad_of(weight), grad_of(bias))


def _pool_backward_outputs(dx, dw, db, p):
    return tuple(t if t is not None else _empty(p) for t in (dx, dw, db))


@torch.library.custom_op("cudacnn::pool_bn_act_backward_interpreted", mutates_args=())
def _pool_bn_act_backward_interpreted(grad_y: Tensor, p: Tensor, code: Tensor, weight: Optional[Tensor],
                                      bias: Optional[Tensor], mean: Tensor, rstd: Tensor, x_shape: list[int],
                                      channels_last: bool, training: bool, activation: str,
                                      needs_affine: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _pool_backward_outputs(*_pba.backward(grad_y, p, code, weight, bias, mean, rstd, x_shape, channels_last,
                                                 training, activation, needs_affine), p)


_pool_bn_act_backward_interpreted.register_fake(_pool_backward_fake)


@torch.library.triton_op("cudacnn::pool_bn_act_backward", mutates_args=())
def _pool_bn_act_backward(grad_y: Tensor, p: Tensor, code: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          mean: Tensor, rstd: Tensor, x_shape: list[int], channels_last: bool, training: bool,
                          activation: str, needs_affine: bool) -> tuple[Tensor, Tensor, Tensor]:
    if _interpreted(p):
        return _pool_bn_act_backward_interpreted(grad_y, p, code, weight, bias, mean, rstd, x_shape, channels_last,
                                                 training, activation, needs_affine)
    return _pool_backward_outputs(*_pba.backward(grad_y, p, code, weight, bias, mean, rstd, x_shape, channels_last,
                                                 training, activation, needs_affine, wrap=torch.library.wrap_triton),
                                  p)


def _pool_bn_act_setup(ctx, inputs, output):
    x, p, code, weight, bias, mean, rstd, training, activation = inputs
    ctx.save_for_backward(p, code, weight, bias, mean, rstd)
    ctx.config = (list(x.shape), channels_last_4d(x), training, activation)


def _pool_bn_act_grad(ctx, grad_y):
    p, code, weight, bias, mean, rstd = ctx.saved_tensors
    x_shape, channels_last, training, activation = ctx.config
    needs_x, _, _, needs_w, needs_b = ctx.needs_input_grad[:5]
    dx, dw, db = _pool_bn_act_backward(grad_y, p, code, weight, bias, mean, rstd, x_shape, channels_last, training,
                                       activation, needs_w or needs_b)
    return (dx if needs_x else None, None, None, dw if needs_w else None, db if needs_b else None, None, None,
            None, None)


_pool_bn_act.register_autograd(_pool_bn_act_grad, setup_context=_pool_bn_act_setup)


class _PoolBatchNormAct(torch.autograd.Function):
    """The eager path of pool_bn_act: the op's launchers and autograd formula, without the dispatcher (as
    _BatchNormAct for batchnorm_act)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, activation):
        p, code, mean, rstd = _pba.pool_forward(x, running_mean, running_var, training, momentum, eps)
        ctx.save_for_backward(p, code, weight, bias, mean, rstd)
        ctx.config = (list(x.shape), channels_last_4d(x), training, activation)
        return _pba.apply(p, weight, bias, mean, rstd, activation)

    @staticmethod
    def backward(ctx, grad_y):
        p, code, weight, bias, mean, rstd = ctx.saved_tensors
        x_shape, channels_last, training, activation = ctx.config
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        dx, dw, db = _pba.backward(grad_y, p, code, weight, bias, mean, rstd, x_shape, channels_last, training,
                                   activation, needs_w or needs_b)
        return (dx if needs_x else None, dw if needs_w else None, db if needs_b else None, None, None, None, None,
                None, None)


def pool_bn_act(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None = None,
                running_var: Tensor | None = None, training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                activation: str = "none", backend: str = "triton") -> Tensor:
    """act(F.batch_norm(F.max_pool2d(x, 2), running_mean, running_var, weight, bias, training, momentum, eps))
    on 4-D x, in x's dtype and memory format: batch statistics of the pooled x in training (updating the
    running ones in place when given), the running ones otherwise. Backends "triton" and "cuda" run the Triton
    kernels; "torch" the PyTorch functions."""
    if backend == "torch":
        return _pba.reference(x, weight, bias, running_mean, running_var, training, momentum, eps, activation)
    _pba.check_inputs(x, weight, bias, activation, training)  # before any kernel
    if not training and (running_mean is None or running_var is None):
        raise ValueError("pool_bn_act with training=False needs running_mean and running_var")
    momentum, eps = float(momentum), float(eps)
    if _direct(x):
        if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad
                                                                for t in (weight, bias))):
            return _PoolBatchNormAct.apply(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                           activation)
        p, code, mean, rstd = _pba.pool_forward(x, running_mean, running_var, training, momentum, eps)
        return _pba.apply(p, weight, bias, mean, rstd, activation)
    p, code, mean, rstd = _pool_bn_stats(x.detach(), running_mean, running_var, training, momentum, eps)
    return _pool_bn_act(x, p, code, weight, bias, mean, rstd, training, activation)


# ---------------------------------------------------------------- convolution + BatchNorm prologue / stats epilogue
# y = conv(act(x * scale + shift), w) and, with stats, sums = (sum y, sum y^2) per output channel. sums is a
# differentiable output: a BatchNorm whose statistics come from it passes their gradient back through y.
# conv.dispatch picks the Triton kernels or cuDNN (F.conv2d) per call; y is channels_last either way.

def _channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("cudacnn::conv2d_fused", mutates_args=())
def _conv2d_fused(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], stride: int,
                  padding: int, activation: str, stats: bool, allow_tf32: bool) -> tuple[Tensor, Tensor]:
    if _conv.dispatch(x, weight, stride, padding) == "triton":
        y, sums = _conv.forward(x, weight, scale, shift, stride, padding, activation, stats, allow_tf32)
    else:
        y, sums = _conv.reference_forward(x, weight, scale, shift, stride, padding, activation, stats)
        y = _channels_last(y)
    return y, (sums if stats else _empty(x))


@_conv2d_fused.register_fake
def _(x, weight, scale, shift, stride, padding, activation, stats, allow_tf32):
    y = torch.empty(_conv.output_shape(x.shape, weight.shape, stride, padding), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return y, (x.new_empty((2, weight.shape[0]), dtype=dtype) if stats else x.new_empty((0,)))


@torch.library.custom_op("cudacnn::conv2d_fused_backward", mutates_args=())
def _conv2d_fused_backward(grad_y: Tensor, grad_sums: Optional[Tensor], y: Tensor, x: Tensor, weight: Tensor,
                           scale: Optional[Tensor], shift: Optional[Tensor], stride: int, padding: int,
                           activation: str, allow_tf32: bool, needs_x: bool, needs_w: bool,
                           needs_affine: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw, dscale, dshift), empty where not needed; grad_sums (2, K) or None, y the forward's output
    (read only with grad_sums)."""
    g = _conv.stats_gradient(grad_y.to(x.dtype), grad_sums, y)
    prologue = scale is not None
    dx = dw = dscale = dshift = None
    if _conv.dispatch(x, weight, stride, padding) == "triton":
        if needs_x or (prologue and needs_affine):
            dx, dscale, dshift = _conv.input_grad(g, x, weight, scale, shift, stride, activation, allow_tf32)
        if needs_w:
            dw = _conv.weight_grad(g, x, weight, scale, shift, stride, activation, allow_tf32)
    else:
        dx, dw, dscale, dshift = _conv.reference_backward(g, x, weight, scale, shift, stride, padding, activation,
                                                          needs_x, needs_w)
        dx = _channels_last(dx) if dx is not None else None
        dw = torch.empty_like(weight).copy_(dw) if dw is not None else None
    affine = prologue and needs_affine
    return (dx if needs_x else _empty(x), dw if needs_w else _empty(x), dscale if affine else _empty(x),
            dshift if affine else _empty(x))


@_conv2d_fused_backward.register_fake
def _(grad_y, grad_sums, y, x, weight, scale, shift, stride, padding, activation, allow_tf32, needs_x, needs_w,
      needs_affine):
    affine = scale is not None and needs_affine
    return (torch.empty_like(x, memory_format=torch.channels_last) if needs_x else x.new_empty((0,)),
            torch.empty_like(weight) if needs_w else x.new_empty((0,)),
            torch.empty_like(scale) if affine else x.new_empty((0,)),
            torch.empty_like(shift) if affine else x.new_empty((0,)))


def _conv2d_fused_setup(ctx, inputs, output):
    x, weight, scale, shift, stride, padding, activation, stats, allow_tf32 = inputs
    y, _ = output
    ctx.save_for_backward(x, weight, scale, shift, y if stats else None)
    ctx.config = (stride, padding, activation, allow_tf32)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero tensors to add


def _conv2d_fused_grad(ctx, grad_y, grad_sums):
    x, weight, scale, shift, y = ctx.saved_tensors
    stride, padding, activation, allow_tf32 = ctx.config
    needs_x, needs_w, needs_scale, needs_shift = ctx.needs_input_grad[:4]
    if grad_y is None:  # only the statistics reach the loss
        grad_y = torch.zeros(_conv.output_shape(x.shape, weight.shape, stride, padding), dtype=x.dtype,
                             device=x.device).contiguous(memory_format=torch.channels_last)
    if y is None:
        grad_sums = None
    dx, dw, dscale, dshift = _conv2d_fused_backward(grad_y, grad_sums, y if y is not None else grad_y, x, weight,
                                                    scale, shift, stride, padding, activation, allow_tf32, needs_x,
                                                    needs_w, needs_scale or needs_shift)
    return (dx if needs_x else None, dw if needs_w else None, dscale if needs_scale else None,
            dshift if needs_shift else None, None, None, None, None, None)


_conv2d_fused.register_autograd(_conv2d_fused_grad, setup_context=_conv2d_fused_setup)


def conv2d_fused(x: Tensor, weight: Tensor, scale: Tensor | None = None, shift: Tensor | None = None,
                 stride: int = 1, padding: int | None = None, activation: str = "none", stats: bool = False,
                 backend: str = "triton", allow_tf32: bool | None = None) -> tuple[Tensor, Tensor | None]:
    """(y, sums): y = conv2d(act(x * scale + shift), weight) without bias (scale, shift per input channel;
    both None: no prologue), and with stats, sums (2, K) = per-channel sum and sum of squares of y (float32),
    else None. padding None: (R - 1) // 2. backend "triton": the custom op (Triton kernels where
    conv.dispatch says so, else cuDNN); "torch": the PyTorch reference. allow_tf32 None: as F.conv2d
    (torch.backends.cudnn.allow_tf32)."""
    padding = (weight.shape[-1] - 1) // 2 if padding is None else padding
    _conv.check_inputs(x, weight, scale, shift, stride, padding, activation)
    if backend == "torch":
        return _conv.reference_forward(x, weight, scale, shift, stride, padding, activation, stats)
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cudnn.allow_tf32
    y, sums = _conv2d_fused(x, weight, scale, shift, int(stride), int(padding), activation, stats, bool(allow_tf32))
    return y, (sums if stats else None)
