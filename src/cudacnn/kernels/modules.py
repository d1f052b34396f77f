"""nn.Module wrappers over the custom ops, and swap_modules() to put them into any model."""

from __future__ import annotations

import torch
from torch import nn

from . import activations, ops

_ACTIVATION_KINDS = {nn.ReLU: "relu", nn.SiLU: "silu"}


def _check_backend(backend: str) -> None:
    if backend not in ops.BACKENDS:
        raise ValueError(f"unknown kernels backend {backend!r}; expected one of {ops.BACKENDS}")


class Linear(nn.Linear):
    """nn.Linear (optionally followed by an activation) on our GEMM with the activation in its epilogue, where
    that is faster than cuBLAS (ops.gemm_pays); smaller ones, a CNN's classifier heads among them, run
    F.linear and the activation."""

    def __init__(self, in_features, out_features, bias=True, activation="none", backend="triton",
                 allow_tf32=False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        _check_backend(backend)
        self.activation, self.backend, self.allow_tf32 = activation, backend, allow_tf32

    @classmethod
    def from_torch(cls, linear: nn.Linear, backend="triton", activation="none", allow_tf32=False) -> "Linear":
        """Wrap an existing nn.Linear, sharing its parameters (optimizers keep working)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        _check_backend(backend)
        new.activation, new.backend, new.allow_tf32 = activation, backend, allow_tf32
        return new

    def forward(self, x):
        weight, bias = self.weight, self.bias
        if not ops.gemm_pays(x.numel() // max(self.in_features, 1), self.out_features, self.activation,
                             self.backend):
            return ops.linear(x, weight, bias, self.activation, "torch")  # F.linear: autocast casts as for nn.Linear
        if torch.is_autocast_enabled(x.device.type):  # custom ops are not autocast-aware: cast as nn.Linear is
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        return ops.linear(x, weight, bias, self.activation, self.backend, self.allow_tf32)

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation}, backend={self.backend}"


class Activation(nn.Module):
    """An activation on our kernel where that pays (ops.activation_pays: large tensors); smaller ones, such as
    a classifier head's, run PyTorch's."""

    def __init__(self, kind: str, backend: str = "triton"):
        super().__init__()
        _check_backend(backend)
        self.kind, self.backend = kind, backend

    def forward(self, x):
        return ops.activation(x, self.kind, self.backend if ops.activation_pays(x.numel()) else "torch")

    def extra_repr(self):
        return f"kind={self.kind}, backend={self.backend}"


def share_batchnorm(cls, bn: nn.BatchNorm2d):
    """A `cls` (a BatchNorm2d subclass) sharing bn's parameters and buffers (optimizers keep working, the
    state_dict keys stay), in bn's training mode."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        setattr(new, name, getattr(bn, name))
    new.weight, new.bias = bn.weight, bn.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new.register_buffer(name, getattr(bn, name))
    new.train(bn.training)
    return new


def _batchnorm_call(bn: nn.BatchNorm2d):
    """(momentum, batch statistics?, running_mean, running_var) for a call: nn.BatchNorm2d.forward's
    bookkeeping, line for line (it counts the batch)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return momentum, batch_stats, bn.running_mean if keep else None, bn.running_var if keep else None


class BatchNormAct(nn.BatchNorm2d):
    """nn.BatchNorm2d followed by an optional residual add, an activation and a 2x2 max-pool, as one fused op:
    forward(x, residual=None) = max_pool2d(act(bn(x) + residual), 2) (pool when `pool`). Same parameters,
    buffers and state_dict keys as nn.BatchNorm2d, same training/eval semantics (batch statistics and the
    running-stat update in training, running statistics in eval). Under torch.compile it hands Inductor
    PyTorch's ops where Inductor's fused kernels are the faster (ops.batchnorm_act_pays)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 activation="none", pool=False, backend="triton", device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        _check_backend(backend)
        activations.activation_code(activation)
        self.activation, self.pool, self.backend = activation, pool, backend

    @classmethod
    def from_torch(cls, bn: nn.BatchNorm2d, activation="none", pool=False, backend="triton") -> "BatchNormAct":
        """Wrap an existing BatchNorm2d, sharing its parameters and buffers (optimizers keep working)."""
        new = share_batchnorm(cls, bn)
        _check_backend(backend)
        activations.activation_code(activation)
        new.activation, new.pool, new.backend = activation, pool, backend
        return new

    applied_by_conv = False  # set by swap_modules when the ConvBatchNormAct before it computes it

    def forward(self, x, residual=None):
        return x if self.applied_by_conv else self.compute(x, residual)

    def compute(self, x, residual=None, conv: nn.Conv2d | None = None):
        """The op on x, or with conv on conv(x) (one call: ops.conv_batchnorm_act)."""
        x, conv = _fusable(conv, x)
        if conv is None:
            self._check_input_dim(x)
        momentum, batch_stats, running_mean, running_var = _batchnorm_call(self)
        if conv is not None:
            return ops.conv_batchnorm_act(x, *_conv_args(conv), self.weight, self.bias, residual, running_mean,
                                          running_var, batch_stats, momentum, self.eps, self.activation, self.pool,
                                          self.backend)
        backend = self.backend if ops.batchnorm_act_pays(self.activation, self.pool, x.numel()) else "torch"
        return ops.batchnorm_act(x, self.weight, self.bias, residual, running_mean, running_var, batch_stats,
                                 momentum, self.eps, self.activation, self.pool, backend)

    def extra_repr(self):
        applied = ", applied by the conv before it" if self.applied_by_conv else ""
        return (f"{super().extra_repr()}, activation={self.activation}, pool={self.pool}, backend={self.backend}"
                f"{applied}")


class PoolBatchNormAct(nn.BatchNorm2d):
    """A 2x2 max-pool, then nn.BatchNorm2d, then an activation, as one fused op (kernels/pool_bn_act.py):
    forward(x) = act(bn(max_pool2d(x, 2))), x the unpooled input. Same parameters, buffers and state_dict
    keys as nn.BatchNorm2d and the same training/eval semantics. `pools_input` tells a conv group to hand it
    the conv output itself (models.fast.ConvGroup)."""

    pools_input = True

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 activation="none", backend="triton", device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        _check_backend(backend)
        activations.activation_code(activation)
        self.activation, self.backend = activation, backend

    @classmethod
    def from_torch(cls, bn: nn.BatchNorm2d, activation="none", backend="triton") -> "PoolBatchNormAct":
        """Wrap an existing BatchNorm2d, sharing its parameters and buffers (optimizers keep working)."""
        new = share_batchnorm(cls, bn)
        _check_backend(backend)
        activations.activation_code(activation)
        new.activation, new.backend = activation, backend
        return new

    def forward(self, x):
        self._check_input_dim(x)
        momentum, batch_stats, running_mean, running_var = _batchnorm_call(self)
        return ops.pool_bn_act(x, self.weight, self.bias, running_mean, running_var, batch_stats, momentum,
                               self.eps, self.activation, self.backend)

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation}, backend={self.backend}"


class ActivationPool(nn.Module):
    """act(x) then a 2x2 max-pool in one kernel each way (a conv net's ReLU + MaxPool2d(2) without BatchNorm)."""

    def __init__(self, kind: str, backend: str = "triton"):
        super().__init__()
        _check_backend(backend)
        activations.activation_code(kind)
        self.kind, self.backend = kind, backend

    applied_by_conv = False  # as BatchNormAct's

    def forward(self, x):
        return x if self.applied_by_conv else self.compute(x)

    def compute(self, x, residual=None, conv: nn.Conv2d | None = None):
        x, conv = _fusable(conv, x)
        if conv is not None:
            return ops.conv_batchnorm_act(x, *_conv_args(conv), None, None, residual, activation=self.kind,
                                          pool=True, backend=self.backend, normalize=False)
        return ops.batchnorm_act(x, None, None, residual, activation=self.kind, pool=True, backend=self.backend,
                                 normalize=False)

    def extra_repr(self):
        applied = ", applied by the conv before it" if self.applied_by_conv else ""
        return f"kind={self.kind}, backend={self.backend}{applied}"


def _conv_args(conv: nn.Conv2d) -> tuple:
    return conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups


def _fusable(conv: nn.Conv2d | None, x) -> tuple:
    """(x, conv) when a BatchNormAct / ActivationPool may take conv into its call on x (eager, zero padding
    given as integers), else (conv's output, None): the call then is on that."""
    if conv is None:
        return x, None
    if torch.compiler.is_compiling() or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return nn.Conv2d.forward(conv, x), None
    return x, conv


class ConvBatchNormAct(nn.Conv2d):
    """An nn.Conv2d whose output goes straight into the BatchNormAct or ActivationPool after it (`norm`, which
    then passes its input through): forward(x) = norm.compute(x, conv=self), one call and, in an eager
    training step on a GPU, one autograd node (ops.conv_batchnorm_act). Shares the conv's parameters; `norm`
    stays where it was (its state_dict keys with it) and is not a submodule here."""

    @classmethod
    def from_torch(cls, conv: nn.Conv2d, norm: nn.Module) -> "ConvBatchNormAct":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(new, name, getattr(conv, name))
        new.weight, new.bias = conv.weight, conv.bias
        object.__setattr__(new, "norm", norm)  # not registered: the norm's own place keeps its parameters
        norm.applied_by_conv = True
        new.train(conv.training)
        return new

    def forward(self, x):
        return self.norm.compute(x, conv=self)

    def extra_repr(self):
        return f"{super().extra_repr()}, then {type(self.norm).__name__} in one call"


class FusedBasicBlock(nn.Module):
    """models.resnet.BasicBlock with conv1's BN + ReLU and conv2's BN + shortcut add + ReLU each one
    BatchNormAct; the same submodules under the same names, so the state_dict is the block's."""

    def __init__(self, block: nn.Module, backend: str = "triton"):
        super().__init__()
        self.conv1 = block.conv1
        self.bn1 = BatchNormAct.from_torch(block.bn1, "relu", backend=backend)
        self.conv2 = block.conv2
        self.bn2 = BatchNormAct.from_torch(block.bn2, "relu", backend=backend)
        self.downsample = block.downsample
        self.train(block.training)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.bn2.compute(self.bn1.compute(x, conv=self.conv1), identity, conv=self.conv2)


class CrossEntropyLoss(nn.Module):
    """Fused softmax + cross-entropy (class-index targets, mean or sum), gradient from the forward kernel, where
    that pays (ops.cross_entropy_pays: many rows); a CNN's batch runs F.cross_entropy."""

    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "triton"):
        super().__init__()
        _check_backend(backend)
        self.label_smoothing, self.reduction, self.backend = label_smoothing, reduction, backend

    def forward(self, logits, targets):
        backend = self.backend if ops.cross_entropy_pays(logits.shape[0]) else "torch"
        return ops.cross_entropy(logits, targets, self.label_smoothing, self.reduction, backend)


def activation_kind(module: nn.Module) -> str | None:
    """Our name for a torch activation module, or None if we have no kernel for it."""
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    for cls, kind in _ACTIVATION_KINDS.items():
        if isinstance(module, cls):
            return kind
    return None


def _is_pool2x2(module: nn.Module) -> bool:
    """nn.MaxPool2d(2): the pool the fused kernels compute."""
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    return (isinstance(module, nn.MaxPool2d) and pair(module.kernel_size) == (2, 2)
            and pair(module.stride or module.kernel_size) == (2, 2) and pair(module.padding) == (0, 0)
            and pair(module.dilation) == (1, 1) and not module.ceil_mode and not module.return_indices)


def _swappable_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.BatchNorm2d) and not isinstance(module, (BatchNormAct, PoolBatchNormAct))


def _fuse_zoo_blocks(model: nn.Module, backend: str) -> None:
    """The zoo's blocks whose forward is code, not an nn.Sequential: ResNet's BasicBlock and stem, and the
    fast nets' ConvGroup (whose forward hands its activation and the residual to a norm that has that activation,
    and the unpooled conv output to a first norm that pools)."""
    from cudacnn.models.fast import ConvGroup
    from cudacnn.models.resnet import BasicBlock, ResNet

    for module in list(model.modules()):
        if isinstance(module, ResNet) and _swappable_bn(module.bn1) and isinstance(module.relu, nn.ReLU):
            module.bn1 = BatchNormAct.from_torch(module.bn1, "relu", backend=backend)
            module.relu = nn.Identity()  # the stem's only use of it: maxpool(relu(bn1(conv1(x))))
            if _plain_conv(module.conv1):
                module.conv1 = ConvBatchNormAct.from_torch(module.conv1, module.bn1)
        elif isinstance(module, ConvGroup):  # conv -> pool -> BN -> act, then conv -> BN (+ residual) -> act
            for i, norm in enumerate(module.norms):
                if _swappable_bn(norm):
                    fused = PoolBatchNormAct if i == 0 else BatchNormAct
                    module.norms[i] = fused.from_torch(norm, module.activation, backend=backend)
        for name, child in list(module.named_children()):
            if isinstance(child, BasicBlock):
                setattr(module, name, FusedBasicBlock(child, backend))


def _tail(seq: nn.Sequential, name: str):
    """(owner, key, module) of seq's child `name`, or of the last child inside it that is not an nn.Identity
    (left by an earlier fusion) when that child is itself an nn.Sequential; None for an empty one."""
    module = seq._modules[name]
    if not isinstance(module, nn.Sequential):
        return seq, name, module
    for key in reversed(list(module._modules)):
        if not isinstance(module._modules[key], nn.Identity):
            return module, key, module._modules[key]
    return None


def _fuse_sequential(seq: nn.Sequential) -> None:
    """Inside an nn.Sequential: Linear + activation (GEMM epilogue), BatchNormAct + activation, then
    BatchNormAct / Activation + MaxPool2d(2), also when the first ends the previous child nn.Sequential (SmallNet
    pools after its stage's second conv block). A fused-away module becomes nn.Identity, so indices and
    state_dict keys stay; each module pairs with the last one before it that is not an nn.Identity, so
    BatchNorm + ReLU + MaxPool2d fuse into one BatchNormAct."""
    first_name = None  # the last child so far that is not an nn.Identity
    for second_name, second in list(seq._modules.items()):
        tail = _tail(seq, first_name) if first_name is not None else None
        if tail is not None:
            owner, key, first = tail
            if isinstance(first, Linear) and first.activation == "none" and isinstance(second, Activation):
                first.activation = second.kind
            elif (isinstance(first, BatchNormAct) and first.activation == "none" and not first.pool
                  and isinstance(second, Activation)):
                first.activation = second.kind
            elif isinstance(first, BatchNormAct) and not first.pool and _is_pool2x2(second):
                first.pool = True
            elif isinstance(first, Activation) and _is_pool2x2(second):
                setattr(owner, key, ActivationPool(first.kind, first.backend))
            else:
                tail = None
        if tail is not None:
            setattr(seq, second_name, nn.Identity())
        elif not isinstance(second, nn.Identity):
            first_name = second_name


def _plain_conv(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d


def _fuse_convs(model: nn.Module) -> None:
    """Inside each nn.Sequential: an nn.Conv2d followed (nn.Identity aside) by a BatchNormAct or ActivationPool
    becomes a ConvBatchNormAct computing both."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        children = [(name, m) for name, m in seq.named_children() if not isinstance(m, nn.Identity)]
        for (name, first), (_, second) in zip(children, children[1:]):
            if (_plain_conv(first) and isinstance(second, (BatchNormAct, ActivationPool))
                    and not second.applied_by_conv):
                setattr(seq, name, ConvBatchNormAct.from_torch(first, second))


def swap_modules(model: nn.Module, backend: str, fuse: bool = True, batchnorm: bool = True) -> nn.Module:
    """Replace model's nn.Linear / nn.ReLU / nn.GELU / nn.SiLU / nn.BatchNorm2d with ours, in place (returns
    model). With fuse, inside an nn.Sequential an activation right after a Linear moves into the GEMM
    epilogue, one right after a BatchNorm2d into its BatchNormAct, and a following MaxPool2d(2) into that
    BatchNormAct or activation; the zoo's ResNet blocks and stem and the fast nets' conv groups fuse BN +
    activation (+ shortcut add), and an nn.Conv2d right before such a fused module computes it in the same call
    (ConvBatchNormAct; ResNet's blocks and stem likewise). batchnorm=False leaves BatchNorm2d alone (for
    SyncBatchNorm conversion). Convolutions stay PyTorch's (cuDNN). backend "torch" leaves the model
    unchanged."""
    _check_backend(backend)
    if backend == "torch":
        return model
    if fuse and batchnorm:
        _fuse_zoo_blocks(model, backend)
    _swap(model, backend, fuse, batchnorm)
    if fuse:
        _fuse_convs(model)
    return model


def _swap(model: nn.Module, backend: str, fuse: bool, batchnorm: bool) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, (Linear, Activation, ActivationPool, BatchNormAct, PoolBatchNormAct)):
            continue
        if isinstance(child, nn.Linear):
            setattr(model, name, Linear.from_torch(child, backend))
        elif (kind := activation_kind(child)) is not None:
            setattr(model, name, Activation(kind, backend))
        elif batchnorm and _swappable_bn(child):
            setattr(model, name, BatchNormAct.from_torch(child, backend=backend))
        else:
            _swap(child, backend, fuse, batchnorm)
    if fuse and isinstance(model, nn.Sequential):
        _fuse_sequential(model)


def cross_entropy_loss(backend: str = "triton", label_smoothing: float = 0.0) -> nn.Module:
    """The loss module for `cudacnn train --kernels {torch,triton,cuda}`."""
    _check_backend(backend)
    if backend == "torch":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    return CrossEntropyLoss(label_smoothing=label_smoothing, backend=backend)


__all__ = ["Linear", "Activation", "ActivationPool", "BatchNormAct", "PoolBatchNormAct", "ConvBatchNormAct",
           "FusedBasicBlock", "CrossEntropyLoss", "swap_modules", "cross_entropy_loss", "activation_kind"]
