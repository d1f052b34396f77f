"""nn.Module wrappers over the custom ops, and swap_modules() to put them into any model."""

from __future__ import annotations

import torch
from torch import nn

from . import ops

_ACTIVATION_KINDS = {nn.ReLU: "relu", nn.SiLU: "silu"}


def _check_backend(backend: str) -> None:
    if backend not in ops.BACKENDS:
        raise ValueError(f"unknown kernels backend {backend!r}; expected one of {ops.BACKENDS}")


class Linear(nn.Linear):
    """nn.Linear (optionally followed by an activation) on our GEMM with the activation in its epilogue."""

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
        if torch.is_autocast_enabled(x.device.type):  # custom ops are not autocast-aware: cast as nn.Linear is
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        return ops.linear(x, weight, bias, self.activation, self.backend, self.allow_tf32)

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation}, backend={self.backend}"


class Activation(nn.Module):
    def __init__(self, kind: str, backend: str = "triton"):
        super().__init__()
        _check_backend(backend)
        self.kind, self.backend = kind, backend

    def forward(self, x):
        return ops.activation(x, self.kind, self.backend)

    def extra_repr(self):
        return f"kind={self.kind}, backend={self.backend}"


class CrossEntropyLoss(nn.Module):
    """Fused softmax + cross-entropy (class-index targets, mean or sum), gradient from the forward kernel."""

    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "triton"):
        super().__init__()
        _check_backend(backend)
        self.label_smoothing, self.reduction, self.backend = label_smoothing, reduction, backend

    def forward(self, logits, targets):
        return ops.cross_entropy(logits, targets, self.label_smoothing, self.reduction, self.backend)


def activation_kind(module: nn.Module) -> str | None:
    """Our name for a torch activation module, or None if we have no kernel for it."""
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    for cls, kind in _ACTIVATION_KINDS.items():
        if isinstance(module, cls):
            return kind
    return None


def swap_modules(model: nn.Module, backend: str, fuse: bool = True) -> nn.Module:
    """Replace model's nn.Linear / nn.ReLU / nn.GELU / nn.SiLU with ours, in place (returns model).
    With fuse, an activation right after a Linear inside an nn.Sequential moves into the GEMM epilogue.
    backend "torch" leaves the model unchanged."""
    _check_backend(backend)
    if backend == "torch":
        return model
    for name, child in list(model.named_children()):
        if isinstance(child, (Linear, Activation)):
            continue
        if isinstance(child, nn.Linear):
            setattr(model, name, Linear.from_torch(child, backend))
        elif (kind := activation_kind(child)) is not None:
            setattr(model, name, Activation(kind, backend))
        else:
            swap_modules(child, backend, fuse)
    if fuse and isinstance(model, nn.Sequential):
        children = list(model.named_children())
        for (_, first), (second_name, second) in zip(children, children[1:]):
            if isinstance(first, Linear) and first.activation == "none" and isinstance(second, Activation):
                first.activation = second.kind
                setattr(model, second_name, nn.Identity())
    return model


def cross_entropy_loss(backend: str = "triton", label_smoothing: float = 0.0) -> nn.Module:
    """The loss module for `cudacnn train --kernels {torch,triton,cuda}`."""
    _check_backend(backend)
    if backend == "torch":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    return CrossEntropyLoss(label_smoothing=label_smoothing, backend=backend)


__all__ = ["Linear", "Activation", "CrossEntropyLoss", "swap_modules", "cross_entropy_loss", "activation_kind"]
