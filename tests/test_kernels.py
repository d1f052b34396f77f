"""Triton kernels against float64 references: awkward shapes, every dtype, strided inputs, poisoned
outputs. On the CPU they run under the Triton interpreter (TRITON_INTERPRET=1, set in conftest.py);
on a GPU they run compiled."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
import torch.nn.functional as F

from cudacnn.kernels import (activation_backward, activation_forward, column_sum, gemm, gemm_backward,
                             softmax_cross_entropy)
from cudacnn.kernels.activations import reference_backward, reference_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("triton_interpreter")  # conftest switches the interpreter on for the CPU
# Relative error bounds (|out - ref| / |ref|) by input dtype: fp32 math, bf16/fp16 rounding of the output.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def rel_err(out, ref):
    # |out - ref| / max(|ref|, 1): relative for real-sized outputs, absolute for tiny ones (a lone GELU of a
    # large negative x is 1 - erf cancellation in float32, in PyTorch's own GELU too).
    assert not torch.isnan(out).any(), "output has NaN: an element was not written"
    return ((out.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm().clamp_min(1.0)).item()


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


# ---------------------------------------------------------------- GEMM

GEMM_SHAPES = [(1, 1, 1), (1, 7, 5), (17, 13, 29), (33, 1, 40), (5, 37, 1), (31, 47, 18)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GEMM_SHAPES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_gemm_matches_float64(dtype, shape, activation):
    M, N, K = shape
    a, b, bias = randn(M, K, dtype=dtype), randn(K, N, dtype=dtype), randn(N, dtype=dtype)
    out = poisoned((M, N), dtype)
    result = gemm(a, b, bias, activation, out=out)
    assert result is out
    ref = reference_forward(a.double() @ b.double() + bias.double(), activation)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_strided_and_transposed_views(dtype):
    # a: every other row and a column slice of a bigger buffer; b: the transpose of an (N, K) weight.
    big = randn(2 * 19 + 1, 40, dtype=dtype)
    a = big[::2, 3:26]
    w = randn(11, 23, dtype=dtype)
    assert not a.is_contiguous() and not w.t().is_contiguous()
    out = gemm(a, w.t())
    assert rel_err(out, a.double() @ w.t().double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b_layout", ["kn", "nk"])
def test_gemm_tma_path(dtype, b_layout, monkeypatch):
    """The Hopper TMA kernel (forced on under the interpreter): rows 16-byte aligned, edges clipped, several
    tiles per program (2 programs: on the CPU 3 x 3 tiles of 16)."""
    gemm_module = importlib.import_module("cudacnn.kernels.gemm")  # the package's `gemm` is the function
    from cudacnn.kernels.gemm import kernel_path, use_tma

    monkeypatch.setenv("CUDACNN_GEMM_TMA", "1")
    monkeypatch.setattr(gemm_module, "_num_sms", lambda device: 2)  # several tiles per program on a GPU too
    M, N, K = (37, 40, 40) if DEVICE == "cpu" else (300, 520, 136)
    a, bias = randn(M, K, dtype=dtype), randn(N, dtype=dtype)
    b = randn(K, N, dtype=dtype) if b_layout == "kn" else randn(N, K, dtype=dtype).t()
    out, pre = poisoned((M, N), dtype), poisoned((M, N), dtype)
    hopper = DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9
    assert use_tma(a, b, out, pre) == hopper
    tf32 = dtype == torch.float32  # full-precision float32 never takes TMA (next test)
    assert kernel_path(a, b, out, pre, allow_tf32=tf32) == ("persistent" if hopper else "pointers")
    gemm(a, b, bias, "gelu", out=out, pre_activation_out=pre, allow_tf32=tf32)
    assert not gemm_module._tma_failed, "the TMA kernel raised and the pointer kernel stood in for it"
    z = a.double() @ b.double() + bias.double()
    tol = 5e-3 if tf32 else TOL[dtype]
    assert rel_err(pre, z) < tol and rel_err(out, F.gelu(z)) < tol


@pytest.mark.parametrize("b_layout", ["kn", "nk"])
def test_gemm_tma_split_epilogue(b_layout, monkeypatch):
    """The persistent kernel storing each tile as two column halves (EPILOGUE_SPLIT=2), edges clipped."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA kernel needs sm_90+; below it the pointer kernel would run instead")
    gemm_module = importlib.import_module("cudacnn.kernels.gemm")  # the package's `gemm` is the function
    from cudacnn.kernels.gemm import kernel_path

    monkeypatch.setenv("CUDACNN_GEMM_TMA", "1")
    monkeypatch.setenv("CUDACNN_GEMM_AUTOTUNE", "0")
    monkeypatch.setattr(gemm_module, "FIXED_EPILOGUE_SPLIT", 2)
    M, N, K = (37, 40, 24) if DEVICE == "cpu" else (300, 520, 136)
    a, bias = randn(M, K, dtype=torch.bfloat16), randn(N, dtype=torch.bfloat16)
    b = randn(K, N, dtype=torch.bfloat16) if b_layout == "kn" else randn(N, K, dtype=torch.bfloat16).t()
    out, pre = poisoned((M, N), torch.bfloat16), poisoned((M, N), torch.bfloat16)
    assert kernel_path(a, b, out, pre, allow_tf32=False) == "persistent"  # not the pointer kernel
    gemm(a, b, bias, "gelu", out=out, pre_activation_out=pre)
    assert not gemm_module._tma_failed, "the TMA kernel raised and the pointer kernel stood in for it"
    z = a.double() @ b.double() + bias.double()
    assert rel_err(pre, z) < 5e-3 and rel_err(out, F.gelu(z)) < 5e-3


def test_full_precision_fp32_takes_the_pointer_kernel(monkeypatch):
    from cudacnn.kernels.gemm import kernel_path

    monkeypatch.setenv("CUDACNN_GEMM_TMA", "1")
    a, b, out = randn(32, 64), randn(64, 48), poisoned((32, 48), torch.float32)
    assert kernel_path(a, b, out, None, allow_tf32=False) == "pointers"
    assert kernel_path(a.bfloat16(), b.bfloat16(), out.bfloat16(), None, allow_tf32=False) == (
        "persistent" if DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9 else "pointers")
    assert rel_err(gemm(a, b), a.double() @ b.double()) < 1e-5


def test_gemm_tma_off_switch_takes_the_pointer_kernel(monkeypatch):
    from cudacnn.kernels.gemm import kernel_path

    a, b = randn(32, 64, dtype=torch.bfloat16), randn(64, 48, dtype=torch.bfloat16)
    out = poisoned((32, 48), torch.bfloat16)
    monkeypatch.setenv("CUDACNN_GEMM_TMA", "0")
    assert kernel_path(a, b, out, None, allow_tf32=False) == "pointers"
    gemm(a, b, out=out)
    assert rel_err(out, a.double() @ b.double()) < TOL[torch.bfloat16]


def test_cuda_gemm_names_its_two_kernels_for_an_unknown_variant():
    from cudacnn.kernels import cuda_ext

    x, w = randn(16, 8, dtype=torch.bfloat16), randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"variant must be one of \(0, 5\).*got 3"):
        cuda_ext.cuda_gemm(x, w.t(), variant=3)  # the tile shapes v1-v4 live in dev/, not in the library


def test_gemm_writes_transposed_out_view():
    a, b = randn(9, 6), randn(6, 14)
    base = poisoned((14, 9), torch.float32)
    gemm(a, b, out=base.t())
    assert rel_err(base.t(), a.double() @ b.double()) < 1e-5


def test_gemm_tf32_option_is_close():
    a, b = randn(20, 33), randn(33, 12)
    out = gemm(a, b, allow_tf32=True)
    assert rel_err(out, a.double() @ b.double()) < 5e-3


def test_gemm_pre_activation_out():
    a, b, bias = randn(7, 9), randn(9, 5), randn(5)
    pre = poisoned((7, 5), torch.float32)
    y = gemm(a, b, bias, "gelu", pre_activation_out=pre)
    z = a.double() @ b.double() + bias.double()
    assert rel_err(pre, z) < 1e-5 and rel_err(y, F.gelu(z)) < 1e-5


def test_gemm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="gemm needs"):
        gemm(randn(3, 4), randn(5, 2))
    with pytest.raises(ValueError, match="activation"):
        gemm(randn(3, 4), randn(4, 2), activation="tanh")
    with pytest.raises(ValueError, match="bias"):
        gemm(randn(3, 4), randn(4, 2), bias=randn(3))
    with pytest.raises(ValueError, match="out has shape"):
        gemm(randn(3, 4), randn(4, 2), out=randn(2, 3))


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_gemm_backward_matches_autograd(activation):
    M, K, N = 13, 7, 11
    a, b, bias, g = randn(M, K), randn(K, N), randn(N), randn(M, N)
    pre = a @ b + bias
    ga, gb, gbias = gemm_backward(g, a, b, pre, activation, has_bias=True)
    a64, b64, bias64 = (t.double().requires_grad_() for t in (a, b, bias))
    reference_forward(a64 @ b64 + bias64, activation).backward(g.double())
    for ours, ref in ((ga, a64.grad), (gb, b64.grad), (gbias, bias64.grad)):
        assert rel_err(ours, ref) < 1e-5
    assert gb.t().is_contiguous()  # an nn.Linear weight's (N, K) gradient without another copy


def test_column_sum():
    x = randn(37, 19)
    assert rel_err(column_sum(x), x.double().sum(0)) < 1e-6
    assert rel_err(column_sum(x.t()), x.double().t().sum(0)) < 1e-6


# ---------------------------------------------------------------- activations

KINDS = ["relu", "gelu", "gelu_tanh", "silu"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (997,), (3, 5, 7)])
def test_activation_forward_backward(kind, dtype, shape):
    x, g = randn(*shape, dtype=dtype) * 3, randn(*shape, dtype=dtype)
    y = activation_forward(x, kind, out=poisoned(shape, dtype))
    assert rel_err(y, reference_forward(x.double(), kind)) < TOL[dtype]
    dx = activation_backward(g, x, kind, out=poisoned(shape, dtype))
    assert rel_err(dx, reference_backward(g.double(), x.double(), kind)) < TOL[dtype]


def test_activation_backward_reference_matches_autograd():
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    g = torch.randn(50, dtype=torch.float64)
    for kind in KINDS:
        x.grad = None
        reference_forward(x, kind).backward(g)
        assert torch.allclose(reference_backward(g, x.detach(), kind), x.grad)


def test_activation_non_contiguous_in_and_out():
    x = randn(8, 30)[:, ::3]
    out = poisoned((10, 8), torch.float32).t()
    activation_forward(x, "silu", out=out)
    assert rel_err(out, F.silu(x.double())) < 1e-5
    g = randn(10, 8).t()
    assert rel_err(activation_backward(g, x, "gelu"), reference_backward(g.double(), x.double(), "gelu")) < 1e-5


def test_activation_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown activation"):
        activation_forward(randn(3), "swish")


# ---------------------------------------------------------------- softmax + cross-entropy

CE_SHAPES = [(1, 1), (7, 10), (33, 10), (5, 37), (3, 200)]  # (3, 200) exercises the multi-chunk path


@pytest.mark.parametrize("shape", CE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smoothing,reduction", [(0.0, "mean"), (0.2, "mean"), (0.1, "sum")])
def test_cross_entropy_loss_and_grad(shape, dtype, smoothing, reduction):
    R, C = shape
    x = (randn(R, C) * 4).to(dtype)
    t = torch.randint(0, C, (R,), device=DEVICE)
    loss, grad = softmax_cross_entropy(x, t, smoothing, reduction, return_grad=True,
                                       grad_out=poisoned((R, C), dtype))
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, t, label_smoothing=smoothing, reduction=reduction)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert rel_err(grad, x64.grad) < TOL[dtype] + 1e-6
    assert softmax_cross_entropy(x, t, smoothing, reduction).item() == pytest.approx(loss.item(), rel=1e-6)


def test_cross_entropy_rejects_a_wrong_gradient_buffer():
    x, t = randn(6, 10), torch.randint(0, 10, (6,), device=DEVICE)
    # check_out's message: "out has shape (6, 9), torch.float32 on cpu; expected (6, 10), torch.float32 on cpu"
    wanted = re.escape(f"expected (6, 10), torch.float32 on {x.device}")
    for bad, got in ((poisoned((6, 9), torch.float32), r"shape \(6, 9\), torch\.float32 on "),
                     (poisoned((6, 10), torch.float16), r"shape \(6, 10\), torch\.float16 on ")):
        with pytest.raises(ValueError, match=f"{got}.*; {wanted}"):
            softmax_cross_entropy(x, t, return_grad=True, grad_out=bad)


def test_cross_entropy_strided_logits():
    base = randn(12, 25) * 2
    x = base[:, ::2]  # (12, 13), column stride 2
    t = torch.randint(0, 13, (12,), device=DEVICE)
    loss, grad = softmax_cross_entropy(x, t, 0.3, return_grad=True)
    x64 = x.double().requires_grad_()
    F.cross_entropy(x64, t, label_smoothing=0.3).backward()
    assert rel_err(grad, x64.grad) < 1e-5
    assert abs(loss.item() - F.cross_entropy(x.double(), t, label_smoothing=0.3).item()) < 1e-5


def test_cross_entropy_extreme_logits_stay_finite():
    x = torch.tensor([[1000.0, -1000.0, 0.0], [-1e4, 1e4, 5.0]], device=DEVICE)
    t = torch.tensor([0, 2], device=DEVICE)
    loss, grad = softmax_cross_entropy(x, t, 0.1, return_grad=True)
    ref = F.cross_entropy(x.double(), t, label_smoothing=0.1)
    assert torch.isfinite(grad).all() and abs(loss.item() - ref.item()) < 1e-3 * ref.item()


def test_cross_entropy_rejects_bad_arguments():
    x, t = randn(4, 3), torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="reduction"):
        softmax_cross_entropy(x, t, reduction="none")
    with pytest.raises(ValueError, match="logits"):
        softmax_cross_entropy(x, t[:3])
    with pytest.raises(ValueError, match="label_smoothing"):
        softmax_cross_entropy(x, t, label_smoothing=1.5)


# ---------------------------------------------------------------- benchmark steps

def test_kernel_benchmark_steps_make_their_rows(monkeypatch, capsys):
    """Every step of cudacnn.kernels.bench at toy sizes (on the CPU under the interpreter, a fake clock):
    each writes its rows, none fails, and our outputs match the baselines they are timed against."""
    from cudacnn.kernels import bench

    monkeypatch.setattr(bench, "_time", lambda fn: (fn(), 1.0)[1])
    nan = float("nan")
    setup = bench.Setup(peaks=dict.fromkeys(("bf16", "fp16", "tf32", "fp32", "hbm"), nan), compile=False,
                        n_gemm=32, n_elem=300, ce_rows=40, n_fp32=24, dev=DEVICE)
    rows = []
    for step in bench.STEPS:
        if step is not bench.cuda_gemm or DEVICE == "cuda":
            bench._try(rows, step, setup)
    assert [r for r in rows if "error" in r] == []
    names = [r["name"] for r in rows]
    kernel = "persistent" if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9 else "pointers"
    for expected in (f"triton gemm ({kernel})", "triton gemm (pointers)", "triton gemm fp32 (pointers, ieee)",
                     f"triton gemm+bias+gelu ({kernel})", f"triton gemm, no epilogue ({kernel})", "triton gelu fwd",
                     "triton silu bwd", "triton gelu fwd BLOCK=8192 warps=4", "triton softmax-CE fwd+bwd"):
        assert expected in names, (expected, names)
    # bf16, fp16, tf32 on the library's kernel, and tf32 once more on the pointer kernel
    assert names.count("device copy") == 2 and names.count("triton gemm (persistent)") + names.count(
        "triton gemm (pointers)") == 4
    assert all(r["rel_err"] < 2e-2 for r in rows if "rel_err" in r)
    assert all(r["name"] == "device copy" or r["ours_ms"] == 1.0 for r in rows)
    assert "triton softmax-CE fwd+bwd" in bench.format_table(rows)
