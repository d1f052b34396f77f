"""The fused BatchNorm's C++ launch path (kernels/planned.py, kernels/cuda/planned_launch.cpp): plans made from
recorded launches with stand-in kernels on the CPU, and on a GPU that training calls through C++ give
bit-identical outputs, running statistics and gradients to the Python path, for every kind of call the zoo
makes and for inputs whose layout differs from the recorded one."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from cudacnn.kernels import planned as P

# ---------------------------------------------------------------- plans from stand-in launches


def _kernel(*names):
    params = [types.SimpleNamespace(name=n, default=None) for n in names]
    return types.SimpleNamespace(params=params, fn=types.SimpleNamespace(__name__="stand_in"))


def _compiled(signature, function=1234, num_warps=4, shared=0, **metadata):
    md = types.SimpleNamespace(num_warps=num_warps, shared=shared, num_ctas=1, global_scratch_size=0,
                               profile_scratch_size=0, **metadata)
    return types.SimpleNamespace(metadata=md, function=function, src=types.SimpleNamespace(signature=signature))


SIGNATURE = {"x_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*bf16", "count_ptr": "*i32", "n": "i32",
             "one": "constexpr", "big": "i64", "momentum": "fp32", "scale": "fp32", "BLOCK": "constexpr"}
NAMES = tuple(SIGNATURE)


def test_a_plan_maps_inputs_buffers_and_constants_to_slots_in_parameter_order():
    x, w = torch.randn(2, 3), torch.randn(3)
    out = torch.empty(4, 6, dtype=torch.bfloat16).t()  # a transposed buffer: its strides are kept
    counters = torch.zeros(8, dtype=torch.int32)
    first = _kernel(*NAMES)
    launches = [
        (first, (5,), (x, w, out, counters, 100, 1, 1 << 40, 0.1, 2.5), {"BLOCK": 64},
         _compiled(SIGNATURE, function=11, num_warps=8, shared=4096)),
        (first, (2, 3), (out, x, out, counters, 7, 1, 3, 0.2, 0.5), {"BLOCK": 32}, _compiled(SIGNATURE, function=12)),
    ]
    inputs = (x, None, w)  # slot 1 absent
    plan = P.make_plan(inputs, launches, outputs=(out, None, x), constants=(counters,))
    n_inputs, buffers, constants, entries, outputs, first_layout = plan
    assert n_inputs == 3 and first_layout is None
    assert len(buffers) == 1  # out; slot 3
    sizes, strides, template = buffers[0]
    assert (sizes, strides, template.dtype) == ([6, 4], [1, 6], torch.bfloat16)
    assert constants[0] is counters  # slot 4, after the buffers
    assert outputs == [3, -1, 0]
    function, grid, threads, shared, args = entries[0]
    assert (function, grid, threads, shared) == (11, [5, 1, 1], 256, 4096)
    # constexprs (BLOCK, and `one`, which Triton made a constant) are not parameters; the rest in order
    assert args == [(P.SLOT, 0, 0.0), (P.SLOT, 2, 0.0), (P.SLOT, 3, 0.0), (P.SLOT, 4, 0.0), (P.INT32, 100, 0.0),
                    (P.INT64, 1 << 40, 0.0), (P.SCALAR, 0, 0.0), (P.FLOAT32, 0, 2.5)]
    function, grid, threads, shared, args = entries[1]
    assert (function, grid, threads) == (12, [2, 3, 1], 128)
    assert [a[:2] for a in args[:4]] == [(P.SLOT, 3), (P.SLOT, 0), (P.SLOT, 3), (P.SLOT, 4)]


def test_the_first_input_layout_is_kept_for_conforming_the_gradient():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    kernel = _kernel("x_ptr")
    plan = P.make_plan((x,), [(kernel, (1,), (x,), {}, _compiled({"x_ptr": "*fp32"}))], outputs=(x,), first=x)
    sizes, strides, template = plan[5]
    assert (sizes, strides, template.dtype) == ([2, 3, 4, 5], list(x.stride()), torch.float32)


@pytest.mark.parametrize("case", ["scratch", "clusters", "fp16 scalar", "pointer without a tensor", "callable grid"])
def test_launches_a_plan_cannot_reproduce_are_refused(case):
    x = torch.randn(4)
    signature, args, grid, metadata = {"x_ptr": "*fp32", "s": "fp32"}, (x, 1.0), (1,), {}
    if case == "scratch":
        metadata = {"global_scratch_size": 128}
    elif case == "clusters":
        metadata = {"num_ctas": 2}
    elif case == "fp16 scalar":
        signature = {"x_ptr": "*fp32", "s": "fp16"}
    elif case == "pointer without a tensor":
        args = (0, 1.0)
    else:
        grid = lambda meta: (1,)  # noqa: E731
    compiled = _compiled(signature)
    vars(compiled.metadata).update(metadata)
    with pytest.raises(P.Unplannable):
        P.make_plan((x,), [(_kernel("x_ptr", "s"), grid, args, {}, compiled)], outputs=(x,))


def test_config_codes_tell_every_flag_apart():
    codes = {P.config_code(a, pool, norm) for a in ("none", "relu", "gelu", "gelu_tanh", "silu")
             for pool in (False, True) for norm in (False, True)}
    assert len(codes) == 20


def test_a_failed_build_warns_once_and_leaves_the_python_path(monkeypatch):
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(P, "_build", no_compiler)
    P.extension.cache_clear()
    try:
        assert P.plan_count() == 0  # asking does not build
        with pytest.warns(UserWarning, match="could not be built .*Ninja is required"):
            assert P.extension() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            assert P.batchnorm_act(*[None] * 6, 0.1, 1e-5, "relu", False, True) is None
            assert P.plan_count() == 0
    finally:
        P.extension.cache_clear()


def test_cpu_calls_never_take_the_cpp_path(monkeypatch):
    """ops.batchnorm_act and ops.conv_batchnorm_act ask for the C++ path only for GPU tensors: on the CPU nothing
    is built."""
    from cudacnn.kernels import ops

    for name in ("batchnorm_act", "conv_batchnorm_act", "link_conv"):
        monkeypatch.setattr(P, name, lambda *a: pytest.fail("the C++ path was asked for a CPU tensor"))
    x = torch.randn(4, 3, 4, 4, requires_grad=True)
    y = ops.batchnorm_act(x, None, None, activation="relu", backend="triton")
    assert y.shape == x.shape
    conv_w = torch.randn(5, 3, 3, 3, requires_grad=True)
    y = ops.conv_batchnorm_act(x, conv_w, None, (1, 1), (1, 1), (1, 1), 1, None, None, activation="relu",
                               backend="triton", normalize=False)
    torch.testing.assert_close(y, torch.relu(torch.nn.functional.conv2d(x, conv_w, padding=1)))


# ---------------------------------------------------------------- on a GPU: the C++ path against the Python path

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                                  reason="needs a CUDA GPU (compiled Triton kernels and the C++ launcher)")


def _step(shape, dtype, channels_last, activation, pool, residual, normalize, momentum=0.1, grad_layout=None,
          offset=0, seed=0):
    """One training call of ops.batchnorm_act and its backward (dy in x's layout unless grad_layout):
    (outputs..., grad_fn name)."""
    from cudacnn.kernels import ops

    g = torch.Generator(device="cuda").manual_seed(seed)
    n, c, h, w = shape

    def randn(*s, dt=dtype):
        return torch.randn(*s, generator=g, device="cuda", dtype=dt)

    base = randn(n * c * h * w + offset)
    x = base[offset:].view(n, h, w, c).permute(0, 3, 1, 2) if channels_last else base[offset:].view(shape)
    x = x.detach().requires_grad_()
    weight = randn(c, dt=torch.float32).requires_grad_() if normalize else None
    bias = randn(c, dt=torch.float32).requires_grad_() if normalize else None
    res = randn(*shape).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    res = res.requires_grad_() if residual else None
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    y = ops.batchnorm_act(x, weight, bias, res, rm if normalize else None, rv if normalize else None,
                          training=True, momentum=momentum, activation=activation, pool=pool, normalize=normalize)
    dy = randn(*y.shape).contiguous(memory_format=grad_layout or (torch.channels_last if channels_last
                                                                 else torch.contiguous_format))
    inputs = [t for t in (x, weight, bias, res) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy)
    return (y, rm, rv, *grads), y.grad_fn.name()


CASES = [  # shape, activation, pool, residual, normalize: the zoo's kinds of call, and odd sizes
    ((32, 64, 32, 32), "relu", True, False, True),    # smallnet / bn-dropout stages
    ((32, 64, 16, 16), "relu", False, True, True),    # resnet18 block end: residual add before ReLU
    ((32, 128, 8, 8), "none", False, False, True),    # resnet18 downsample BatchNorm
    ((16, 32, 16, 16), "relu", True, False, False),   # bn-dropout's ActivationPool
    ((16, 32, 16, 16), "relu", False, True, False),   # add + ReLU without BatchNorm: two tensor inputs only
    ((7, 37, 9, 11), "silu", True, True, True),       # no size divisible by 16, odd pool rows
    ((3, 20, 5, 5), "gelu", False, False, True),
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("shape,activation,pool,residual,normalize", CASES)
def test_gpu_cpp_path_is_bit_identical_to_the_python_path(monkeypatch, dtype, channels_last, shape, activation, pool,
                                                          residual, normalize):
    assert P.extension() is not None, "the C++ launcher did not build"
    args = (shape, dtype, channels_last, activation, pool, residual, normalize)
    monkeypatch.setattr(P, "ENABLED", False)
    python, python_node = _step(*args)
    monkeypatch.setattr(P, "ENABLED", True)
    for call in range(2):  # the first records the plans, the second finds them
        cpp, cpp_node = _step(*args)
        assert "CppNode" in cpp_node and "CppNode" not in python_node, (cpp_node, python_node)
        for a, b in zip(python, cpp, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            assert torch.equal(a, b)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("case", ["gradient layout", "misaligned input", "momentum", "new batch size"])
def test_gpu_cpp_path_handles_what_the_plan_did_not_record(monkeypatch, case):
    """A gradient in another layout is copied into the recorded one (so the C++ path matches the Python path
    given the gradient in that layout: a kernel specialized for other strides may reduce in another order);
    a misaligned input, a new batch size are other keys (their own plans); momentum is the call's."""
    shape, kwargs = (8, 32, 8, 8), {}
    args = dict(dtype=torch.bfloat16, channels_last=True, activation="relu", pool=True, residual=False,
                normalize=True)
    _step(shape, **args)  # records this key's plans, if no earlier test did
    before = P.extension().plan_count()
    if case == "gradient layout":
        kwargs = dict(grad_layout=torch.contiguous_format)
    elif case == "misaligned input":
        kwargs = dict(offset=1)
    elif case == "momentum":
        kwargs = dict(momentum=0.7)
    else:
        shape = (5, 32, 8, 8)
    cpp, node = _step(shape, **args, **kwargs, seed=1)
    assert "CppNode" in node
    monkeypatch.setattr(P, "ENABLED", False)
    kwargs.pop("grad_layout", None)
    python, _ = _step(shape, **args, **kwargs, seed=1)
    for a, b in zip(python, cpp, strict=True):
        assert torch.equal(a, b)
    new_keys = P.extension().plan_count() - before
    assert new_keys == (1 if case in ("misaligned input", "new batch size") else 0)


def _conv_step(dtype, autocast, conv_bias, stride, x_grad, residual, normalize, seed=0):
    """One training call of ops.conv_batchnorm_act (a 3x3 conv, or 1x1 at stride 2, into BN + ReLU (+ pool))
    and its backward: (outputs..., grad_fn name)."""
    from cudacnn.kernels import ops

    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*s, dt=torch.float32):
        return torch.randn(*s, generator=g, device="cuda", dtype=dt).contiguous(
            memory_format=torch.channels_last if len(s) == 4 else torch.contiguous_format)

    n, c_in, c, hw = 8, 16, 32, 16
    k, padding = (3, 1) if stride == 1 else (1, 0)
    x = randn(n, c_in, hw, hw, dt=dtype).requires_grad_(x_grad)
    conv_w = randn(c, c_in, k, k).div_(k * c_in ** 0.5).requires_grad_()
    conv_b = randn(c).requires_grad_() if conv_bias else None
    weight = randn(c).requires_grad_() if normalize else None
    bias = randn(c).requires_grad_() if normalize else None
    res = randn(n, c, hw // stride, hw // stride, dt=torch.bfloat16 if autocast else dtype).requires_grad_() \
        if residual else None
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = ops.conv_batchnorm_act(x, conv_w, conv_b, (stride, stride), (padding, padding), (1, 1), 1, weight, bias,
                                   res, rm if normalize else None, rv if normalize else None, training=True,
                                   activation="relu", pool=not residual, normalize=normalize)
    dy = randn(*y.shape, dt=y.dtype)
    inputs = [t for t in (x, conv_w, conv_b, weight, bias, res) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, inputs, dy)
    return (y, rm, rv, *grads), y.grad_fn.name()


CONV_CASES = [  # dtype, autocast, conv bias, stride, x needs a gradient, residual, normalize
    (torch.float32, True, False, 1, False, False, True),   # a net's first conv: float32 images, bf16 autocast
    (torch.bfloat16, True, False, 1, True, False, True),   # smallnet's later convs
    (torch.bfloat16, True, True, 1, True, False, False),   # bn-dropout's conv into ReLU + pool, with bias
    (torch.bfloat16, True, False, 2, True, True, True),    # a ResNet shortcut's shape (1x1, stride 2) + residual
    (torch.float32, False, True, 1, True, False, True),    # no autocast: nothing cast
    (torch.float32, True, True, 1, False, False, True),    # bn-dropout's first conv: with bias, into BatchNorm
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype,autocast,conv_bias,stride,x_grad,residual,normalize", CONV_CASES)
def test_gpu_conv_and_op_in_one_node_match_the_two_calls(monkeypatch, dtype, autocast, conv_bias, stride, x_grad,
                                                        residual, normalize):
    """The one C++ node gives bit for bit what F.conv2d (under autocast) then the fused op's Python path give:
    output, running statistics and every gradient, in each input's dtype; except the convolution's bias
    gradient: into a BatchNorm the node gives exact zeros, the two calls sums that cancel to within rounding;
    into ReLU + pool the node gives the sum of dy from the op's backward launch (float32), the two calls
    PyTorch's reduction, in the autocast dtype."""
    assert P.extension() is not None, "the C++ launcher did not build"
    args = (dtype, autocast, conv_bias, stride, x_grad, residual, normalize)
    monkeypatch.setattr(P, "ENABLED", False)
    python, python_node = _conv_step(*args)
    monkeypatch.setattr(P, "ENABLED", True)
    # outputs: y, running mean and variance, then the gradients of x (if it needs one), the conv weight, its bias
    bias_at = 4 + x_grad if conv_bias else None
    nodes, links = [], P.conv_link_count()
    for call in range(3):  # the first runs the two calls and links the key, the next ones take one node
        cpp, node = _conv_step(*args)
        nodes.append(node)
        for i, (a, b) in enumerate(zip(python, cpp, strict=True)):
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            if i == bias_at and normalize and call > 0:
                # rounding noise against the weight gradient's sums over the same positions; a sum that did
                # not cancel would be of the weight gradient's size
                assert torch.count_nonzero(b) == 0
                assert a.abs().max() < 0.05 * python[i - 1].abs().max(), (a, python[i - 1].abs().max())
            elif i == bias_at and call > 0:
                torch.testing.assert_close(b, a, rtol=2 ** -7, atol=2 ** -7 * a.abs().max().item())
            else:
                assert torch.equal(a, b), i
    assert "ConvBatchNormAct" in nodes[-1] and "ConvBatchNormAct" not in python_node, (nodes, python_node)
    assert P.conv_link_count() == links + 1


# The C++ backward as the first work of autograd's device thread in a fresh process: dy given, so no PyTorch op's
# backward runs there before it (which would bind the CUDA context to that thread through the runtime).
FIRST_ON_THE_DEVICE_THREAD = """
import torch
from cudacnn.kernels import ops, planned
torch.manual_seed(0)
x = torch.randn(8, 32, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()
w = torch.ones(32, device="cuda", requires_grad=True)
dy = torch.randn(8, 32, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)

def step():
    y = ops.batchnorm_act(x, w, None, training=True, activation="relu")
    return (y, *torch.autograd.grad(y, (x, w), dy)), y.grad_fn.name()

cpp, node = step()
assert "CppNode" in node, node
planned.ENABLED = False
python, _ = step()
assert all(torch.equal(a, b) for a, b in zip(cpp, python))
print("ok")
"""


@pytest.mark.gpu
@requires_gpu
def test_gpu_cpp_backward_runs_on_a_thread_without_a_cuda_context(run_compiled_triton):
    """Autograd's own device thread (the default, multithreaded backward) has no current CUDA context until
    something binds one; the C++ backward makes the device's primary context current before launching."""
    done = run_compiled_triton(FIRST_ON_THE_DEVICE_THREAD)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
