"""Custom GPU kernels (Triton and CUDA C++) wired into PyTorch.

Functional:  gemm, gemm_backward, activation_forward, activation_backward, softmax_cross_entropy
Autograd / torch.compile ops:  ops.linear, ops.activation, ops.cross_entropy, ops.batchnorm_act
    (torch.library custom ops; batchnorm_act = BatchNorm + residual add + activation + 2x2 max-pool;
    ops.conv_batchnorm_act = a cuDNN convolution and batchnorm_act, one autograd node in eager training),
    ops.pool_bn_act (2x2 max-pool first, then BatchNorm + activation: a conv group's pool -> BN -> act),
    ops.conv2d_fused (implicit-GEMM NHWC convolution with a BatchNorm-apply prologue and a statistics
    epilogue, conv.py; not used by swap_modules yet)
Modules:  Linear, Activation, BatchNormAct, PoolBatchNormAct, ActivationPool, ConvBatchNormAct,
    FusedBasicBlock, CrossEntropyLoss, swap_modules(model, backend), cross_entropy_loss(backend, ...)
Backends:  "torch" (unchanged PyTorch), "triton", "cuda" (CUDA C++ GEMM forward + activations; Triton
    elsewhere). Convolutions always stay PyTorch's (cuDNN)."""

from .activations import activation_backward, activation_forward
from .cross_entropy import softmax_cross_entropy
from .gemm import column_sum, gemm, gemm_backward
from .modules import (Activation, ActivationPool, BatchNormAct, ConvBatchNormAct, CrossEntropyLoss,
                      FusedBasicBlock, Linear, PoolBatchNormAct, cross_entropy_loss, swap_modules)
from .ops import BACKENDS

__all__ = [
    "gemm", "gemm_backward", "column_sum", "activation_forward", "activation_backward", "softmax_cross_entropy",
    "Linear", "Activation", "BatchNormAct", "PoolBatchNormAct", "ActivationPool", "ConvBatchNormAct",
    "FusedBasicBlock", "CrossEntropyLoss", "swap_modules", "cross_entropy_loss", "BACKENDS",
]
