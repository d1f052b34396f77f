"""`cudacnn train --cuda-graphs` (train/graphs.py): where it is refused, what the capture undoes and what runs
eagerly (on the CPU, with CUDA's graph calls faked), and on a GPU that steps replayed from the graph train as the
eager steps do, with the zoo's modules and with ours."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from cudacnn.errors import ConfigError
from cudacnn.models import create_model
from cudacnn.train.config import TrainConfig
from cudacnn.train.graphs import GraphedStep, check_graphs

CUDA = torch.device("cuda")


@pytest.mark.parametrize("distributed, overrides, message", [
    (True, {}, "--cuda-graphs trains on one GPU"),
    (False, dict(batch_size=512, max_per_gpu_batch=256), "--max-per-gpu-batch 256 splits each batch of 512"),
])
def test_graphs_are_refused_where_they_cannot_replace_the_step(distributed, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_graphs(TrainConfig(cuda_graphs=True, **overrides), CUDA, distributed)
    check_graphs(TrainConfig(cuda_graphs=True, batch_size=256, max_per_gpu_batch=256), CUDA, False)  # no split


def _body(model, autocast: str | None = None, cache: bool = True):
    """The step a graph holds, as the Trainer's: forward and loss (under `autocast`'s bf16 where named), backward,
    the totals added in place."""
    def body(x, y, loss_sum, correct):
        with torch.autocast(autocast or "cpu", dtype=torch.bfloat16, enabled=autocast is not None,
                            cache_enabled=cache):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    return body


class _FakeCuda:
    """CUDA's graph, stream and generator calls on the CPU: capture runs the body once as a real capture would
    not (its effects must be undone all the same), and a replay runs the body on the graph's own inputs, into
    the gradients it overwrites, as a replay does."""

    def __init__(self, monkeypatch, fail: str | None = None):
        self.captures, self.replays, self.rng_restored, self.step = 0, 0, [], None
        fake = self

        class Graph:
            def replay(self):
                fake.replays += 1
                step = fake.step
                for p in step.model.parameters():  # a replay writes the gradients, it does not add to them
                    p.grad.zero_()
                step.body(*step.inputs, step.loss_sum, step.correct)

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        @contextlib.contextmanager
        def graph(g):
            fake.captures += 1
            assert all(p.grad is None for p in fake.step.model.parameters())  # the backward writes them
            yield
            if fail:
                raise RuntimeError(fail)

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7]))
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: fake.rng_restored.append(int(state)))


def _batch(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 32, 32, generator=generator).to(memory_format=torch.channels_last),
            torch.randint(0, 4, (n,), generator=generator))


def _eager_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    _body(model)(x, y, torch.zeros(()), torch.zeros((), dtype=torch.long))
    return [p.grad.clone() for p in model.parameters()]


def test_the_step_replays_its_layout_and_runs_other_batches_eagerly(monkeypatch):
    torch.manual_seed(0)
    model = create_model("bn_dropout", num_classes=4, dropout=0.0, head_dropout=0.0).train()
    twin = copy.deepcopy(model)
    fake = _FakeCuda(monkeypatch)
    step = fake.step = GraphedStep(model, _body(model), torch.device("cpu"))
    loss_sum, correct = step.totals()
    x, y = _batch(8)
    step.step(x, y)
    assert fake.captures == 1 and fake.replays == 1 and fake.rng_restored == [7]
    # the warm-up and capture left no trace: one step's BatchNorm update and totals, the eager step's gradients
    assert int(model.state_dict()["features.0.1.num_batches_tracked"]) == 1
    for got, want in zip([p.grad for p in model.parameters()], _eager_grads(twin, x, y)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(model.state_dict()["features.0.1.running_mean"],
                               twin.state_dict()["features.0.1.running_mean"])
    first_loss = float(loss_sum)
    assert first_loss > 0 and 0 <= int(correct) <= 8

    grads = [p.grad for p in model.parameters()]
    x2, y2 = _batch(8, seed=1)
    step.step(x2, y2)  # the same layout: copied into the graph's inputs and replayed
    assert fake.replays == 2 and torch.equal(step.inputs[0], x2) and torch.equal(step.inputs[1], y2)
    assert float(loss_sum) > first_loss
    for other in (_batch(5, seed=2), (x2.contiguous(), y2)):  # another batch size, other strides: eagerly
        step.step(*other)
        assert fake.replays == 2
        # into the same gradient tensors, zeroed first: the graph's backward still writes into them
        assert all(p.grad is g for p, g in zip(model.parameters(), grads))
        for got, want in zip(grads, _eager_grads(copy.deepcopy(model), *other)):
            torch.testing.assert_close(got, want)
    assert int(model.state_dict()["features.0.1.num_batches_tracked"]) == 4
    zeroed = step.totals()
    assert zeroed[0] is loss_sum and zeroed[1] is correct and float(loss_sum) == 0 == int(correct)  # in place


def test_a_failed_capture_says_so_and_undoes_its_warm_up(monkeypatch):
    model = create_model("bn_dropout", num_classes=4).train()
    before = copy.deepcopy(model.state_dict())
    fake = _FakeCuda(monkeypatch, fail="operation not permitted when stream is capturing\nCUDA kernel errors ...")
    step = fake.step = GraphedStep(model, _body(model), torch.device("cpu"))
    loss_sum, correct = step.totals()
    with pytest.raises(ConfigError, match=r"could not capture this model's training step \(operation not "
                       r"permitted when stream is capturing\); train without --cuda-graphs$"):
        step.step(*_batch(4))
    after = model.state_dict()
    assert int(after["features.0.1.num_batches_tracked"]) == 0 and fake.rng_restored == [7]
    assert float(loss_sum) == 0 and int(correct) == 0 and fake.replays == 0
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _steps(model, batches, graphed: bool, lr=0.05):
    """SGD steps under bf16 autocast as the Trainer takes them, eagerly or through a GraphedStep; the totals."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, fused=True)

    body = _body(model, autocast="cuda", cache=not graphed)
    step = GraphedStep(model, body, CUDA) if graphed else None
    loss_sum, correct = step.totals() if step else (torch.zeros((), device=CUDA),
                                                         torch.zeros((), device=CUDA, dtype=torch.long))
    for x, y in batches:
        if step:
            step.step(x, y)
        else:
            optimizer.zero_grad(set_to_none=True)
            body(x, y, loss_sum, correct)
        optimizer.step()
    assert step is None or step.graph is not None
    return float(loss_sum), int(correct)


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

    def batch(n):
        return (torch.randn(n, 3, 32, 32, device=CUDA, generator=generator).to(memory_format=torch.channels_last),
                torch.randint(0, 10, (n,), device=CUDA, generator=generator))

    # five replays, then a batch of another size (eagerly, into the graph's gradients), then two more replays
    batches = [batch(64) for _ in range(5)] + [batch(40)] + [batch(64) for _ in range(2)]
    eager, graphed = _steps(model, batches, graphed=False), _steps(twin, batches, graphed=True)
    # bf16 convolutions: the two runs' cuDNN algorithms may differ, so close, not bitwise
    assert abs(graphed[0] - eager[0]) < 0.02 * eager[0] and abs(graphed[1] - eager[1]) <= 8
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        if key.endswith("num_batches_tracked"):  # capture's warm-up steps were undone
            assert int(b) == int(a) == len(batches), key
        else:
            torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-2, msg=key)


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
