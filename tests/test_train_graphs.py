"""`cudacnn train --cuda-graphs` (train/graphs.py): where it is refused, what runs eagerly, and on a GPU that
steps replayed from the graphs train as the eager model does, with the zoo's modules and with ours."""

from __future__ import annotations

import copy

import pytest
import torch

from cudacnn.errors import ConfigError
from cudacnn.models import create_model
from cudacnn.train.config import TrainConfig
from cudacnn.train.graphs import GraphedForward, check_graphs

CUDA = torch.device("cuda")


@pytest.mark.parametrize("distributed, overrides, message", [
    (True, {}, "--cuda-graphs trains on one GPU"),
    (False, dict(batch_size=512, max_per_gpu_batch=256), "--max-per-gpu-batch 256 splits each batch of 512"),
])
def test_graphs_are_refused_where_they_cannot_replace_the_step(distributed, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_graphs(TrainConfig(cuda_graphs=True, **overrides), CUDA, distributed)
    check_graphs(TrainConfig(cuda_graphs=True, batch_size=256, max_per_gpu_batch=256), CUDA, False)  # no split


def test_evaluation_and_no_grad_calls_run_the_model_itself():
    model = create_model("simple", num_classes=4).eval()
    forward = GraphedForward(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(forward(x), model(x))
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(forward(x), model(x))
    assert forward.graphed is None  # nothing was captured (a capture needs a GPU)


def _no_cuda_rng(monkeypatch) -> list:
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(int(state)))
    return restored


def test_the_graphs_take_the_captured_layout_and_other_batches_run_eagerly(monkeypatch):
    model = create_model("bn_dropout", num_classes=4).train()
    replays = []

    class Replayed(torch.nn.Module):  # stands in for the graphed module: counts its calls
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            replays.append(x.shape[0])
            return self.inner(x)

    def capture(module, sample_args, **kwargs):
        module(*sample_args)  # a warm-up step, undone after the capture
        return Replayed(module)

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    restored = _no_cuda_rng(monkeypatch)
    forward = GraphedForward(model)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    forward(x)
    assert replays == [4] and restored == [7]
    assert int(model.state_dict()["features.0.1.num_batches_tracked"]) == 1  # the warm-up's step undone
    forward(torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last))
    forward(torch.randn(4, 3, 32, 32))  # other strides
    forward(torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last))  # another batch size
    forward(x.clone().requires_grad_())  # an input that wants its own gradient
    assert replays == [4, 4]
    assert int(model.state_dict()["features.0.1.num_batches_tracked"]) == 5  # all ran


def test_a_failed_capture_says_so_and_undoes_its_warm_up(monkeypatch):
    model = create_model("bn_dropout", num_classes=4).train()
    before = copy.deepcopy(model.state_dict())

    def failing_capture(module, sample_args, **kwargs):
        module(*sample_args)  # a warm-up step: it moves the BatchNorm statistics
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors ...")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", failing_capture)
    rng_states = _no_cuda_rng(monkeypatch)
    with pytest.raises(ConfigError, match=r"could not capture this model's training step \(operation not "
                       r"permitted when stream is capturing\); train without --cuda-graphs$"):
        GraphedForward(model)(torch.randn(4, 3, 32, 32))
    after = model.state_dict()
    assert int(after["features.0.1.num_batches_tracked"]) == 0 and rng_states == [7]
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _steps(forward, model, batches, lr=0.05):
    """SGD steps under bf16 autocast as the Trainer takes them; the losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, fused=True)
    losses = []
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("name", ["smallnet", "bn_dropout"])
def test_gpu_graphed_steps_train_as_the_eager_model(name, kernels):
    from cudacnn.kernels import swap_modules

    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    for module in model.modules():  # masks drawn in a graph need not be the eager ones: no dropout here
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if kernels != "torch":
        model = swap_modules(model, kernels)
    model = model.to(CUDA, memory_format=torch.channels_last).train()
    twin = copy.deepcopy(model)
    generator = torch.Generator(device=CUDA).manual_seed(1)
    batches = [(torch.randn(64, 3, 32, 32, device=CUDA, generator=generator).to(memory_format=torch.channels_last),
                torch.randint(0, 10, (64,), device=CUDA, generator=generator)) for _ in range(5)]
    eager = _steps(model, model, batches)
    forward = GraphedForward(twin)
    graphed = _steps(forward, twin, batches)
    assert forward.graphed is not None
    # bf16 convolutions: the two runs' cuDNN algorithms may differ, so close, not bitwise
    torch.testing.assert_close(graphed, eager, rtol=2e-2, atol=2e-2)
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        if key.endswith("num_batches_tracked"):  # capture's warm-up steps were undone
            assert int(b) == int(a) == len(batches), key
        else:
            torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-2, msg=key)
    # a batch of another size runs the model eagerly; evaluation too
    x = batches[0][0][:10]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = forward(x)
    assert y.shape == (10, 10) and y.grad_fn is not None
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(x), twin(x))


@pytest.mark.gpu
@gpu
def test_gpu_trainer_with_graphs_trains_as_without(tmp_path):
    from test_train import learnable_dataset

    from cudacnn.train.trainer import Trainer

    dataset = learnable_dataset(n_train=512, n_test=128)
    results = {}
    for graphs in (False, True):
        config = TrainConfig(model="smallnet", epochs=3, batch_size=64, lr=0.05, val_fraction=0.0, amp="bf16",
                             device="cuda", cuda_graphs=graphs, out=str(tmp_path / "runs")).validate()
        results[graphs] = Trainer(config, run_dir=tmp_path / f"run-{graphs}", dataset=dataset, quiet=True).fit()
    eager, graphed = results[False], results[True]
    assert graphed.epochs_done == 3
    assert graphed.history[-1]["train_loss"] < graphed.history[0]["train_loss"]
    # dropout's masks in a graph need not be the eager ones, so the runs are close, not equal
    assert abs(graphed.history[-1]["train_loss"] - eager.history[-1]["train_loss"]) < 0.25
    assert graphed.test_accuracy > 0.5 and abs(graphed.test_accuracy - eager.test_accuracy) < 0.2  # chance: 0.25


@pytest.mark.gpu
@gpu
def test_gpu_a_graphed_run_resumes_to_the_same_weights(tmp_path):
    """The capture's warm-up leaves no trace and the replays draw their dropout masks from the saved random
    state, so an interrupted graphed run resumes to the weights of one that was not."""
    from test_train import learnable_dataset, straight_and_resumed

    from cudacnn.train.checkpoint import load_checkpoint

    config = TrainConfig(model="bn_dropout", epochs=3, batch_size=64, lr=0.05, val_fraction=0.0, amp="bf16",
                         device="cuda", cuda_graphs=True, deterministic=True, out=str(tmp_path / "runs")).validate()
    straight, resumed = straight_and_resumed(config, learnable_dataset(n_train=512, n_test=128))
    a, b = (load_checkpoint(r.run_dir / "checkpoints" / "last.pt")["train_state"]["model"] for r in (straight, resumed))
    for key in a:
        assert torch.equal(a[key], b[key]), key
