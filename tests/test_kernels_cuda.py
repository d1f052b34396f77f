"""CUDA C++ kernels (and the Triton ones at GPU-sized shapes) against float64 references. GPU only."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA C++ kernels need a CUDA GPU")]

from cudacnn.kernels import cuda_ext, gemm, ops, softmax_cross_entropy  # noqa: E402
from cudacnn.kernels.activations import reference_backward, reference_forward  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def rel_err(out, ref):
    # |out - ref| / max(|ref|, 1): relative for real-sized outputs, absolute for tiny ones (a lone GELU of a
    # large negative x is 1 - erf cancellation in float32, in PyTorch's own GELU too).
    assert not torch.isnan(out).any(), "output has NaN: an element was not written"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1.0)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 8), (127, 257, 72), (300, 1000, 520), (1024, 512, 256), (5, 3, 4104)])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("variant", cuda_ext.GEMM_VARIANTS)
def test_cuda_gemm_matches_float64(dtype, shape, activation, variant):
    if variant == 5 and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel needs sm_90a")
    M, N, K = shape
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = torch.randn(N, K, device="cuda", dtype=dtype) / K ** 0.5
    bias = torch.randn(N, device="cuda", dtype=dtype)
    out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
    cuda_ext.cuda_gemm(x, w.t(), bias, activation, out=out, variant=variant)
    torch.cuda.synchronize()
    ref = reference_forward(x.double() @ w.double().t() + bias.double(), activation)
    assert rel_err(out, ref) < TOL[dtype]


def test_cuda_gemm_is_deterministic_and_rejects_unsupported_layouts():
    x = torch.randn(513, 264, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(129, 264, device="cuda", dtype=torch.bfloat16)
    first = cuda_ext.cuda_gemm(x, w.t())
    assert torch.equal(first, cuda_ext.cuda_gemm(x, w.t()))
    with pytest.raises(ValueError, match="cuda_gemm needs"):
        cuda_ext.cuda_gemm(x, w.t().contiguous())  # b must be the transposed view of a K-contiguous weight
    with pytest.raises(ValueError, match="cuda_gemm needs"):
        cuda_ext.cuda_gemm(x.float(), w.t().float())
    with pytest.raises(ValueError, match="expected"):  # an out of the wrong shape is never written
        cuda_ext.cuda_gemm(x, w.t(), out=torch.empty(513, 128, device="cuda", dtype=torch.bfloat16))


def test_cuda_gemm_takes_a_float32_bias_with_16_bit_inputs():
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(96, 128, device="cuda", dtype=torch.bfloat16) / 128 ** 0.5
    bias = torch.randn(96, device="cuda")  # float32, as an nn.Linear kept in float32 would have
    out = cuda_ext.cuda_gemm(x, w.t(), bias, "relu")
    ref = reference_forward(x.double() @ w.double().t() + bias.double(), "relu")
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("n", [1, 7, 4099, 1 << 20])
def test_cuda_activations(dtype, kind, n):
    x = (torch.randn(n + 1, device="cuda") * 3).to(dtype)
    g = torch.randn(n + 1, device="cuda").to(dtype)
    for xs, gs in ((x[:n], g[:n]), (x[1:], g[1:])):  # aligned and misaligned (scalar path)
        y = cuda_ext.cuda_activation_forward(xs, kind, out=torch.full_like(xs, float("nan")))
        assert rel_err(y, reference_forward(xs.double(), kind)) < TOL[dtype]
        dx = cuda_ext.cuda_activation_backward(gs, xs, kind, out=torch.full_like(xs, float("nan")))
        assert rel_err(dx, reference_backward(gs.double(), xs.double(), kind)) < TOL[dtype]


def test_cuda_activations_into_a_strided_out_or_a_fresh_one():
    x, g = (torch.randn(64, 48, device="cuda", dtype=torch.float16) for _ in range(2))
    strided = torch.full((48, 64), float("nan"), device="cuda", dtype=torch.float16).t()  # (64, 48), not contiguous
    ref = reference_forward(x.double(), "gelu")
    assert cuda_ext.cuda_activation_forward(x, "gelu", out=strided) is strided
    assert rel_err(strided, ref) < TOL[torch.float16]
    assert rel_err(cuda_ext.cuda_activation_forward(x, "gelu"), ref) < TOL[torch.float16]
    strided.fill_(float("nan"))
    assert cuda_ext.cuda_activation_backward(g, x, "silu", out=strided) is strided
    ref = reference_backward(g.double(), x.double(), "silu")
    assert rel_err(strided, ref) < TOL[torch.float16]
    assert rel_err(cuda_ext.cuda_activation_backward(g, x, "silu"), ref) < TOL[torch.float16]
    with pytest.raises(ValueError, match="out has shape"):
        cuda_ext.cuda_activation_forward(x, "gelu", out=torch.empty(48, 64, device="cuda", dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1000, 1031, 513), (1, 4096, 4096), (4097, 3, 64)])
def test_triton_gemm_gpu_shapes(dtype, shape):
    M, N, K = shape
    a = torch.randn(M, K, device="cuda", dtype=dtype)
    b = torch.randn(N, K, device="cuda", dtype=dtype).t() / K ** 0.5
    bias = torch.randn(N, device="cuda", dtype=dtype)
    out = gemm(a, b, bias, "gelu")
    # The TMA kernels fall back to the pointer kernel (with a warning) when they raise: that must not hide here.
    assert not importlib.import_module("cudacnn.kernels.gemm")._tma_failed
    ref = F.gelu(a.double() @ b.double() + bias.double())
    assert rel_err(out, ref) < TOL[dtype] * 3
    if dtype == torch.float32:
        assert rel_err(gemm(a, b, bias, "gelu", allow_tf32=True), ref) < 5e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cross_entropy_wide_rows(dtype):
    """Rows wider than one tile (4096 columns on a GPU) take the online-softmax path."""
    x = (torch.randn(7, 5000, device="cuda") * 3).to(dtype)
    t = torch.randint(0, 5000, (7,), device="cuda")
    loss, grad = softmax_cross_entropy(x, t, 0.1, return_grad=True, grad_out=torch.full_like(x, float("nan")))
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, t, label_smoothing=0.1)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    # elementwise: the label-smoothing share of an off-target gradient is 0.1 / 5000 / 7 = 2.9e-6, above atol
    rtol = 1e-4 if dtype == torch.float32 else 1.6e-2  # bf16 stores the gradient to 2^-9 relative
    torch.testing.assert_close(grad.double(), x64.grad, rtol=rtol, atol=1e-7)


def test_triton_cross_entropy_many_rows():
    x = torch.randn(1 << 20, 10, device="cuda") * 3
    t = torch.randint(0, 10, (1 << 20,), device="cuda")
    loss, grad = softmax_cross_entropy(x, t, 0.2, return_grad=True)
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, t, label_smoothing=0.2)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    assert rel_err(grad, x64.grad) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_linear_op_training_step_matches_torch(backend, activation):
    x = torch.randn(300, 264, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(136, 264, device="cuda", dtype=torch.bfloat16) / 16).requires_grad_()
    b = torch.randn(136, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(300, 136, device="cuda", dtype=torch.bfloat16)
    ops.linear(x, w, b, activation, backend).backward(g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    reference_forward(F.linear(x64, w64, b64), activation).backward(g.double())
    for ours, ref in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert rel_err(ours, ref) < 2e-2
