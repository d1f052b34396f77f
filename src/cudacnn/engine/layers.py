"""Layers: each one's backward pass sits right under its forward pass.

A layer computes through `self.ops`, the backend module (cpu_ops: NumPy, gpu_ops: our Triton kernels),
so one piece of code serves both. forward() saves what backward() needs; backward(dy) sets the
parameters' .grad (overwriting, not accumulating), drops the saved tensors and returns dL/dx.
"""

from __future__ import annotations

import math

import numpy as np

from cudacnn.engine import cpu_ops

_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed weight initialisation and dropout masks."""
    global _rng
    _rng = np.random.default_rng(seed)


class Parameter:
    def __init__(self, data: np.ndarray):
        self.data = data.astype(np.float32)
        self.grad = None
        self.ops = cpu_ops

    def to(self, ops) -> None:
        if ops is not self.ops:
            self.data = ops.asarray(self.ops.to_numpy(self.data))
            self.grad = None
            self.ops = ops

    @property
    def shape(self):
        return tuple(self.data.shape)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, device={self.ops.name})"


class Layer:
    ops = cpu_ops
    training = True
    buffers: tuple[str, ...] = ()  # non-trained state saved with the weights (BatchNorm's running stats)

    def parameters(self) -> dict[str, Parameter]:
        return {name: value for name, value in vars(self).items() if isinstance(value, Parameter)}

    def to(self, ops) -> None:
        for p in self.parameters().values():
            p.to(ops)
        for name in self.buffers:
            setattr(self, name, ops.asarray(self.ops.to_numpy(getattr(self, name))))
        self.ops = ops

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy, need_input_grad: bool = True):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _uniform(bound: float, shape) -> np.ndarray:
    return _rng.uniform(-bound, bound, shape).astype(np.float32)


class Linear(Layer):
    """y = x @ W.T + b, W (out, in) as in torch; torch's default initialisation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        bound = 1 / math.sqrt(in_features)
        self.weight = Parameter(_uniform(bound, (out_features, in_features)))
        self.bias = Parameter(_uniform(bound, (out_features,))) if bias else None

    def forward(self, x):
        self.x = x
        return self.ops.matmul(x, self.weight.data.T, self.bias.data if self.bias else None)

    def backward(self, dy, need_input_grad=True):
        x, self.x = self.x, None
        self.weight.grad = self.ops.matmul(dy.T, x)
        if self.bias:
            self.bias.grad = self.ops.column_sums(dy)
        return self.ops.matmul(dy, self.weight.data) if need_input_grad else None

    def __repr__(self) -> str:
        return f"Linear({self.weight.shape[1]}, {self.weight.shape[0]})"


class Conv2d(Layer):
    """Convolution as im2col + GEMM: rows (n, oh, ow) of receptive fields times W reshaped (F, C*kh*kw).
    The output is the GEMM's (N*OH*OW, F) buffer seen as (N, F, OH, OW) in channels-last order."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        self.k, self.stride, self.padding = kernel_size, stride, padding
        fan_in = in_channels * kernel_size * kernel_size
        bound = 1 / math.sqrt(fan_in)
        self.weight = Parameter(_uniform(bound, (out_channels, in_channels, kernel_size, kernel_size)))
        self.bias = Parameter(_uniform(bound, (out_channels,))) if bias else None

    def forward(self, x):
        n, _, h, w = x.shape
        oh = self.ops.conv_out_size(h, self.k, self.stride, self.padding)
        ow = self.ops.conv_out_size(w, self.k, self.stride, self.padding)
        self.x = x
        self.cols = self.ops.im2col(x, self.k, self.k, self.stride, self.padding)
        w2d = self.weight.data.reshape(self.weight.shape[0], -1)
        rows = self.ops.matmul(self.cols, w2d.T, self.bias.data if self.bias else None)
        return self.ops.rows_to_nchw(rows, n, oh, ow)

    def backward(self, dy, need_input_grad=True):
        x, cols, self.x, self.cols = self.x, self.cols, None, None
        dy_rows = self.ops.nchw_to_rows(dy)  # (N*OH*OW, F)
        self.weight.grad = self.ops.matmul(dy_rows.T, cols).reshape(self.weight.shape)
        if self.bias:
            self.bias.grad = self.ops.column_sums(dy_rows)
        if not need_input_grad:
            return None
        dcols = self.ops.matmul(dy_rows, self.weight.data.reshape(self.weight.shape[0], -1))
        return self.ops.col2im(dcols, x, self.k, self.k, self.stride, self.padding)

    def __repr__(self) -> str:
        f, c, k, _ = self.weight.shape
        return f"Conv2d({c}, {f}, kernel_size={k}, stride={self.stride}, padding={self.padding})"


class MaxPool2d(Layer):
    def __init__(self, kernel_size: int = 2, stride: int | None = None):
        self.k, self.stride = kernel_size, stride or kernel_size

    def forward(self, x):
        out, self.arg = self.ops.maxpool2d(x, self.k, self.stride)
        self.x = x
        return out

    def backward(self, dy, need_input_grad=True):
        x, arg, self.x, self.arg = self.x, self.arg, None, None
        return self.ops.maxpool2d_backward(dy, arg, x, self.k, self.stride)

    def __repr__(self) -> str:
        return f"MaxPool2d({self.k}, stride={self.stride})"


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W) in C, H, W order, whatever the memory order."""

    def forward(self, x):
        self.x = x
        return self.ops.flatten(x)

    def backward(self, dy, need_input_grad=True):
        x, self.x = self.x, None
        return self.ops.unflatten(dy, x)


class Dropout(Layer):
    """Inverted dropout; the mask is regenerated from its seed in backward instead of being stored."""

    def __init__(self, p: float = 0.5):
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            self.seed = None
            return x
        self.seed = int(_rng.integers(2**31 - 1))
        return self.ops.dropout(x, self.p, self.seed)

    def backward(self, dy, need_input_grad=True):
        return dy if self.seed is None else self.ops.dropout(dy, self.p, self.seed)

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"


class BatchNorm2d(Layer):
    buffers = ("running_mean", "running_var")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        self.eps, self.momentum = eps, momentum
        self.weight = Parameter(np.ones(num_features, np.float32))
        self.bias = Parameter(np.zeros(num_features, np.float32))
        self.running_mean = np.zeros(num_features, np.float32)
        self.running_var = np.ones(num_features, np.float32)

    def forward(self, x):
        y, self.saved = self.ops.batchnorm_forward(x, self.weight.data, self.bias.data, self.running_mean,
                                                   self.running_var, self.momentum, self.eps, self.training)
        self.x, self.saved_training = x, self.training
        return y

    def backward(self, dy, need_input_grad=True):
        x, saved, self.x, self.saved = self.x, self.saved, None, None
        dx, self.weight.grad, self.bias.grad = self.ops.batchnorm_backward(dy, x, saved, self.weight.data,
                                                                           self.saved_training)
        return dx

    def __repr__(self) -> str:
        return f"BatchNorm2d({self.weight.shape[0]})"


class _Activation(Layer):
    kind = "none"

    def forward(self, x):
        self.x = x
        return self.ops.activation_forward(x, self.kind)

    def backward(self, dy, need_input_grad=True):
        x, self.x = self.x, None
        return self.ops.activation_backward(dy, x, self.kind)


class ReLU(_Activation):
    kind = "relu"


class GELU(_Activation):
    kind = "gelu"  # the exact (erf) form, torch's default


class Softmax(Layer):
    """Row softmax over (N, classes). Training through cross-entropy skips it (see Sequential.train_step):
    softmax and the loss fuse into one kernel whose gradient is simply p - onehot."""

    def forward(self, x):
        self.y = self.ops.softmax(x)
        return self.y

    def backward(self, dy, need_input_grad=True):
        y, self.y = self.y, None
        return self.ops.softmax_backward(dy, y)
