"""Where a kernel runs: compiled Triton on a GPU, the Triton interpreter on the CPU (TRITON_INTERPRET=1,
how CI tests the kernels), or the plain PyTorch reference with one warning when neither is possible."""

from __future__ import annotations

import importlib
import os
import sys
import types
import warnings

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # triton is an optional extra: keep the module importable, run the references
    HAS_TRITON = False

    def _identity_decorator(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    triton = types.SimpleNamespace(jit=_identity_decorator, autotune=_identity_decorator,
                                   Config=lambda *a, **k: None, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=object)

# Modules whose kernels are decorated with triton.jit at import: triton picks compiled or interpreted
# kernels at decoration time, so a module imported before TRITON_INTERPRET=1 was set is reloaded once.
KERNEL_MODULES = ("cudacnn.kernels.activations", "cudacnn.kernels.gemm", "cudacnn.kernels.cross_entropy",
                  "cudacnn.kernels.batchnorm", "cudacnn.kernels.pool_bn_act", "cudacnn.kernels.conv")

_warned_fallback = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_ready() -> bool:
    """Triton's own library (tl.sum, tl.cdiv...) is built for the interpreter only when TRITON_INTERPRET=1
    was set before triton was first imported; our kernel modules are reloaded as needed."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.cdiv, InterpretedFunction)


def _refresh_interpreted_kernels() -> None:
    for name in KERNEL_MODULES:  # order matters: gemm imports activation helpers, pool_bn_act batchnorm's
        module = sys.modules.get(name)
        if module is not None and not getattr(module, "BUILT_FOR_INTERPRETER", False):
            importlib.reload(module)


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel can run on these tensors; else warns once and the caller uses the
    reference implementation."""
    global _warned_fallback
    device_type = tensors[0].device.type
    if HAS_TRITON and device_type == "cuda" and not interpreting():
        return True
    if HAS_TRITON and device_type == "cpu" and interpreting() and interpreter_ready():
        _refresh_interpreted_kernels()
        return True
    if not _warned_fallback:
        _warned_fallback = True
        why = ("triton is not installed" if not HAS_TRITON else
               "triton was imported before TRITON_INTERPRET=1 was set" if interpreting() and device_type == "cpu"
               else f"tensors are on {device_type}, not a CUDA GPU")
        warnings.warn(f"cudacnn.kernels: {why}; using the PyTorch reference implementations "
                      "(set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)", RuntimeWarning, stacklevel=3)
    return False


def write_contiguous(out: torch.Tensor, launch) -> torch.Tensor:
    """launch(dst) writes a contiguous tensor: `out` itself when it is contiguous, else scratch copied into `out`
    (the kernels index flat memory)."""
    dst = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    launch(dst)
    return out if dst is out else out.copy_(dst)


def check_out(out: torch.Tensor | None, shape, dtype, device) -> torch.Tensor:
    """Validate a caller-provided output buffer or allocate one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != torch.device(device):
        raise ValueError(f"out has shape {tuple(out.shape)}, {out.dtype} on {out.device}; "
                         f"expected {tuple(shape)}, {dtype} on {device}")
    return out
