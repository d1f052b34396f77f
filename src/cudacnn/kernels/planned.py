"""The fused BatchNorm op's eager training calls through C++ (cuda/planned_launch.cpp): a forward and a C++
autograd backward that launch the op's compiled Triton kernels from recorded launch plans.

Why: an eager CNN epoch is host-bound, and each call of the op from Python (batchnorm.py through
ops._BatchNormAct) costs more host time than PyTorch's BatchNorm + ReLU + pool (benchmarks/kernels.md). The
C++ path does per call what the Python one does (allocate the buffers, launch the kernels, save for
backward) without the interpreter, the Python autograd node or Triton's launcher.

How: the first call with a new key (flags, device, and each tensor's dtype, sizes, strides and 16-byte
alignment) runs the Python path once, forward and backward, on copies of the running statistics and a zero
gradient, under _launch.recording(): that compiles the kernels (or finds them in Triton's cache) and yields
each launch's compiled kernel and arguments. make_plan turns them into a plan: the buffers to allocate, and
for each launch its CUfunction, grid, block, shared memory and runtime parameters in the order the compiled
kernel takes them (the signature's non-constexpr entries, as Triton's own launcher passes them), each a
tensor slot, a constant or the call's momentum / eps. The real call then runs through C++. The key fixes
every integer argument (sizes, strides, split factors) and Triton's specialization, so the plan is exactly
what the Python path would launch; tests check the results are bit-identical.

Taken by ops.batchnorm_act for eager training calls on a GPU that need gradients (the training step);
eval, no-grad and traced calls keep the Python path. ops.conv_batchnorm_act also runs the convolution before
the op (cuDNN, through ATen) in the same C++ node, once its key is linked to the op's plans (link_conv). The
extension is built on first use (about a minute, cached like the CUDA kernels: cuda_ext.build_dir).
CUDACNN_PLANNED_LAUNCH=0, or ENABLED = False, turns the path off; so does a failed build, with one warning."""

from __future__ import annotations

import functools
import os
import sys
import warnings

import torch

from . import _launch
from . import batchnorm as _bn
from .activations import activation_code

ENABLED = os.environ.get("CUDACNN_PLANNED_LAUNCH", "1") != "0"

SOURCE = "planned_launch.cpp"
# Argument kinds, as in planned_launch.cpp.
SLOT, INT32, INT64, FLOAT32, SCALAR = range(5)
SCALARS = ("momentum", "eps")  # float parameters taken from the call, by name, not fixed in the plan

_REFUSED: set[tuple] = set()  # keys whose calls can't be planned: the Python path, without recording again
_COMPILED: list = []  # the plans' compiled kernels, kept so that their modules stay loaded


class Unplannable(Exception):
    """A launch that a plan can't reproduce (a parameter type, scratch memory, clusters)."""


def _build():
    from torch.utils.cpp_extension import load

    from . import cuda_ext

    print("cudacnn: building the C++ launcher of the fused BatchNorm (once; about a minute)", file=sys.stderr,
          flush=True)
    path = cuda_ext.SOURCE_DIR / SOURCE
    build_dir, tag = cuda_ext.build_dir([path], "planned")
    return load(name=f"cudacnn_{tag}", sources=[str(path)], extra_cflags=["-O2"], with_cuda=True,
                build_directory=str(build_dir), verbose=os.environ.get("CUDACNN_CUDA_VERBOSE") == "1")


@functools.cache
def extension():
    """The built extension, or None (no build possible here: one warning, and the Python path stays)."""
    try:
        return _build()
    except Exception as error:  # a compiler, header or link problem: the op still works, only slower
        warnings.warn(f"cudacnn: the C++ launcher of the fused BatchNorm could not be built ({error}); eager steps "
                      f"run its Python launcher (slower). Set CUDACNN_PLANNED_LAUNCH=0 to skip the build.",
                      stacklevel=3)
        return None


def _built():
    """The extension if an earlier call built it (asking must not build it), else None."""
    return extension() if extension.cache_info().currsize else None


def plan_count() -> int:
    """Plans registered so far (keys whose training calls run from C++); 0 if the extension was never built."""
    ext = _built()
    return ext.plan_count() if ext is not None else 0


def conv_link_count() -> int:
    """Convolution call keys that run with the op under one node (ops.conv_batchnorm_act); 0 if never built."""
    ext = _built()
    return ext.conv_link_count() if ext is not None else 0


def config_code(activation: str, pool: bool, normalize: bool) -> int:
    return activation_code(activation) * 4 + pool * 2 + normalize


# ---------------------------------------------------------------- plans from recorded launches

def _parameter_values(kernel, args: tuple, kwargs: dict) -> dict:
    values = {p.name: a for p, a in zip(kernel.params, args)}
    values.update(kwargs)
    for p in kernel.params:
        if p.name not in values:
            values[p.name] = p.default
    return values


def launch_entry(kernel, grid, args: tuple, kwargs: dict, compiled, slot_of) -> tuple:
    """(function, grid x3, threads, shared bytes, [(kind, value, real)]) of one recorded launch; slot_of maps a
    tensor argument to its slot."""
    md = compiled.metadata
    if (getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_pdl", False)
            or getattr(md, "launch_cooperative_grid", False) or getattr(md, "global_scratch_size", 0)
            or getattr(md, "profile_scratch_size", 0)):
        raise Unplannable(f"{kernel.fn.__name__} needs clusters, scratch memory or a special launch")
    if type(grid) is not tuple or not 1 <= len(grid) <= 3:
        raise Unplannable("a grid other than a tuple of sizes")
    values = _parameter_values(kernel, args, kwargs)
    entries = []
    for name, kind in compiled.src.signature.items():
        if kind == "constexpr":  # constexpr parameters, and ints Triton specialized as constants (== 1)
            continue
        if isinstance(name, int):  # keyed by position rather than name
            name = kernel.params[name].name
        value = values[name]
        if isinstance(kind, str) and kind.startswith("*"):
            if not isinstance(value, torch.Tensor):
                raise Unplannable(f"pointer parameter {name} got {type(value).__name__}")
            entries.append((SLOT, slot_of(value), 0.0))
        elif kind == "i32":
            entries.append((INT32, int(value), 0.0))
        elif kind == "i64":
            entries.append((INT64, int(value), 0.0))
        elif kind == "fp32":
            entries.append((SCALAR, SCALARS.index(name), 0.0) if name in SCALARS else (FLOAT32, 0, float(value)))
        else:
            raise Unplannable(f"parameter {name} of type {kind}")
    return (compiled.function, list((*grid, 1, 1)[:3]), 32 * md.num_warps, md.shared, entries)


def _layout(t: torch.Tensor) -> tuple:
    return list(t.shape), list(t.stride()), torch.empty(0, dtype=t.dtype)


def make_plan(inputs: tuple, launches: list, outputs: tuple, constants: tuple = (), first=None) -> tuple:
    """The plan (planned_launch.cpp's to_plan) of recorded launches: slots [0, len(inputs)) are the inputs
    (None: absent), then one per other tensor the launches took (a buffer allocated each call, in its recorded
    layout), then the constants (tensors the plan holds: the shared counters). outputs: tensors to return, by
    slot (None: -1); first: the tensor whose layout the first input must have (backward's gradient)."""
    tags: dict[int, tuple] = {}  # id(tensor) -> ("input" | "buffer" | "constant", index)
    buffers: list[torch.Tensor] = []
    for i, t in enumerate(inputs):
        if t is not None:
            tags.setdefault(id(t), ("input", i))
    for j, t in enumerate(constants):
        tags.setdefault(id(t), ("constant", j))

    def tag_of(t):
        tag = tags.get(id(t))
        if tag is None:
            tag = tags[id(t)] = ("buffer", len(buffers))
            buffers.append(t)  # also keeps t alive, so its id stays its own while planning
        return tag

    entries = [launch_entry(*launch, slot_of=tag_of) for launch in launches]
    outputs_tags = [tag_of(t) if t is not None else None for t in outputs]
    base = {"input": 0, "buffer": len(inputs), "constant": len(inputs) + len(buffers)}

    def slot(tag):
        return -1 if tag is None else base[tag[0]] + tag[1]

    entries = [(f, grid, threads, shared, [(k, slot(v) if k == SLOT else v, r) for k, v, r in args])
               for f, grid, threads, shared, args in entries]
    return (len(inputs), [_layout(t) for t in buffers], list(constants), entries,
            [slot(tag) for tag in outputs_tags], _layout(first) if first is not None else None)


# ---------------------------------------------------------------- recording a key's plans

def _plannable(x, weight, bias, running_mean, running_var) -> bool:
    """What the recording needs: the Triton kernels run the call (no PyTorch fallback inside), d weight and
    d bias come straight from the kernel (float32), and the running statistics' copies align as they do."""
    if not (_bn._triton_ok(x) and x.is_cuda and x.numel() > 0):
        return False
    if any(t is not None and t.dtype != torch.float32 for t in (weight, bias)):
        return False
    return all(t is None or t.data_ptr() % 16 == 0 for t in (running_mean, running_var))


def _record(ext, key, config, x, weight, bias, residual, running_mean, running_var, momentum, eps, activation,
            pool, normalize) -> bool:
    """Runs the Python path once forward and backward under _launch.recording() and registers the key's plans.
    The running statistics are copies, so the real call (through C++ afterwards) updates them once."""
    if not _plannable(x, weight, bias, running_mean, running_var):
        return False
    _bn.check_inputs(x, weight, bias, residual, activation, pool, normalize)
    counters = _bn._counters(x.device, max(64, x.shape[1]), shared=True)  # large enough for any launch here
    rm = running_mean.clone() if running_mean is not None else None
    rv = running_var.clone() if running_var is not None else None
    with torch.no_grad():
        with _launch.recording() as forward:
            y, mean, rstd = _bn.eager_forward(x, weight, bias, residual, rm, rv, True, momentum, eps, activation,
                                              pool, normalize)
        grad = torch.zeros_like(y)
        with _launch.recording() as backward:
            # without the BatchNorm, db is the sum of dx over each channel: a conv node's bias gradient
            dx, dw, db, dres = _bn.backward(grad, x, weight, bias, residual, mean, rstd, normalize, normalize,
                                            activation, pool, True, shared_counters=True, input_sum=not normalize)
    if (weight is not None and dw is None) or (bias is not None and db is None):
        return False
    try:
        plans = (make_plan((x, weight, bias, residual, rm, rv), forward, (y, mean, rstd), (counters,)),
                 make_plan((grad, x, weight, bias, residual, mean, rstd), backward, (dx, dw, db, dres), (counters,),
                           first=grad))
    except Unplannable:
        return False
    _COMPILED.extend(launch[4] for launch in forward + backward)
    ext.add_plan(key, *plans)
    return True


def batchnorm_act(x, weight, bias, residual, running_mean, running_var, momentum: float, eps: float,
                  activation: str, pool: bool, normalize: bool):
    """ops.batchnorm_act's training call through C++ (a tensor with its C++ autograd node), or None: the caller
    takes the Python path. The caller checked: eager, training, gradients wanted, x on a GPU."""
    ext = extension()
    if ext is None:
        return None
    config = config_code(activation, pool, normalize)
    y = ext.batchnorm_act(config, x, weight, bias, residual, running_mean, running_var, momentum, eps)
    if y is not None:
        return y
    key = tuple(ext.key_of(config, x, weight, bias, residual, running_mean, running_var))
    if key in _REFUSED or not _record(ext, list(key), config, x, weight, bias, residual, running_mean, running_var,
                                      momentum, eps, activation, pool, normalize):
        _REFUSED.add(key)
        return None
    return ext.batchnorm_act(config, x, weight, bias, residual, running_mean, running_var, momentum, eps)


# ---------------------------------------------------------------- a convolution and the op in one node

_CASTS: dict = {}  # dtype -> an empty tensor of it: how the extension is told autocast's dtype


def _autocast_template(device_type: str):
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    template = _CASTS.get(dtype)
    if template is None:
        template = _CASTS[dtype] = torch.empty(0, dtype=dtype)
    return template


def conv_batchnorm_act(x, conv_weight, conv_bias, stride, padding, dilation, groups, weight, bias, residual,
                       running_mean, running_var, momentum: float, eps: float, activation: str, pool: bool,
                       normalize: bool):
    """The fused op on F.conv2d(x, conv_weight, conv_bias, ...) through one C++ autograd node (the convolution
    is PyTorch's, autocast's casts included), or None: no plan is linked to this call's key yet (the caller
    runs the two calls, then link_conv). The caller checked as for batchnorm_act."""
    ext = extension()
    if ext is None:
        return None
    return ext.conv_batchnorm_act(config_code(activation, pool, normalize), x, conv_weight, conv_bias, stride,
                                  padding, dilation, groups, _autocast_template(x.device.type), weight, bias,
                                  residual, running_mean, running_var, momentum, eps)


def link_conv(x, conv_weight, conv_bias, stride, padding, dilation, groups, y, weight, bias, residual, running_mean,
              running_var, activation: str, pool: bool, normalize: bool) -> None:
    """After conv_batchnorm_act returned None and the call ran as F.conv2d (giving y) and the fused op (which
    recorded y's plans if it could): maps the call's key to those plans, for its next calls."""
    ext = extension()
    if ext is not None:
        ext.link_conv(config_code(activation, pool, normalize), x, conv_weight, conv_bias, stride, padding, dilation,
                      groups, _autocast_template(x.device.type), y, weight, bias, residual, running_mean,
                      running_var)
