"""The engine's GPU backend (gpu_ops: Triton kernels over pool memory) against its NumPy twin (cpu_ops).
Without a GPU the kernels run in the Triton interpreter on CPU tensors, so shapes stay tiny."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import cudacnn.engine as gnn
from cudacnn.engine import cpu_ops
from cudacnn.engine import gpu_ops as G

ON_GPU = torch.cuda.is_available()  # without a GPU the kernels run under Triton's interpreter (conftest.py)
pytestmark = pytest.mark.usefixtures("triton_interpreter")  # so G.matmul & co. never fall back to torch
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def up(x, channels_last=False):
    """Upload to the GPU backend; channels_last mimics a convolution's output layout."""
    t = G.asarray(x)
    return G.to_channels_last(t) if channels_last else t


def close(gpu, cpu, tol=1e-5):
    np.testing.assert_allclose(G.to_numpy(gpu), cpu, rtol=tol, atol=tol)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("k,stride,pad", [(3, 1, 0), (3, 2, 1), (2, 2, 0)])
def test_im2col_and_col2im(channels_last, k, stride, pad):
    x = randn(2, 3, 7, 6)
    cols = G.im2col(up(x, channels_last), k, k, stride, pad)
    close(cols, cpu_ops.im2col(x, k, k, stride, pad))
    dcols = randn(*cols.shape)
    like = up(x, channels_last)
    dx = G.col2im(G.asarray(dcols), like, k, k, stride, pad)
    assert dx.stride() == like.stride()  # gradients keep their tensor's layout
    close(dx, cpu_ops.col2im(dcols, x, k, k, stride, pad))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("k,stride", [(2, 2), (3, 2)])
def test_maxpool(channels_last, k, stride):
    x = randn(2, 3, 7, 6)
    out, arg = G.maxpool2d(up(x, channels_last), k, stride)
    ref_out, ref_arg = cpu_ops.maxpool2d(x, k, stride)
    close(out, ref_out)
    np.testing.assert_array_equal(G.to_numpy(arg), ref_arg)
    dy = randn(*ref_out.shape)
    dy_dev = G.empty_like(out)
    dy_dev.copy_(torch.from_numpy(dy))
    close(G.maxpool2d_backward(dy_dev, arg, up(x, channels_last), k, stride),
          cpu_ops.maxpool2d_backward(dy, ref_arg, x, k, stride))


def test_column_sums_and_layout_helpers():
    a, b = randn(333, 20), randn(333, 20)
    sums = G.column_sums(G.asarray(a), G.asarray(b))
    close(sums, np.stack([a.sum(0), (a * b).sum(0)]), tol=1e-4)
    close(G.column_sums(G.asarray(a)), a.sum(0), tol=1e-4)
    x = randn(2, 3, 4, 5)
    xl = up(x, channels_last=True)
    assert G.is_channels_last(xl)
    close(G.flatten(xl), x.reshape(2, -1))
    dy = randn(2, 60)
    back = G.unflatten(G.asarray(dy), xl)
    assert back.stride() == xl.stride()
    close(back, dy.reshape(x.shape))
    close(G.nchw_to_rows(xl), cpu_ops.nchw_to_rows(x))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batchnorm(training, channels_last):
    x, gamma, beta, dy = randn(3, 4, 5, 2), randn(4), randn(4), randn(3, 4, 5, 2)
    rm, rv = randn(4), np.abs(randn(4)) + 0.5
    rm_dev, rv_dev = G.asarray(rm), G.asarray(rv)
    y, saved = G.batchnorm_forward(up(x, channels_last), G.asarray(gamma), G.asarray(beta), rm_dev, rv_dev, 0.1, 1e-5,
                                   training)
    ref_y, ref_saved = cpu_ops.batchnorm_forward(x, gamma, beta, rm, rv, 0.1, 1e-5, training)
    close(y, ref_y, tol=1e-4)
    close(rm_dev, rm, tol=1e-5)
    close(rv_dev, rv, tol=1e-5)
    dy_dev = G.empty_like(y)
    dy_dev.copy_(torch.from_numpy(dy))
    dx, dgamma, dbeta = G.batchnorm_backward(dy_dev, up(x, channels_last), saved, G.asarray(gamma), training)
    ref_dx, ref_dgamma, ref_dbeta = cpu_ops.batchnorm_backward(dy, x, ref_saved, gamma, training)
    close(dx, ref_dx, tol=1e-4)
    close(dgamma, ref_dgamma, tol=1e-4)
    close(dbeta, ref_dbeta, tol=1e-4)


def test_activations_softmax_and_loss():
    x = up(randn(2, 3, 4, 4), channels_last=True)
    g = up(randn(2, 3, 4, 4), channels_last=True)  # not x: swapped arguments must show
    xn, gn = G.to_numpy(x), G.to_numpy(g)
    for kind in ("relu", "gelu"):
        close(G.activation_forward(x, kind), cpu_ops.activation_forward(xn, kind))
        close(G.activation_backward(g, x, kind), cpu_ops.activation_backward(gn, xn, kind))
    logits, dy = randn(5, 10), randn(5, 10)
    y = G.softmax(G.asarray(logits))
    close(y, cpu_ops.softmax(logits))
    close(G.softmax_backward(G.asarray(dy), y), cpu_ops.softmax_backward(dy, cpu_ops.softmax(logits)))
    targets = np.array([1, 0, 9, 3, 3])
    logits[2, 9] = 10.0  # one sure hit for the correct count
    stats, ref_stats = G.zeros((2,)), np.zeros(2)
    grad = G.softmax_xent(G.asarray(logits), G.asarray(targets), stats)
    close(grad, cpu_ops.softmax_xent(logits, targets, ref_stats))
    close(stats, ref_stats, tol=1e-5)


def test_dropout_mask_is_reproducible_from_its_seed():
    x = G.asarray(np.ones((64, 64), np.float32))
    y = G.to_numpy(G.dropout(x, 0.25, seed=7))
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert 0.2 < (y == 0).mean() < 0.3
    np.testing.assert_array_equal(G.to_numpy(G.dropout(x, 0.25, seed=7)), y)
    assert not np.array_equal(G.to_numpy(G.dropout(x, 0.25, seed=8)), y)


def test_gather_rows_with_random_flips():
    src = randn(10, 2, 3, 4)
    index = np.array([3, 3, 7, 0, 9, 1, 2, 2])
    batch = G.to_numpy(G.gather_rows(G.asarray(src), G.asarray(index)))
    np.testing.assert_array_equal(batch, src[index])
    flipped = G.to_numpy(G.gather_rows(G.asarray(src), G.asarray(index), flip_seed=3))
    is_flipped = [np.array_equal(f, s[..., ::-1]) for f, s in zip(flipped, src[index])]
    is_same = [np.array_equal(f, s) for f, s in zip(flipped, src[index])]
    assert all(a or b for a, b in zip(is_flipped, is_same)) and any(is_flipped) and any(is_same)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_and_adam_steps(momentum):
    p, g = randn(37), randn(37)
    buf = randn(37)  # a velocity from earlier steps, so the momentum * buf term counts
    p0, buf0 = p.copy(), buf.copy()
    p_dev, buf_dev = G.asarray(p), G.asarray(buf)
    G.sgd_step(p_dev, G.asarray(g), buf_dev if momentum else None, 0.1, momentum, 1e-3)
    cpu_ops.sgd_step(p, g, buf if momentum else None, 0.1, momentum, 1e-3)
    close(p_dev, p)
    velocity = momentum * buf0 + g + 1e-3 * p0 if momentum else g + 1e-3 * p0  # by hand
    close(p_dev, p0 - 0.1 * velocity)
    if momentum:
        close(buf_dev, buf)
        close(buf_dev, velocity)
    m, v = np.zeros(37, np.float32), np.zeros(37, np.float32)
    p_dev, m_dev, v_dev = G.asarray(p), G.asarray(m), G.asarray(v)
    for step in (1, 2):
        G.adam_step(p_dev, G.asarray(g), m_dev, v_dev, 0.01, 0.9, 0.999, 1e-8, 1e-3, step)
        cpu_ops.adam_step(p, g, m, v, 0.01, 0.9, 0.999, 1e-8, 1e-3, step)
    close(p_dev, p)
    close(m_dev, m)
    close(v_dev, v)


def _model():
    return gnn.Sequential([gnn.Conv2d(3, 4, 3, padding=1), gnn.BatchNorm2d(4), gnn.ReLU(), gnn.MaxPool2d(2),
                           gnn.Conv2d(4, 6, 3), gnn.GELU(), gnn.Flatten(), gnn.Linear(6 * 2 * 2, 5), gnn.Softmax()])


def test_gpu_and_cpu_backends_agree_on_a_training_run():
    x, y = randn(3, 3, 8, 8), rng.integers(0, 5, 3)
    results = {}
    for device in ("cpu", "cuda"):
        gnn.manual_seed(0)
        model = _model().to(device)
        optimizer = gnn.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = [float(model.ops.to_numpy(model.train_step(model.ops.asarray(x), model.ops.asarray(y), optimizer))[0])
                  for _ in range(3)]
        results[device] = (losses, model.forward(x), model.state_dict())
    np.testing.assert_allclose(results["cuda"][0], results["cpu"][0], rtol=1e-4)
    np.testing.assert_allclose(results["cuda"][1], results["cpu"][1], rtol=1e-4, atol=1e-5)
    for name, value in results["cpu"][2].items():
        np.testing.assert_allclose(results["cuda"][2][name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    # and the quick-start runs on the GPU backend, NumPy in and NumPy out
    model = gnn.Sequential([gnn.Linear(20, 8), gnn.ReLU(), gnn.Linear(8, 4), gnn.Softmax()])
    X = randn(6, 20)
    expected = model.forward(X)
    out = model.to("cuda").forward(X)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_profile_and_fit_on_the_gpu_backend(capsys):
    gnn.manual_seed(0)
    model = _model().to("cuda")
    x, y = randn(4, 3, 8, 8), rng.integers(0, 5, 4)
    rows = model.profile(x, y, repeats=1)
    assert len(rows) == 8 and rows[0]["kept_mib"] > 0
    history = model.fit(np.concatenate([x, x]), np.concatenate([y, y]), epochs=2, batch_size=4, flip=True,
                        verbose=False, optimizer=gnn.Adam(model.parameters(), lr=0.01))
    assert len(history) == 2 and history[1]["loss"] < history[0]["loss"]
    assert "forward ms" in capsys.readouterr().out


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (the interpreter is too slow for this size)")
def test_simple_cnn_backends_agree_at_full_size():
    gnn.manual_seed(0)
    model = gnn.simple_cnn()
    x = randn(64, 3, 32, 32)
    ref = model.forward(x)
    model.to("cuda")
    np.testing.assert_allclose(model.forward(x), ref, rtol=1e-4, atol=1e-5)


def test_split_k_matmul_for_weight_gradients():
    a, b = randn(300, 5), randn(300, 7)  # a.T @ b: a (5, 300) transposed view, long reduction
    close(G.matmul_split_k(G.asarray(a).T, G.asarray(b)), a.T @ b, tol=1e-4)
