"""The cached Triton launch path (kernels/_launch.py): its key against Triton's own specialization, its
cache and fallbacks with a stand-in kernel (the CPU has no compiled Triton), and on a GPU that the fused
BatchNorm's results through it are bit-identical to the plain `kernel[grid](...)` launch."""

from __future__ import annotations

import types

import pytest
import torch

from cudacnn.kernels import _launch as L

# ---------------------------------------------------------------- the key against Triton's specialization


def _triton_specialization():
    """Triton's per-argument specialization function, as its binder calls it (is_const, specialize, align)."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    if not hasattr(libtriton, "native_specialize_impl"):
        pytest.skip("this Triton has no native_specialize_impl")
    from triton.backends.compiler import BaseBackend

    return lambda a: libtriton.native_specialize_impl(BaseBackend, a, False, True, True)


def _samples():
    base = torch.empty(64)
    ints = [0, 1, 2, 15, 16, 17, 32, 48, 4096, 4097, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16,
            -2**31, -2**31 - 1, -2**31 - 16, 2**63 - 16, 2**63, 2**64 - 1, 2**64 - 16]
    tensors = [base, base[4:], base[1:], base[2:], torch.empty(8, dtype=torch.bfloat16),
               torch.empty(8, dtype=torch.bfloat16)[1:], torch.empty(8, dtype=torch.bfloat16)[8:],
               torch.empty(4, dtype=torch.int32), torch.nn.Parameter(torch.empty(8))]
    return ints + tensors + [0.0, 1.0, 2.5, True, False, None]


def test_equal_keys_mean_equal_triton_specializations_and_back():
    """The key holds exactly what Triton specializes on: two arguments share a key if and only if Triton
    specializes them alike (a coarser key would launch a kernel compiled for another alignment or type)."""
    specialize = _triton_specialization()
    samples = _samples()
    for a in samples:
        for b in samples:
            same_key = L.arg_key(a) == L.arg_key(b)
            same_triton = repr(specialize(a)) == repr(specialize(b))
            assert same_key == same_triton, (a if not isinstance(a, torch.Tensor) else a.data_ptr(),
                                             b if not isinstance(b, torch.Tensor) else b.data_ptr())


def test_the_exact_key_is_finer_than_the_specialization_key():
    """Calls are looked up by exact_key: equal exact keys must mean equal specializations."""
    kernel, samples = object(), _samples()
    for a in samples:
        for b in samples:
            if L.exact_key(kernel, 0, (a,), {}) == L.exact_key(kernel, 0, (b,), {}):
                assert L.spec_key(kernel, 0, (a,), {}) == L.spec_key(kernel, 0, (b,), {}), (a, b)
    assert L.exact_key(kernel, 0, (32,), {}) != L.exact_key(kernel, 0, (48,), {})


def test_keys_differ_in_divisibility_alignment_and_one_and_share_otherwise():
    kernel = object()
    x = torch.empty(64)
    kw = dict(BLOCK=64, num_warps=4)

    def key(*args, **kwargs):
        return L.spec_key(kernel, 0, args, kwargs or kw)

    assert key(x, 32) == key(x, 48)  # both divisible by 16: one compiled kernel
    assert key(x, 32) != key(x, 33)  # divisibility by 16
    assert key(x, 17) == key(x, 33)
    assert key(x, 1) != key(x, 17)  # 1 is a constant in the compiled kernel
    assert key(x, 16) != key(x, 2**32)  # int32 against int64
    assert key(x, 32) != key(x[1:], 32)  # a 4-byte offset breaks the 16-byte alignment
    assert key(x, 32) == key(x[4:], 32)
    assert key(x, 32) != key(x.to(torch.bfloat16), 32)
    assert key(x, 32, 0.5) == key(x, 32, 2.0)  # float values are not specialized on
    assert key(x, 32, 1) != key(x, 32, True)  # True == 1 in Python; Triton types it bool (u1)
    assert key(x, 32) != key(x, 32, BLOCK=128, num_warps=4)
    assert key(x, 32) != key(x, 32, BLOCK=64, num_warps=8)
    assert key(x, 32) != L.spec_key(kernel, 1, (x, 32), kw)  # another device
    with pytest.raises(TypeError):
        key(x, (1, 2))  # a tuple argument: not described by the key


# ---------------------------------------------------------------- cache and fallbacks with a stand-in kernel


class _Compiled:
    """Stands in for a CompiledKernel: its launcher records the calls."""

    def __init__(self, calls):
        self.function, self.packed_metadata = "function-handle", (4, 1, 0)
        self.run = lambda *a: calls.append(("fast", a))


class _Kernel:
    """Stands in for a JITFunction with parameters (x_ptr, n, BLOCK: constexpr, EVEN: constexpr = True)."""

    def __init__(self):
        self.calls, self.pre_run_hooks = [], []
        self.compiled = _Compiled(self.calls)
        self.params = [types.SimpleNamespace(name=name, is_constexpr=const, has_default=name == "EVEN",
                                             default=True if name == "EVEN" else None)
                       for name, const in (("x_ptr", False), ("n", False), ("BLOCK", True), ("EVEN", True))]

    def __getitem__(self, grid):
        def plain(*args, **kwargs):
            self.calls.append(("plain", grid, args, kwargs))
            return self.compiled

        return plain


@pytest.fixture
def stand_in(monkeypatch):
    """A stand-in kernel taken for a JITFunction, device 0 with stream 7, no launch hooks, an empty cache."""
    monkeypatch.setattr(L, "_JITFunction", _Kernel)
    monkeypatch.setattr(L, "_device_and_stream", (lambda: 0, lambda device: 7))
    hooks = types.SimpleNamespace(debug=False, launch_enter_hook=types.SimpleNamespace(calls=[]),
                                  launch_exit_hook=None)
    monkeypatch.setattr(L, "_knobs", types.SimpleNamespace(runtime=hooks))
    monkeypatch.setattr(L, "ENABLED", True)
    monkeypatch.setattr(L, "_BY_SPEC", {})
    monkeypatch.setattr(L, "_BY_EXACT", {})
    return _Kernel()


def _kinds(kernel):
    return [call[0] for call in kernel.calls]


def test_second_call_of_a_specialization_runs_the_compiled_launcher(stand_in):
    x = torch.empty(64)
    for n in (64, 128, 128):  # all divisible by 16: one specialization, found by spec_key, then exact_key
        assert L.launch(stand_in, (4, 2), x, n, BLOCK=16) is stand_in.compiled
    assert _kinds(stand_in) == ["plain", "fast", "fast"]
    # the launcher's arguments: grid padded to 3-D, stream, handle, metadata, no launch metadata or hooks, then
    # every parameter in order, the constexprs' values (keyword, then default) after the positional ones
    assert stand_in.calls[2][1] == (4, 2, 1, 7, "function-handle", (4, 1, 0), None, None, None, x, 128, 16, True)
    assert L.cached_launches() == 1
    assert len(L._BY_EXACT) == 2


def test_a_new_specialization_takes_the_plain_path_first(stand_in):
    x = torch.empty(64)
    for args, kwargs in [((x, 64), {}), ((x, 65), {}), ((x[1:], 64), {}), ((x, 1), {}), ((x, 64), {"EVEN": False}),
                         ((x, 64), {"num_warps": 8})]:
        L.launch(stand_in, (4,), *args, BLOCK=16, **kwargs)
        L.launch(stand_in, (4,), *args, BLOCK=16, **kwargs)
    assert _kinds(stand_in) == ["plain", "fast"] * 6
    assert stand_in.calls[-1][1][-3:] == (64, 16, True)  # num_warps is an option, not a parameter
    assert L.cached_launches() == 6


def test_recording_takes_the_plain_path_and_lists_each_launch(stand_in):
    """What the C++ launch plans are made of (kernels/planned.py): the compiled kernel each launch ran, with its
    arguments; the cached launcher is bypassed, so even a cached specialization yields its compiled kernel."""
    x = torch.empty(64)
    L.launch(stand_in, (4,), x, 64, BLOCK=16)  # plain, now cached
    with L.recording() as launches:
        L.launch(stand_in, (4,), x, 64, BLOCK=16)
        with L.recording() as inner:  # nested: the inner block's launches go to its own list
            L.launch(stand_in, (2, 2), x, 32, BLOCK=8)
        L.launch(stand_in, (1,), x, 16, BLOCK=4)
    L.launch(stand_in, (4,), x, 64, BLOCK=16)  # recording over: the cache again
    assert _kinds(stand_in) == ["plain", "plain", "plain", "plain", "fast"]
    assert [(grid, args, kwargs) for _, grid, args, kwargs, _ in launches] == [((4,), (x, 64), {"BLOCK": 16}),
                                                                              ((1,), (x, 16), {"BLOCK": 4})]
    assert [(grid, args) for _, grid, args, _, _ in inner] == [((2, 2), (x, 32))]
    assert all(kernel is stand_in and compiled is stand_in.compiled for kernel, _, _, _, compiled in launches)


@pytest.mark.parametrize("case", ["disabled", "callable grid", "launch hook", "pre-run hook", "positional constexpr",
                                  "keyword runtime argument", "tuple argument", "not a JITFunction"])
def test_fallbacks_always_take_the_plain_path(stand_in, monkeypatch, case):
    x = torch.empty(64)
    grid, args, kwargs = (4,), (x, 64), {"BLOCK": 16}
    kernel = stand_in
    if case == "disabled":
        monkeypatch.setattr(L, "ENABLED", False)
    elif case == "callable grid":
        def grid(meta):
            return (4,)
    elif case == "launch hook":
        L._knobs.runtime.launch_enter_hook.calls.append(print)
    elif case == "pre-run hook":
        stand_in.pre_run_hooks.append(print)
    elif case == "positional constexpr":
        args, kwargs = (x, 64, 16), {}
    elif case == "keyword runtime argument":
        args, kwargs = (x,), {"n": 64, "BLOCK": 16}
    elif case == "tuple argument":
        args = (x, (64, 1))
    else:
        monkeypatch.setattr(L, "_JITFunction", type(None))
    for _ in range(3):
        L.launch(kernel, grid, *args, **kwargs)
    assert _kinds(stand_in) == ["plain"] * 3
    assert L.cached_launches() == 0


def test_interpreted_kernels_take_the_plain_path(triton_interpreter):
    """Under TRITON_INTERPRET=1 the kernels are InterpretedFunctions: nothing is cached, results are Triton's."""
    if torch.cuda.is_available():
        pytest.skip("runs the interpreter on the CPU")
    from cudacnn.kernels import activations

    before = L.cached_launches()
    x = torch.randn(1000)
    y = activations.activation_forward(x, "gelu")
    torch.testing.assert_close(y, torch.nn.functional.gelu(x), atol=1e-5, rtol=1e-5)
    assert L.cached_launches() == before


# ---------------------------------------------------------------- GPU: bit-identical to the plain launch


def _batchnorm_fwd_bwd(shape, activation, pool, residual, channels_last):
    """(y, dx, dweight, dbias, dresidual, running mean, running var) of one training call on fixed inputs."""
    from cudacnn.kernels import ops

    gen = torch.Generator(device="cuda").manual_seed(3)

    def randn(*size):
        t = torch.randn(size, device="cuda", generator=gen).to(torch.bfloat16)
        return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    x = randn(*shape)
    res = randn(*shape) if residual else None
    w = torch.rand(shape[1], device="cuda", generator=gen) + 0.5
    b = torch.randn(shape[1], device="cuda", generator=gen)
    rm, rv = torch.zeros(shape[1], device="cuda"), torch.ones(shape[1], device="cuda")
    inputs = [t.requires_grad_() for t in (x, w, b, res) if t is not None]
    y = ops.batchnorm_act(x, w, b, res, rm, rv, training=True, activation=activation, pool=pool)
    grads = torch.autograd.grad(y, inputs, randn(*y.shape))
    return (y, *grads, rm, rv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
@pytest.mark.parametrize("shape,activation,pool,residual,channels_last", [
    ((256, 64, 32, 32), "relu", True, False, True),     # smallnet stage 1
    ((64, 128, 16, 16), "gelu", False, True, True),     # fast96-like, residual before GELU
    ((7, 37, 9, 11), "silu", True, True, False),        # odd sizes: no dimension divisible by 16, odd pool rows
    ((3, 20, 5, 5), "relu", False, False, True),
])
def test_gpu_cached_launch_is_bit_identical_to_plain(monkeypatch, shape, activation, pool, residual, channels_last):
    from cudacnn.kernels import planned

    monkeypatch.setattr(planned, "ENABLED", False)  # this compares the Python launch paths
    monkeypatch.setattr(L, "_BY_SPEC", {})
    monkeypatch.setattr(L, "_BY_EXACT", {})
    monkeypatch.setattr(L, "ENABLED", False)
    plain = _batchnorm_fwd_bwd(shape, activation, pool, residual, channels_last)
    assert L.cached_launches() == 0
    monkeypatch.setattr(L, "ENABLED", True)
    _batchnorm_fwd_bwd(shape, activation, pool, residual, channels_last)  # fills the cache
    assert L.cached_launches() == 4  # stats, apply, and the backward's two phases
    misses = []
    miss = L._miss
    monkeypatch.setattr(L, "_miss", lambda *a: misses.append(a[1]) or miss(*a))
    fast = _batchnorm_fwd_bwd(shape, activation, pool, residual, channels_last)  # launches from the cache
    assert misses == []
    torch.cuda.synchronize()
    for a, b in zip(plain, fast):
        assert torch.equal(a, b)
