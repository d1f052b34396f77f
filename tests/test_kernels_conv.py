"""The implicit-GEMM convolution (kernels/conv.py, ops.conv2d_fused): forward, input and weight gradients,
the BatchNorm prologue (scale/shift + activation on load) and the statistics epilogue, against float64
PyTorch (F.conv2d with the prologue and epilogue written out). On the CPU the Triton kernels run in the
interpreter; the `kernels_only` fixture makes the PyTorch reference raise, so those tests cannot pass on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cudacnn.kernels import conv as Cv
from cudacnn.kernels import ops
from cudacnn.kernels.activations import reference_forward as act_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("triton_interpreter")
SHAPES = {"3x3": (3, 1, 1), "1x1": (1, 1, 0), "1x1/2": (1, 2, 0)}  # kernel size, stride, padding
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


@pytest.fixture
def kernels_only(monkeypatch):
    """The PyTorch reference paths raise: what passes ran the Triton kernels."""
    def refuse(*args, **kwargs):
        raise AssertionError("the PyTorch reference ran instead of the Triton kernels")

    for name in ("reference_forward", "reference_backward"):
        monkeypatch.setattr(Cv, name, refuse)


def nhwc(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).contiguous(memory_format=torch.channels_last)


def close(ours, ref, tol):
    assert ours.shape == ref.shape
    err = (ours.double() - ref).abs().max().item()
    assert err <= tol * (1 + ref.abs().max().item()), f"max error {err:.3g}"


def reference64(x, w, scale, shift, stride, padding, activation):
    """(y, sums) in float64 from the same (rounded) inputs, differentiable by autograd."""
    a = x
    if scale is not None:
        a = act_reference(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), activation)
    y = F.conv2d(a, w, stride=stride, padding=padding)
    return y, torch.stack([y.sum((0, 2, 3)), (y * y).sum((0, 2, 3))])


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype,activation", [(torch.float32, "gelu"), (torch.float16, "relu"),
                                              (torch.bfloat16, "silu"), (torch.float32, None)])
def test_forward_and_gradients_match_float64(kernels_only, shape, dtype, activation):
    """y, the epilogue's sums, and every gradient (x, w, scale, shift) with a loss that reads y and the sums,
    so the statistics' gradient path runs too. Odd sizes: C, K, H, W not multiples of any tile."""
    torch.manual_seed(0)
    r, stride, padding = SHAPES[shape]
    x = nhwc(2, 12, 7, 9, dtype=dtype)
    w = (torch.randn(20, 12, r, r, device=DEVICE) * 0.2).to(dtype)
    prologue = activation is not None
    scale = (torch.rand(12, device=DEVICE) + 0.5) if prologue else None
    shift = torch.randn(12, device=DEVICE) if prologue else None
    x, w, scale, shift = leaves(x, w, scale, shift)
    y, sums = ops.conv2d_fused(x, w, scale, shift, stride, padding, activation or "none", stats=True)
    assert y.dtype == dtype and sums.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    x64, w64, scale64, shift64 = leaves(*(t.double() if t is not None else None for t in (x, w, scale, shift)))
    y64, sums64 = reference64(x64, w64, scale64, shift64, stride, padding, activation)
    tol = TOL[dtype]
    close(y, y64, tol)
    close(sums, sums64, tol)
    # the sums describe the stored y (its rounded values), so they agree with y's own sums to float32
    close(sums, torch.stack([y.double().sum((0, 2, 3)), y.double().pow(2).sum((0, 2, 3))]), 1e-6)
    g = torch.randn_like(y64)
    g_sums = torch.randn(2, 20, device=DEVICE, dtype=torch.float64) / y64[:, 0].numel()
    ((y.double() * g).sum() + (sums.double() * g_sums).sum()).backward()
    ((y64 * g).sum() + (sums64 * g_sums).sum()).backward()
    for ours, ref in ((x, x64), (w, w64), (scale, scale64), (shift, shift64)):
        if ours is not None:
            assert ours.grad.dtype == ours.dtype
            close(ours.grad, ref.grad, 5 * tol)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_mean_rstd_from_the_sums_is_batchnorms():
    """The statistics a following BatchNorm takes, and their gradient back through the op, match
    F.batch_norm's on y (float64: the kernels under the interpreter, cuDNN on a GPU)."""
    torch.manual_seed(5)
    x = nhwc(2, 4, 6, 5, dtype=torch.float64)
    w = torch.randn(3, 4, 3, 3, device=DEVICE, dtype=torch.float64)
    x1, x2 = leaves(x, x)
    y, sums = ops.conv2d_fused(x1, w, stats=True)
    mean, rstd = Cv.mean_rstd(sums, y.numel() // y.shape[1], 1e-5)
    z = (y - mean.view(1, -1, 1, 1)) * rstd.view(1, -1, 1, 1)
    z_ref = F.batch_norm(F.conv2d(x2, w, padding=1), None, None, training=True, eps=1e-5)
    close(z, z_ref.detach(), 1e-10)
    g = torch.randn_like(z_ref)
    (z * g).sum().backward(), (z_ref * g).sum().backward()
    close(x1.grad, x2.grad, 1e-9)


def test_padding_is_zero_after_the_prologue(kernels_only):
    """x = 0 with shift 1 and relu: every in-image tap reads act(0 * s + 1) = 1, every padding tap 0, so with
    all-ones weights y counts each position's in-image taps (4 in a corner, 6 on an edge, 9 inside). A
    kernel that padded before the prologue would give 9 everywhere."""
    x = torch.zeros(1, 3, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.ones(2, 3, 3, 3, device=DEVICE)
    y, _ = ops.conv2d_fused(x, w, torch.full((3,), 2.0, device=DEVICE), torch.ones(3, device=DEVICE),
                            activation="relu")
    rows = torch.tensor([2, 3, 3, 3, 2], dtype=torch.float32, device=DEVICE)
    cols = torch.tensor([2, 3, 3, 3, 3, 2], dtype=torch.float32, device=DEVICE)
    expected = 3 * rows[:, None] * cols[None, :]  # 3 input channels
    assert torch.equal(y[0, 0], expected) and torch.equal(y[0, 1], expected)
    # and the backward: the gradient that reaches x does not include padding taps (dshift counts real taps)
    shift = torch.ones(3, device=DEVICE, requires_grad=True)
    y, _ = ops.conv2d_fused(x, w, torch.ones(3, device=DEVICE), shift, activation="relu")
    y.sum().backward()
    assert torch.equal(shift.grad, torch.full((3,), 2 * expected.sum().item() / 3, device=DEVICE))


def test_kernels_without_the_op_match_the_reference_at_interpreter_tiles(kernels_only):
    """The launchers directly, with more rows than one tile and more channels than one BLOCK_K, and wgrad
    split over several programs: the partial sums of each level add up."""
    torch.manual_seed(1)
    x = nhwc(3, 33, 6, 8)
    w = torch.randn(18, 33, 3, 3, device=DEVICE) * 0.2
    scale, shift = torch.rand(33, device=DEVICE) + 0.5, torch.randn(33, device=DEVICE)
    y, sums = Cv.forward(x, w, scale, shift, 1, 1, "silu", True)
    x64, w64, s64, b64 = leaves(x.double(), w.double(), scale.double(), shift.double())
    y64, sums64 = reference64(x64, w64, s64, b64, 1, 1, "silu")
    close(y, y64, 2e-5)
    close(sums, sums64, 2e-5)
    g = nhwc(3, 18, 6, 8)
    dx, dscale, dshift = Cv.input_grad(g, x, w, scale, shift, 1, "silu")
    dw = Cv.weight_grad(g, x, w, scale, shift, 1, "silu")
    y64.backward(g.double())
    for ours, ref in ((dx, x64), (dw, w64), (dscale, s64), (dshift, b64)):
        close(ours, ref.grad, 1e-4)


def test_partial_sums_cover_their_buffers_whatever_the_tile(kernels_only, monkeypatch):
    """The per-channel partials have a row per STAT_BLOCK positions; a program of BLOCK_M = 2 STAT_BLOCK
    (as an autotuner may pick) writes zeros into its second row. Buffers start as NaN: any row or element
    left unwritten would show."""
    monkeypatch.setattr(Cv, "_stat_block", lambda: Cv._fixed_config()["BLOCK_M"] // 2)
    monkeypatch.setattr(Cv, "_partials", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                  device=device))
    torch.manual_seed(4)
    x, w = nhwc(2, 5, 7, 5), torch.randn(6, 5, 3, 3, device=DEVICE)
    scale, shift = torch.rand(5, device=DEVICE) + 0.5, torch.randn(5, device=DEVICE)
    y, sums = Cv.forward(x, w, scale, shift, 1, 1, "relu", True)
    close(sums, reference64(x.double(), w.double(), scale.double(), shift.double(), 1, 1, "relu")[1], 2e-5)
    g = nhwc(2, 6, 7, 5)
    dx, dscale, dshift = Cv.input_grad(g, x, w, scale, shift, 1, "relu")
    dw = Cv.weight_grad(g, x, w, scale, shift, 1, "relu")
    assert all(torch.isfinite(t).all() for t in (dx, dscale, dshift, dw))


def test_gradcheck_float64_through_the_kernels(kernels_only):
    """Under the interpreter float64 runs the Triton kernels (dispatch says so), so gradcheck checks their
    gradients, the prologue's and the statistics' included."""
    torch.manual_seed(2)
    for r, stride, padding in SHAPES.values():
        x = torch.randn(2, 3, 5, 4, dtype=torch.float64, device=DEVICE).contiguous(memory_format=torch.channels_last)
        w = torch.randn(4, 3, r, r, dtype=torch.float64, device=DEVICE)
        scale, shift = torch.rand(3, dtype=torch.float64, device=DEVICE) + 0.5, torch.randn(3, dtype=torch.float64,
                                                                                             device=DEVICE)
        assert Cv.dispatch(x, w, stride, padding) == ("triton" if DEVICE == "cpu" else "cudnn")
        inputs = leaves(x, w, scale, shift)

        def f(x, w, scale, shift):
            return ops.conv2d_fused(x, w, scale, shift, stride, padding, "gelu", stats=True)

        assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
    # without the prologue, only x and w
    assert torch.autograd.gradcheck(lambda x, w: ops.conv2d_fused(x, w, stride=2, padding=0, stats=True),
                                    leaves(x, w), fast_mode=True)


def test_dispatch_sends_other_shapes_and_layouts_to_cudnn():
    x = nhwc(2, 4, 6, 6)
    w3, w1, w5 = (torch.randn(5, 4, k, k, device=DEVICE) for k in (3, 1, 5))
    assert Cv.dispatch(x, w3, 1, 1) == "triton"
    assert Cv.dispatch(x, w1, 2, 0) == "triton"
    assert Cv.dispatch(x, w5, 1, 2) == "cudnn"  # 5x5
    assert Cv.dispatch(x, w3, 2, 1) == "cudnn"  # strided 3x3
    assert Cv.dispatch(x.contiguous(), w3, 1, 1) == "cudnn"  # NCHW
    assert Cv.dispatch(x.half(), w3, 1, 1) == "cudnn"  # mixed dtypes
    # the op gives the same answer either way, channels_last
    for xx, ww, stride, padding in ((x, w5, 1, 2), (x, w3, 2, 1), (x.contiguous(), w3, 1, 1)):
        y, sums = ops.conv2d_fused(xx, ww, torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE), stride,
                                   padding, "relu", stats=True)
        y_ref = F.conv2d(F.relu(xx), ww, stride=stride, padding=padding)
        close(y, y_ref.double(), 1e-5)
        close(sums[0], y_ref.double().sum((0, 2, 3)), 1e-5)
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_torch_backend_is_the_reference():
    x, w = nhwc(2, 4, 5, 5), torch.randn(3, 4, 3, 3, device=DEVICE)
    y, sums = ops.conv2d_fused(x, w, backend="torch")
    assert sums is None and torch.equal(y, F.conv2d(x, w, padding=1))


def test_opcheck_registrations():
    x = nhwc(2, 4, 5, 5).requires_grad_()
    w = torch.randn(6, 4, 3, 3, device=DEVICE, requires_grad=True)
    scale = (torch.rand(4, device=DEVICE) + 0.5).requires_grad_()
    shift = torch.randn(4, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.cudacnn.conv2d_fused.default, (x, w, scale, shift, 1, 1, "gelu", True, False))
    w1 = torch.randn(6, 4, 1, 1, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.cudacnn.conv2d_fused.default, (x, w1, None, None, 2, 0, "none", False, False))
    y, _ = ops.conv2d_fused(x.detach(), w.detach(), stats=True)
    torch.library.opcheck(torch.ops.cudacnn.conv2d_fused_backward.default,
                          (torch.randn_like(y), torch.randn(2, 6, device=DEVICE), y, x.detach(), w.detach(),
                           scale.detach(), shift.detach(), 1, 1, "gelu", False, True, True, True))


def test_unused_outputs_need_no_gradient():
    """Only y reaches the loss, or only the sums: the other output's gradient is never materialized."""
    x = nhwc(2, 4, 5, 5).requires_grad_()
    w = torch.randn(3, 4, 1, 1, device=DEVICE)
    y, sums = ops.conv2d_fused(x, w, stats=True)
    sums[1].sum().backward()  # d/dx of sum y^2 = conv_transpose(2 y)
    x64 = x.detach().double().requires_grad_()
    F.conv2d(x64, w.double()).pow(2).sum().backward()
    close(x.grad, x64.grad, 1e-5)


def test_bad_inputs_name_the_problem():
    x, w = nhwc(2, 4, 5, 5), torch.randn(3, 4, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="expects 5 input channels"):
        ops.conv2d_fused(x, torch.randn(3, 5, 3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="both scale and shift"):
        ops.conv2d_fused(x, w, scale=torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="pass scale and shift too"):
        ops.conv2d_fused(x, w, activation="relu")
    with pytest.raises(ValueError, match="scale has shape"):
        ops.conv2d_fused(x, w, torch.ones(3, device=DEVICE), torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="unknown prologue activation"):
        ops.conv2d_fused(x, w, torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE), activation="tanh")


COMPILE_FOR_H100 = r"""
import inspect
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cudacnn.kernels import conv as Cv

def build(fn, consts, dtype, warps, stages):
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in consts:
            signature[name], constexprs[(i,)] = "constexpr", consts[name]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name[:-4] in ("scale", "shift", "part") else "*" + dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # Triton specializes integers divisible by 16 (64 channels, their strides)
            signature[name] = "i32"
            if name not in ("M", "P", "H", "W", "rows_per_split"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    assert "wgmma" in compiled.asm["ptx"], fn  # the GEMM runs on Hopper's tensor cores

for dtype, prologue, kind, r in (("fp16", False, 0, 3), ("bf16", True, 2, 3), ("fp16", True, 4, 1)):
    common = dict(R=r, PROLOGUE=prologue, KIND=kind, FAST=True, UPCAST=False, PRECISION="ieee", CT=tl.float32)
    for cfg in (Cv.CONFIGS[0], Cv.CONFIGS[-3]):
        tiles, options = dict(cfg.kwargs), (cfg.num_warps, cfg.num_stages)
        build(Cv._conv_fwd_kernel, dict(common, STATS=prologue, STAT_BLOCK=Cv.STAT_BLOCK, **tiles), dtype, *options)
        build(Cv._conv_dgrad_kernel, dict(common, STAT_BLOCK=Cv.STAT_BLOCK, **tiles), dtype, *options)
        tiles.pop("GROUP_M")
        build(Cv._conv_wgrad_kernel, dict(common, **tiles), dtype, *options)
common = dict(R=3, PROLOGUE=True, KIND=1, FAST=False, UPCAST=False, PRECISION="tf32", CT=tl.float32)
build(Cv._conv_fwd_kernel, dict(common, STATS=True, STAT_BLOCK=64, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
      "fp32", 4, 3)
print("compiled")
"""


def test_kernels_compile_for_an_h100(run_compiled_triton):
    """The interpreter runs Python, not Triton's compiler: compile the three kernels (a sample of variants and
    tile configs) for sm_90 as a GPU run would, so type or layout errors the interpreter lets pass show here."""
    done = run_compiled_triton(COMPILE_FOR_H100)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# ---------------------------------------------------------------- GPU: the zoo's shapes, autotuned

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,c,k,hw,r,stride", [
    (64, 24, 64, 31, 3, 1),     # fast94's first conv (24 whitened channels)
    (64, 256, 256, 7, 3, 1),    # fast94 group 3
    (64, 128, 256, 16, 1, 2),   # resnet18 downsample shortcut
])
def test_gpu_zoo_shapes_match_float64(dtype, n, c, k, hw, r, stride):
    torch.manual_seed(3)
    x = nhwc(n, c, hw, hw, dtype=dtype)
    w = (torch.randn(k, c, r, r, device=DEVICE) / (c * r * r) ** 0.5).to(dtype)
    scale, shift = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    x, w, scale, shift = leaves(x, w, scale, shift)
    y, sums = ops.conv2d_fused(x, w, scale, shift, stride, (r - 1) // 2, "gelu", stats=True)
    x64, w64, s64, b64 = leaves(x.double(), w.double(), scale.double(), shift.double())
    y64, sums64 = reference64(x64, w64, s64, b64, stride, (r - 1) // 2, "gelu")
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    close(y, y64, tol)
    close(sums, sums64, tol)
    g = torch.randn_like(y64)
    y.backward(g.to(dtype)), y64.backward(g)
    for ours, ref in ((x, x64), (w, w64), (scale, s64), (shift, b64)):
        close(ours.grad, ref.grad, 5 * tol)
