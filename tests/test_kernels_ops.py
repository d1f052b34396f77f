"""The torch.library custom ops, the nn.Module wrappers and swap_modules: autograd (gradcheck in
float64, which the ops route to the references through the same wiring), opcheck registration checks,
torch.compile without graph breaks, and the one-warning CPU fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cudacnn.kernels as K
from cudacnn.kernels import _runtime, ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("triton_interpreter")  # conftest switches the interpreter on for the CPU


def f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE, requires_grad=True)


@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
def test_linear_gradcheck(activation, direct):
    x, w, b = f64(2, 3, 5), f64(4, 5), f64(4)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.linear(x, w, b, activation), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: ops.linear(x, w, None, activation), (x, w))


def test_activation_and_cross_entropy_gradcheck(direct):
    x = f64(3, 7)
    for kind in ("relu", "gelu", "gelu_tanh", "silu"):
        assert torch.autograd.gradcheck(lambda x: ops.activation(x, kind), (x,))
    t = torch.randint(0, 7, (3,), device=DEVICE)
    for reduction in ("mean", "sum"):
        assert torch.autograd.gradcheck(lambda x: ops.cross_entropy(x, t, 0.2, reduction), (x,))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_linear_triton_backward_matches_float64(activation, direct):
    # float32 runs the Triton forward and backward kernels; compare with float64 autograd.
    x, w, b = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((6, 9), (5, 9), (5,)))
    g = torch.randn(6, 5, device=DEVICE)
    ops.linear(x, w, b, activation).backward(g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    getattr(F, activation)(F.linear(x64, w64, b64)).backward(g.double())
    for ours, ref in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert torch.allclose(ours.double(), ref, rtol=1e-4, atol=1e-5)


def test_eager_calls_skip_the_dispatcher_and_traced_calls_do_not(op_calls):
    # eager: the autograd.Functions, never the registered ops (whose host cost they avoid)
    called = op_calls("_linear", "_linear_backward", "_activation", "_activation_backward", "_cross_entropy")
    x, w, b = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((3, 4), (2, 4), (2,)))
    t = torch.randint(0, 2, (3,), device=DEVICE)
    ops.cross_entropy(ops.activation(ops.linear(x, w, b, "gelu"), "silu"), t, 0.1).backward()
    assert called == [] and x.grad is not None and w.grad is not None and b.grad is not None
    # a dispatch mode (here FlopCounterMode, as under tracing) must see the ops
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        ops.cross_entropy(ops.activation(ops.linear(x, w, b, "gelu"), "silu"), t, 0.1).backward()
    assert called == ["_linear", "_activation", "_cross_entropy", "_activation_backward", "_linear_backward"]


def test_linear_op_without_its_pre_activation_refuses_a_backward_that_needs_it():
    # gelu's derivative needs the pre-activation, which the op keeps only with save_pre=True (ops.linear asks
    # for it whenever a gradient is wanted); a direct call without it must not return a wrong gradient
    x, w = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((3, 4), (2, 4)))
    y, _ = torch.ops.cudacnn.linear(x, w, None, "gelu", "triton", False, False)
    with pytest.raises(RuntimeError, match="called with save_pre=False"):
        y.sum().backward()
    y, _ = torch.ops.cudacnn.linear(x, w, None, "relu", "triton", False, False)  # relu's derivative reads y
    y.sum().backward()
    expected = (y.detach() > 0).to(x.dtype).t() @ x.detach()
    assert torch.allclose(w.grad, expected, rtol=1e-4, atol=1e-5)


def test_opcheck_registrations():
    x, w, b = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((3, 4), (2, 4), (2,)))
    t = torch.randint(0, 4, (3,), device=DEVICE)
    torch.library.opcheck(torch.ops.cudacnn.linear.default, (x, w, b, "gelu", "triton", False, True))
    torch.library.opcheck(torch.ops.cudacnn.linear.default, (x, w, None, "relu", "triton", False, False))
    torch.library.opcheck(torch.ops.cudacnn.activation.default, (x, "silu", "triton"))
    torch.library.opcheck(torch.ops.cudacnn.cross_entropy.default, (x, t, 0.1, "mean", True))


def test_torch_compile_has_no_graph_breaks():
    torch._dynamo.reset()
    model = K.swap_modules(nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4)), "triton").to(DEVICE)
    loss_fn = K.cross_entropy_loss("triton", label_smoothing=0.1)
    x, t = torch.randn(5, 6, device=DEVICE), torch.randint(0, 4, (5,), device=DEVICE)

    def forward(x, t):
        return loss_fn(model(x), t)

    eager_loss = forward(x, t)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # fullgraph: a graph break raises; AOTAutograd traces the backward through the custom ops too.
    compiled_loss = torch.compile(forward, fullgraph=True, backend="aot_eager")(x, t)
    compiled_loss.backward()
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)


def test_swap_modules_replaces_fuses_and_shares_parameters():
    inner = nn.Sequential(nn.Linear(4, 4), nn.SiLU())
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), inner, nn.GELU(approximate="tanh"), nn.Linear(4, 2))
    reference = [p for p in model.parameters()]
    x = torch.randn(7, 3, device=DEVICE)
    model.to(DEVICE)
    expected = model(x)
    K.swap_modules(model, "triton")
    assert isinstance(model[0], K.Linear) and model[0].activation == "relu" and isinstance(model[1], nn.Identity)
    assert isinstance(inner[0], K.Linear) and inner[0].activation == "silu"
    assert isinstance(model[3], K.Activation) and model[3].kind == "gelu_tanh"
    assert [p for p in model.parameters()] == reference  # same Parameter objects: optimizers keep working
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)


def test_swap_modules_torch_backend_is_a_no_op_and_bad_backend_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    assert K.swap_modules(model, "torch") is model and type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match="backend"):
        K.swap_modules(model, "tpu")
    assert isinstance(K.cross_entropy_loss("torch", 0.1), nn.CrossEntropyLoss)
    loss = K.cross_entropy_loss("cuda", 0.2)
    x, t = torch.randn(4, 3, device=DEVICE), torch.randint(0, 3, (4,), device=DEVICE)
    assert loss(x, t).item() == pytest.approx(F.cross_entropy(x, t, label_smoothing=0.2).item(), rel=1e-5)


def test_modules_match_torch_forward():
    lin = K.Linear(5, 3, activation="gelu").to(DEVICE)
    x = torch.randn(2, 4, 5, device=DEVICE)
    assert lin(x).shape == (2, 4, 3)
    assert torch.allclose(lin(x), F.gelu(F.linear(x, lin.weight, lin.bias)), rtol=1e-5, atol=1e-6)
    assert torch.allclose(K.Activation("silu")(x), F.silu(x), atol=1e-6)


def test_linear_module_runs_our_gemm_only_where_it_pays(monkeypatch):
    """A Linear runs our GEMM only with an activation to fuse and at least GEMM_MIN_OUTPUTS outputs, and only on
    the Triton backend; otherwise F.linear. Both paths give the same values and gradients."""
    assert ops.gemm_pays(4096, 4096, "gelu", "triton") and not ops.gemm_pays(4095, 4096, "gelu", "triton")
    assert not ops.gemm_pays(16384, 4096, "none", "triton") and not ops.gemm_pays(16384, 4096, "gelu", "cuda")
    gemm_calls = []
    real_gemm = ops._gemm_fn
    monkeypatch.setattr(ops, "_gemm_fn", lambda *a, **k: gemm_calls.append(a[0].shape) or real_gemm(*a, **k))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, device=DEVICE, requires_grad=True)  # 6 rows x 4 features = 24 outputs
    results = {}
    for min_outputs in (25, 24):
        monkeypatch.setattr(ops, "GEMM_MIN_OUTPUTS", min_outputs)
        torch.manual_seed(1)
        lin = K.Linear(5, 4, activation="gelu").to(DEVICE)
        y = lin(x)
        grads = torch.autograd.grad(y.square().sum(), [x, lin.weight, lin.bias])
        results[min_outputs] = (y, *grads)
        assert len(gemm_calls) == (0 if min_outputs == 25 else 1)
    for ours, cublas in zip(results[24], results[25]):
        assert torch.allclose(ours, cublas, rtol=1e-4, atol=1e-5)
    assert torch.allclose(results[25][0], F.gelu(F.linear(x, lin.weight, lin.bias)))


def test_activation_and_loss_modules_run_our_kernels_only_where_they_pay(monkeypatch):
    """The Activation module runs our kernel from ACTIVATION_MIN_ELEMENTS elements, the loss module from
    CROSS_ENTROPY_MIN_ROWS rows; below, PyTorch's ops. Both paths give the same values and gradients."""
    assert ops.activation_pays(1 << 26) and not ops.activation_pays((1 << 26) - 1)
    assert ops.cross_entropy_pays(1 << 17) and not ops.cross_entropy_pays((1 << 17) - 1)
    calls = []
    real_act, real_ce = ops._act.activation_forward, ops._ce.softmax_cross_entropy
    monkeypatch.setattr(ops._act, "activation_forward", lambda *a, **k: calls.append("act") or real_act(*a, **k))
    monkeypatch.setattr(ops._ce, "softmax_cross_entropy", lambda *a, **k: calls.append("ce") or real_ce(*a, **k))
    torch.manual_seed(0)
    x = torch.randn(6, 5, device=DEVICE, requires_grad=True)  # 30 elements, 6 rows
    t = torch.randint(0, 5, (6,), device=DEVICE)
    act, loss = K.Activation("gelu"), K.cross_entropy_loss("triton", 0.1)
    results = {}
    for elements, rows in ((31, 7), (30, 6)):  # one above x's size, then x's size
        monkeypatch.setattr(ops, "ACTIVATION_MIN_ELEMENTS", elements)
        monkeypatch.setattr(ops, "CROSS_ENTROPY_MIN_ROWS", rows)
        calls.clear()
        y = act(x)
        value = loss(y, t)
        results[elements] = (y, value, *torch.autograd.grad(value, x))
        assert sorted(set(calls)) == ([] if elements == 31 else ["act", "ce"])
    for ours, torchs in zip(results[30], results[31]):
        assert torch.allclose(ours, torchs, rtol=1e-5, atol=1e-6)
    assert torch.allclose(results[31][1], F.cross_entropy(F.gelu(x), t, label_smoothing=0.1))


@pytest.mark.skipif(DEVICE != "cpu", reason="the fallback is the CPU path")
def test_cpu_fallback_warns_once(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(_runtime, "_warned_fallback", False)
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ops.linear(x, w, None, "relu")
        ops.activation(x, "gelu")
        ops.cross_entropy(x, torch.tensor([0, 1, 3]))
    fallback = [w_ for w_ in caught if "reference implementations" in str(w_.message)]
    assert len(fallback) == 1
    assert torch.allclose(y, F.relu(x @ w.t()))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_activation_keeps_channels_last_without_copies(backend, monkeypatch):
    # a conv net's activations are channels_last: the op runs on their memory as it is and returns the same
    # layout (an NCHW result would send every following conv through layout conversions)
    x = torch.randn(2, 5, 3, 4, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    contiguous = torch.Tensor.contiguous

    def no_copy(t, *args, **kwargs):
        out = contiguous(t, *args, **kwargs)
        assert out.data_ptr() == t.data_ptr(), "activation copied a channels_last tensor"
        return out

    monkeypatch.setattr(torch.Tensor, "contiguous", no_copy)
    y = ops.activation(x, "gelu", backend)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert torch.allclose(y, F.gelu(x.detach()), atol=1e-6)
    g = torch.randn_like(y)  # channels_last, like the gradient the next conv's backward hands over
    y.backward(g)
    monkeypatch.undo()
    x64 = x.detach().double().requires_grad_()
    F.gelu(x64).backward(g.double())
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-6)
    # the mirror cases: a gradient in the other layout than the input's (autograd hands over whatever the
    # consumer made); the input's gradient keeps the input's layout
    for x_format, g_format in ((torch.contiguous_format, torch.channels_last),
                               (torch.channels_last, torch.contiguous_format)):
        x = x64.detach().float().contiguous(memory_format=x_format).requires_grad_()
        ops.activation(x, "gelu", backend).backward(g.float().contiguous(memory_format=g_format))
        assert x.grad.is_contiguous(memory_format=x_format)
        assert torch.allclose(x.grad.double(), x64.grad, atol=1e-6)
