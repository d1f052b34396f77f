"""cudacnn.engine on its NumPy backend: the quick-start, every layer's gradients against finite
differences and against PyTorch autograd, optimizers against torch.optim, training, weights, profiler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cudacnn.engine as gnn
from cudacnn.errors import CheckpointError


def test_quickstart_runs_unchanged():
    import cudacnn.engine as gnn
    import numpy as np
    model = gnn.Sequential([gnn.Linear(784, 256), gnn.ReLU(), gnn.Linear(256, 128), gnn.ReLU(),
                            gnn.Linear(128, 10), gnn.Softmax()])
    X = np.random.randn(32, 784).astype(np.float32); y = np.random.randint(0, 10, (32,))  # noqa: E702
    predictions = model.forward(X)
    loss = gnn.cross_entropy_loss(predictions, y)

    assert isinstance(predictions, np.ndarray) and predictions.shape == (32, 10)
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, rtol=1e-5)
    expected = -np.log(predictions[np.arange(32), y]).mean()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert 1.5 < loss < 3.5  # near log(10) for an untrained model


# -- one factory per layer: the engine layer, the same function in torch, the input shape ------------
def _torch_conv(layer):
    w, b = (torch.tensor(layer.weight.data), torch.tensor(layer.bias.data))
    return lambda x, w=w, b=b: F.conv2d(x, w, b, stride=layer.stride, padding=layer.padding), [w, b]


def _torch_linear(layer):
    w, b = torch.tensor(layer.weight.data), torch.tensor(layer.bias.data)
    return lambda x: F.linear(x, w, b), [w, b]


def _torch_bn(layer, training):
    w, b = torch.tensor(layer.weight.data), torch.tensor(layer.bias.data)
    rm, rv = torch.tensor(layer.running_mean), torch.tensor(layer.running_var)
    return lambda x: F.batch_norm(x, rm, rv, w, b, training=training, momentum=layer.momentum, eps=layer.eps), [w, b]


def _bn_eval():
    layer = gnn.BatchNorm2d(3)
    layer.running_mean[:] = np.array([0.1, -0.2, 0.3], np.float32)
    layer.running_var[:] = np.array([0.5, 1.5, 2.0], np.float32)
    layer.weight.data[:] = np.array([1.2, 0.7, -0.4], np.float32)
    layer.training = False
    return layer


LAYERS = {
    "linear": (lambda: gnn.Linear(6, 4), _torch_linear, (5, 6)),
    "conv": (lambda: gnn.Conv2d(2, 3, 3), _torch_conv, (2, 2, 6, 5)),
    "conv_stride2_pad1": (lambda: gnn.Conv2d(2, 3, 3, stride=2, padding=1), _torch_conv, (2, 2, 7, 6)),
    "maxpool": (lambda: gnn.MaxPool2d(2), lambda l: (lambda x: F.max_pool2d(x, 2), []), (2, 3, 6, 5)),
    "maxpool_3_stride_2": (lambda: gnn.MaxPool2d(3, 2), lambda l: (lambda x: F.max_pool2d(x, 3, 2), []), (1, 2, 7, 7)),
    "flatten": (gnn.Flatten, lambda l: (lambda x: x.flatten(1), []), (2, 3, 2, 2)),
    "relu": (gnn.ReLU, lambda l: (F.relu, []), (4, 7)),
    "gelu": (gnn.GELU, lambda l: (F.gelu, []), (4, 7)),
    "softmax": (gnn.Softmax, lambda l: (lambda x: F.softmax(x, dim=1), []), (4, 7)),
    "batchnorm_train": (lambda: gnn.BatchNorm2d(3), lambda l: _torch_bn(l, True), (4, 3, 3, 2)),
    "batchnorm_eval": (_bn_eval, lambda l: _torch_bn(l, False), (4, 3, 3, 2)),
    "dropout_eval_or_zero": (lambda: gnn.Dropout(0.0), lambda l: (lambda x: x, []), (4, 7)),
}


def _run_engine(layer, x, r):
    """Forward x, backward r (so that the loss is sum(out * r)); returns out, dx, parameter grads."""
    out = layer.forward(x.copy())
    dx = layer.backward(r.copy())
    return out, dx, [p.grad for p in layer.parameters().values()]


def _layer_and_input(name, seed):
    """A fresh engine layer (weights from gnn.manual_seed(seed)), an input for it, and the rng that made it."""
    make, _, shape = LAYERS[name]
    gnn.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    return make(), rng.standard_normal(shape).astype(np.float32), rng


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_matches_torch_autograd(name):
    layer, x, rng = _layer_and_input(name, 1)
    fn, torch_params = LAYERS[name][1](layer)
    out_t = fn(torch.tensor(x))
    r = rng.standard_normal(tuple(out_t.shape)).astype(np.float32)
    out, dx, grads = _run_engine(layer, x, r)

    xt = torch.tensor(x, requires_grad=True)
    for p in torch_params:
        p.requires_grad_(True)
    (fn(xt) * torch.tensor(r)).sum().backward()
    np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert len(grads) == len(torch_params)
    for g, p in zip(grads, torch_params):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_gradients_match_finite_differences(name):
    layer, x, rng = _layer_and_input(name, 3)
    out = layer.forward(x.copy())
    r = rng.standard_normal(out.shape).astype(np.float32)
    dx = layer.backward(r.copy())
    grads = {name: p.grad.copy() for name, p in layer.parameters().items()}
    running = {b: getattr(layer, b).copy() for b in layer.buffers}

    def loss(x_):
        for b, value in running.items():  # BatchNorm's forward updates its running stats: undo that
            getattr(layer, b)[...] = value
        return float((layer.forward(x_).astype(np.float64) * r).sum())

    eps = 1e-2
    for index in list(np.ndindex(x.shape))[:: max(1, x.size // 12)]:
        if abs(x[index]) < 2 * eps:  # ReLU's kink: finite differences straddle it
            continue
        xp, xm = x.copy(), x.copy()
        xp[index] += eps
        xm[index] -= eps
        numeric = (loss(xp) - loss(xm)) / (2 * eps)
        assert numeric == pytest.approx(dx[index], rel=2e-2, abs=2e-3), f"dx{index}"
    for pname, p in layer.parameters().items():
        flat = p.data.reshape(-1)
        for i in range(0, flat.size, max(1, flat.size // 6)):
            saved = flat[i]
            flat[i] = saved + eps
            up = loss(x)
            flat[i] = saved - eps
            down = loss(x)
            flat[i] = saved
            assert (up - down) / (2 * eps) == pytest.approx(grads[pname].reshape(-1)[i], rel=2e-2, abs=2e-3), pname


def test_dropout_masks_forward_and_backward_alike():
    gnn.manual_seed(0)
    layer = gnn.Dropout(0.5)
    x = np.ones((200, 50), np.float32)
    y = layer.forward(x)
    assert set(np.unique(y)) == {0.0, 2.0}
    assert 0.45 < (y == 0).mean() < 0.55
    dx = layer.backward(np.full_like(x, 3.0))
    np.testing.assert_array_equal(dx, np.where(y == 0, 0.0, 6.0))
    layer.training = False
    assert layer.forward(x) is x


def _small_cnn():
    return gnn.Sequential([gnn.Conv2d(3, 4, 3), gnn.ReLU(), gnn.MaxPool2d(2), gnn.Flatten(), gnn.Linear(4 * 3 * 3, 5),
                           gnn.Softmax()])


def _torch_small_cnn(model):
    params = [torch.tensor(p.data, requires_grad=True) for p in model.parameters().values()]

    def forward(x):
        h = F.max_pool2d(F.relu(F.conv2d(x, params[0], params[1])), 2)
        return F.linear(h.flatten(1), params[2], params[3])
    return forward, params


@pytest.mark.parametrize("opt", ["sgd", "sgd_momentum", "adam"])
def test_training_steps_match_torch_optim(opt):
    gnn.manual_seed(5)
    rng = np.random.default_rng(6)
    model = _small_cnn()
    forward, params = _torch_small_cnn(model)
    make = {"sgd": (lambda p: gnn.SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
            "sgd_momentum": (lambda p: gnn.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
                             lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3)),
            "adam": (lambda p: gnn.Adam(p, lr=0.01, weight_decay=1e-3),
                     lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3))}[opt]
    optimizer, torch_optimizer = make[0](model.parameters()), make[1](params)
    for _ in range(3):
        x = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
        y = rng.integers(0, 5, 6)
        stats = model.train_step(x, y, optimizer)
        torch_optimizer.zero_grad()
        loss = F.cross_entropy(forward(torch.tensor(x)), torch.tensor(y))
        loss.backward()
        torch_optimizer.step()
        assert stats[0] == pytest.approx(loss.item(), rel=1e-5)
    for p, t in zip(model.parameters().values(), params):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_adam_counts_each_parameters_own_steps():
    """A parameter without a gradient for the first steps starts its bias correction at its first update,
    as torch.optim.Adam does (a global step count would shrink its first updates)."""
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(4).astype(np.float32) for _ in range(2)]
    ours = [gnn.Parameter(v.copy()) for v in start]
    theirs = [torch.tensor(v.copy(), requires_grad=True) for v in start]
    optimizer, torch_optimizer = gnn.Adam(ours, lr=0.1), torch.optim.Adam(theirs, lr=0.1)
    for step in range(4):
        grads = [rng.standard_normal(4).astype(np.float32) for _ in range(2)]
        for i, g in enumerate(grads):
            late = i == 1 and step < 3  # the second parameter gets its first gradient at step 3
            ours[i].grad = None if late else g
            theirs[i].grad = None if late else torch.tensor(g)
        optimizer.step()
        torch_optimizer.step()
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert not np.allclose(ours[1].data, start[1])  # it did move, by a full first Adam step


def test_engine_matches_zoo_simple_model():
    """simple_cnn is the zoo's `simple` layer for layer: torch weights load and give the same logits."""
    from cudacnn.models import create_model

    torch_model = create_model("simple").eval()
    model = gnn.simple_cnn()
    model.load_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.tensor(x)).numpy()
    np.testing.assert_allclose(model.forward(x), expected, rtol=1e-4, atol=1e-5)


def test_fit_learns_a_separable_problem():
    gnn.manual_seed(0)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 10)).astype(np.float32) * 3
    y = rng.integers(0, 3, 300)
    X = centers[y] + rng.standard_normal((300, 10)).astype(np.float32)
    model = gnn.Sequential([gnn.Linear(10, 16), gnn.ReLU(), gnn.Dropout(0.1), gnn.Linear(16, 3), gnn.Softmax()])
    history = model.fit(X, y, epochs=4, batch_size=32, optimizer=gnn.Adam(model.parameters(), lr=0.02),
                        validation_data=(X, y), verbose=False)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_accuracy"] > 0.9
    assert model.predict(X).shape == (300, 3)


def test_save_load_round_trip(tmp_path):
    gnn.manual_seed(0)
    model = gnn.Sequential([gnn.Conv2d(3, 4, 3), gnn.BatchNorm2d(4), gnn.ReLU(), gnn.Flatten(), gnn.Linear(36, 3)])
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    model.forward(x)  # updates BatchNorm's running stats, which are saved too
    model.eval()
    expected = model.forward(x)
    model.save(tmp_path / "w.npz")
    gnn.manual_seed(1)
    other = gnn.Sequential([gnn.Conv2d(3, 4, 3), gnn.BatchNorm2d(4), gnn.ReLU(), gnn.Flatten(), gnn.Linear(36, 3)])
    other.eval()
    assert not np.allclose(other.forward(x), expected)
    other.load(tmp_path / "w.npz")
    np.testing.assert_array_equal(other.forward(x), expected)

    wrong = gnn.Sequential([gnn.Conv2d(3, 4, 3), gnn.ReLU(), gnn.Flatten(), gnn.Linear(36, 3)])
    with pytest.raises(CheckpointError, match="missing|unexpected"):
        wrong.load(tmp_path / "w.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        other.load(tmp_path / "nope.npz")


def test_profile_prints_a_row_per_layer(capsys, monkeypatch):
    """Timed by a fake clock (the device timer's `time.perf_counter` on the CPU) that only the conv layer moves:
    its forward by 1/256 s a call, its backward by 1 s in the warm-up step, then 1/128, 1/64 and 1/16 s in
    the three timed ones (binary fractions, so the milliseconds are exact)."""
    from types import SimpleNamespace

    from cudacnn import timing

    model = _small_cnn()
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    before = {k: p.data.copy() for k, p in model.parameters().items()}
    conv, linear = model.layers[0], model.layers[4]
    forwards = []
    now = [0.0]
    backward_costs = [1.0, 1 / 128, 1 / 64, 1 / 16]  # seconds, in call order
    slow_forward, slow_backward, counted_forward = conv.forward, conv.backward, linear.forward

    def conv_forward(*args, **kwargs):
        now[0] += 1 / 256
        return slow_forward(*args, **kwargs)

    def conv_backward(*args, **kwargs):  # a known cost on one layer: its row alone must show it
        now[0] += backward_costs.pop(0)
        return slow_backward(*args, **kwargs)

    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(conv, "forward", conv_forward)
    monkeypatch.setattr(conv, "backward", conv_backward)
    monkeypatch.setattr(linear, "forward", lambda h: forwards.append(1) or counted_forward(h))
    rows = model.profile(x, np.array([0, 1, 2, 3]), repeats=3)
    assert len(forwards) == 4 and backward_costs == []  # one warm-up step, then the 3 timed repeats
    # the median of 7.8125, 15.625 and 62.5 ms: not their mean (28.65) or sum (85.94), nor with the warm-up's 1000
    assert rows[0]["backward_ms"] == 15.625 and rows[0]["forward_ms"] == 3.90625
    assert all(r["forward_ms"] == 0 and r["backward_ms"] == 0 for r in rows[1:])  # the clock stood still there
    for name, p in model.parameters().items():  # profiling takes real steps but must not train the model
        np.testing.assert_array_equal(p.data, before[name])
    assert [r["layer"].split()[0] for r in rows] == ["0", "1", "2", "3", "4"]  # the final Softmax is fused
    assert [r["params"] for r in rows] == [4 * 3 * 3 * 3 + 4, 0, 0, 0, 36 * 5 + 5]
    assert [tuple(r["output"]) for r in rows] == [(4, 4, 6, 6), (4, 4, 6, 6), (4, 4, 3, 3), (4, 36), (4, 5)]
    assert rows[0]["kept_mib"] > 0  # im2col columns and the output stay for backward
    out = capsys.readouterr().out
    assert "backward ms" in out and "15.625" in out


def test_profile_leaves_batchnorm_statistics_and_mode_alone():
    model = gnn.Sequential([gnn.Conv2d(3, 4, 3), gnn.BatchNorm2d(4), gnn.ReLU(), gnn.Flatten(),
                            gnn.Linear(4 * 6 * 6, 5), gnn.Softmax()]).eval()
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32) * 3 + 1
    before = model.state_dict()
    model.profile(x, np.array([0, 1, 2, 3]), repeats=2, print_table=False)
    assert not model.training
    after = model.state_dict()
    for name, value in before.items():  # running_mean/var included: six training forwards must leave no trace
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_unknown_device_is_a_config_error():
    from cudacnn.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown device"):
        _small_cnn().to("tpu")
