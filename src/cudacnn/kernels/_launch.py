"""Launch a compiled Triton kernel without Triton's per-call launch path.

Why: `kernel[grid](*args)` on a JITFunction binds the arguments, computes the specialization of every one
(type, divisibility by 16, == 1), builds a string cache key from them and the options, reads several knobs,
checks the globals the kernel uses and builds launch metadata, on every call. Our eager BatchNorm op
(batchnorm.py, four launches of 20-35 arguments for a forward and backward) measured ~0.2 ms a forward and
~0.9 ms a forward+backward launched from Python, whatever the tensor size, of which our own wrapper was
24 / 91 us (scripts/profile_eager_host.py, launches stubbed): the rest is Triton's launch path and the
driver's launch, which this keeps (dev/launch_overhead.py times both paths on a GPU).

What: `launch(kernel, grid, *args, **kwargs)` does what `kernel[grid](*args, **kwargs)` does. The first call
with a given specialization goes through that plain path (which compiles, or finds the kernel in Triton's
cache) and keeps the CompiledKernel it returns; later calls with the same specialization call its launcher
directly, as Triton itself does last (and as Inductor's generated code does).

Compiled kernels are kept by what Triton specializes a compilation on (spec_key), per argument as Triton
3.x does:
  - a tensor: its dtype and whether its data pointer is 16-byte aligned;
  - an int: whether it is 1 (Triton makes it a constant, and the launcher then ignores the value), whether
    it is divisible by 16, and its type (int32 when it fits, else int64, else uint64);
  - a float, bool or None: the type alone (Triton does not specialize on their values);
plus the keyword arguments (constexprs and options such as num_warps) by value, the current device (Triton
compiles and loads per device), the kernel and knobs.runtime.debug. A call looks its kernel up by a finer key
that is cheaper to compute (exact_key: ints by value, 3 us against 7 us for 35 arguments on one CPU core),
filled from the first; so a new batch size costs one spec_key and no plain launch when its specialization is
known. Anything else takes the plain path: another argument type, a constexpr passed by position, a callable
grid, the interpreter (TRITON_INTERPRET=1: kernels are InterpretedFunctions, nothing is compiled), autotuned
kernels (an Autotuner, not a JITFunction), launch hooks (a profiler such as proton registers them), pre-run
hooks, and any Triton version outside the range whose launch path this was written against (3.6 to 3.x, read
in 3.6 and 3.9). Not in the keys: Triton knobs other than debug that the plain path passes to the compiler
(instrumentation_mode, fpsan): set them before the first launch. Set CUDACNN_TRITON_FAST_LAUNCH=0, or ENABLED = False, to always take the plain path."""

from __future__ import annotations

import contextlib
import os
import re

import torch

from ._runtime import HAS_TRITON

ENABLED = os.environ.get("CUDACNN_TRITON_FAST_LAUNCH", "1") != "0"

_MAX_ENTRIES = 4096  # distinct (kernel, specialization) pairs kept; past it the cache starts over


def _supported_triton() -> bool:
    """3.6 <= version < 4: the CompiledKernel launcher takes (grid x3, stream, function, packed metadata,
    launch metadata, enter hook, exit hook, *every bound argument, constexprs included)."""
    if not HAS_TRITON:
        return False
    import triton

    match = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return match is not None and (3, 6) <= (int(match[1]), int(match[2])) < (4, 0)


if _supported_triton():
    from triton import knobs as _knobs
    from triton.runtime.jit import JITFunction as _JITFunction
else:
    _knobs = _JITFunction = None

_INT32 = range(-(1 << 31), 1 << 31)
_INT64 = range(-(1 << 63), 1 << 63)
_PLAIN_TYPES = (float, bool, type(None))


def arg_key(a):
    """What Triton specializes a compilation on for argument a (see the module docstring)."""
    kind = type(a)
    if kind is int:
        if a == 1:
            return 1
        divisible = (a & 15) == 0
        return ("i32" if a in _INT32 else "i64" if a in _INT64 else "u64", divisible)
    if kind in _PLAIN_TYPES:
        return kind
    if isinstance(a, torch.Tensor):
        return a.dtype, (a.data_ptr() & 15) == 0
    raise TypeError(f"no fast launch for an argument of type {kind.__name__}")


def _debug() -> bool:
    return _knobs.runtime.debug if _knobs is not None else False


def spec_key(kernel, device: int, args: tuple, kwargs: dict) -> tuple:
    """Equal keys mean Triton would run the same compiled kernel."""
    return (id(kernel), device, _debug(), tuple(kwargs.items()), *map(arg_key, args))


def exact_key(kernel, device: int, args: tuple, kwargs: dict) -> tuple:
    """A finer key than spec_key (ints by value; every other argument as there, or by its type alone where
    arg_key would refuse it, which no cached key then holds), computed without a call per argument."""
    return (id(kernel), device, _debug(), tuple(kwargs.items()),
            *[a if type(a) is int else (a.dtype, (a.data_ptr() & 15) == 0) if isinstance(a, torch.Tensor)
              else type(a) for a in args])


class _Entry:
    """A compiled kernel with its launcher, loaded handle and packed metadata, and the values of its
    parameters after the positional ones (constexprs: the launcher takes every parameter and skips the
    constant ones)."""

    __slots__ = ("kernel", "compiled", "run", "function", "metadata", "tail")

    def __init__(self, kernel, compiled, tail: tuple):
        self.kernel, self.compiled, self.run, self.function = kernel, compiled, compiled.run, compiled.function
        self.metadata, self.tail = compiled.packed_metadata, tail


_BY_SPEC: dict[tuple, _Entry] = {}  # spec_key -> entry
_BY_EXACT: dict[tuple, _Entry] = {}  # exact_key -> the same entries
_device_and_stream = None  # Triton's own (get_current_device, get_current_stream), bound on first use


def _hooks_active() -> bool:
    """Launch hooks (e.g. a profiler's) need Triton's launch metadata: the plain path builds it."""
    for hook in (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):  # an empty HookChain is no hook
            return True
    return False


def _grid3(grid) -> tuple | None:
    if type(grid) is not tuple or not 1 <= len(grid) <= 3:
        return None  # a callable grid needs the bound arguments: the plain path
    return (grid + (1, 1))[:3]


def _tail(kernel, args: tuple, kwargs: dict) -> tuple | None:
    """The values of the parameters after the positional arguments; None unless they are all constexprs
    (only then does the key, which holds the keyword values exactly, fix them) and no positional argument is
    a constexpr (the key holds a positional float or bool by type only)."""
    params = kernel.params
    if len(args) > len(params) or any(p.is_constexpr for p in params[:len(args)]):
        return None
    tail = []
    for p in params[len(args):]:
        if not p.is_constexpr or (p.name not in kwargs and not p.has_default):
            return None
        tail.append(kwargs.get(p.name, p.default))
    return tuple(tail)


_recorded: list | None = None  # while recording(): each launch's (kernel, grid, args, kwargs, compiled kernel)


@contextlib.contextmanager
def recording():
    """Launches in the block take the plain path, and each appends (kernel, grid, args, kwargs, the compiled
    kernel it ran) to the list this yields (planned.py makes C++ launch plans of them)."""
    global _recorded
    outer, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = outer


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), through the cached compiled kernel when one matches."""
    global _device_and_stream
    if _recorded is not None:
        compiled = kernel[grid](*args, **kwargs)
        _recorded.append((kernel, grid, args, kwargs, compiled))
        return compiled
    grid3 = _grid3(grid)
    if (not ENABLED or grid3 is None or type(kernel) is not _JITFunction or kernel.pre_run_hooks
            or _hooks_active()):
        return kernel[grid](*args, **kwargs)
    if _device_and_stream is None:
        from triton.runtime.driver import driver

        _device_and_stream = driver.active.get_current_device, driver.active.get_current_stream
    device = _device_and_stream[0]()
    try:
        key = exact_key(kernel, device, args, kwargs)
        entry = _BY_EXACT.get(key)
    except (TypeError, RuntimeError):  # an unhashable keyword value; a tensor without storage
        return kernel[grid](*args, **kwargs)
    if entry is None or entry.kernel is not kernel:
        entry = _lookup(key, kernel, device, args, kwargs)
        if entry is None:
            return _miss(key, kernel, grid, args, kwargs, device)
    entry.run(*grid3, _device_and_stream[1](device), entry.function, entry.metadata, None, None, None, *args,
              *entry.tail)
    return entry.compiled


def _lookup(key, kernel, device, args, kwargs) -> _Entry | None:
    """The entry of this call's specialization, if one is cached (then also under the exact key)."""
    try:
        entry = _BY_SPEC.get(spec_key(kernel, device, args, kwargs))
    except TypeError:  # an argument type the key does not describe
        return None
    if entry is not None and entry.kernel is kernel:
        _remember(_BY_EXACT, key, entry)
        return entry
    return None


def _miss(key, kernel, grid, args, kwargs, device):
    """The plain launch; keeps the compiled kernel it ran when the keys fix all that it was compiled for."""
    compiled = kernel[grid](*args, **kwargs)
    tail = _tail(kernel, args, kwargs)
    if tail is None or getattr(compiled, "function", None) is None or not hasattr(compiled, "packed_metadata"):
        return compiled
    try:
        spec = spec_key(kernel, device, args, kwargs)
    except TypeError:
        return compiled
    entry = _Entry(kernel, compiled, tail)
    _remember(_BY_SPEC, spec, entry)
    _remember(_BY_EXACT, key, entry)
    return compiled


def _remember(cache: dict, key: tuple, entry: _Entry) -> None:
    if len(cache) >= _MAX_ENTRIES:  # shapes without end (none of our callers): start over
        cache.clear()
    cache[key] = entry


def active() -> bool:
    """Whether launches may take the cached path: enabled, and a Triton whose launch path this knows."""
    return ENABLED and _JITFunction is not None


def cached_launches() -> int:
    """How many specializations have a cached launcher (tests check that the fast path is taken)."""
    return len(_BY_SPEC)
