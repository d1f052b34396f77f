"""`cudacnn bench train`: what a GPU buys for training, in two comparisons of the same model.

1. Sequential vs parallel: one recipe (the Keras-tutorial recipe: Adam 1e-3, batch 32, fp32, eager,
   per-batch host-to-device copies from NumPy) trained on the CPU and on the GPU.
2. Naive GPU loop (that same loop on the GPU) vs our GPU-resident pipeline: the split lives on the
   device (GpuLoader: augmentation on the device), large batch, bf16 autocast, channels_last,
   torch.compile, fused optimizer, OneCycle and label smoothing; no host sync inside an epoch.

Epoch times exclude evaluation; test accuracy is measured once, after the last epoch."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cudacnn.bench.harness import Stats, synchronize
from cudacnn.timing import DeviceTimer
from cudacnn.data import CIFAR10_MEAN, CIFAR10_STD, Augment, GpuLoader

log = logging.getLogger(__name__)


@dataclass
class TrainRun:
    """Per-epoch times (ms) of one training run and the test accuracy at its end."""
    label: str
    epoch_ms: list[float]
    accuracy: float
    epochs: int
    batch_size: int
    batches_per_epoch: int
    timed_batches: int          # batches actually run per epoch (fewer than batches_per_epoch: extrapolated)
    wall_s: float               # the whole run, including compilation and warm-up epochs
    extra: dict = field(default_factory=dict)

    @property
    def stats(self) -> Stats:
        return Stats.of(self.epoch_ms)

    @property
    def note(self) -> str | None:
        if self.timed_batches < self.batches_per_epoch:
            return (f"{self.label}: {self.timed_batches} of {self.batches_per_epoch} batches per epoch timed, "
                    f"epoch time scaled up")
        return None


@dataclass(frozen=True)
class PipelineRecipe:
    batch_size: int = 512
    lr: float = 8e-3              # OneCycle peak for AdamW (chosen on a validation split: recipe_sweep.py)
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    pct_start: float = 0.25
    augment: Augment = Augment(crop_pad=2, pad_mode="reflect", flip="alternate")
    compile: bool = False         # torch.compile the model
    cuda_graph: bool = True       # capture the whole step (forward, backward, AdamW) once, replay it
    bf16: bool = True
    channels_last: bool = True

    @property
    def label(self) -> str:
        parts = [p for p, on in (("compile", self.compile), ("CUDA graph", self.cuda_graph)) if on]
        return " + ".join(parts) or "eager"


def onecycle_lrs(peak: float, total_steps: int, pct_start: float) -> list[float]:
    """OneCycle's per-step learning rates, read off PyTorch's own scheduler on a throwaway optimizer."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak, total_steps=total_steps, pct_start=pct_start,
                                                cycle_momentum=False)
    lrs = []
    for i in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        if i + 1 < total_steps:
            opt.step()
            sched.step()
    return lrs


def host_arrays(split) -> tuple[np.ndarray, np.ndarray]:
    """What a tutorial loop starts from: normalized float32 NCHW images in host memory."""
    mean = np.asarray(CIFAR10_MEAN, np.float32)[None, :, None, None]
    std = np.asarray(CIFAR10_STD, np.float32)[None, :, None, None]
    images = split.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return np.ascontiguousarray((images - mean) / std), split.labels.astype(np.int64)


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device,
             batch_size: int = 1000, bf16: bool = False, channels_last: bool = False) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        correct += (logits.argmax(1).cpu() == torch.from_numpy(labels[i:i + batch_size])).sum().item()
    model.train()
    return correct / len(labels)


def train_naive(model: nn.Module, train, test, device: torch.device | str, epochs: int, batch_size: int = 32,
                lr: float = 1e-3, max_batches: int | None = None, seed: int = 0, label: str = "naive",
                eval_epochs: set[int] = frozenset()) -> TrainRun:
    """The tutorial loop: shuffle indices on the host, copy each batch from NumPy to the device, fp32, eager.
    With `max_batches`, each epoch runs only that many batches and its time is scaled to a full epoch.
    Test accuracy is also taken (untimed) after each epoch number in `eval_epochs`."""
    device = torch.device(device)
    started = time.perf_counter()
    x_train, y_train = host_arrays(train)
    x_test, y_test = host_arrays(test)
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    full = -(-len(y_train) // batch_size)
    timed = min(full, max_batches) if max_batches else full
    epoch_ms, accuracy_at = [], {}
    for epoch in range(epochs):
        order = rng.permutation(len(y_train))
        with DeviceTimer(device) as timer:
            for step in range(timed):
                idx = order[step * batch_size:(step + 1) * batch_size]
                x = torch.from_numpy(x_train[idx]).to(device)
                y = torch.from_numpy(y_train[idx]).to(device)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        epoch_ms.append(timer.ms * full / timed)
        log.info("  %s epoch %d/%d: %.0f ms (loss %.3f)", label, epoch + 1, epochs, epoch_ms[-1], loss.item())
        if epoch + 1 in eval_epochs and epoch + 1 < epochs:
            accuracy_at[epoch + 1] = evaluate(model, x_test, y_test, device)
    accuracy_at[epochs] = evaluate(model, x_test, y_test, device)
    return TrainRun(label, epoch_ms, accuracy_at[epochs], epochs, batch_size, full, timed,
                    time.perf_counter() - started, {"accuracy_at": accuracy_at})


class GraphedStep:
    """The whole training step captured once as a CUDA graph: each step is then three tiny copies (batch,
    labels, learning rate) and one graph launch, so the host no longer paces the GPU. Follows PyTorch's
    whole-network capture recipe: warm up on a side stream, capture, then undo the warm-up's updates in place
    (the graph keeps the addresses of weights and optimizer state)."""

    def __init__(self, step_fn, model: nn.Module, opt, lr: torch.Tensor, example: tuple[torch.Tensor, torch.Tensor]):
        self.x, self.y = example[0].clone(), example[1].clone()
        self.lr = lr
        snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        lr.zero_()  # warm-up steps change no weight (lr 0); BN statistics and moments are reset below
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    opt.zero_grad(set_to_none=True)
                    step_fn(self.x, self.y)
            torch.cuda.current_stream().wait_stream(side)
            opt.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = step_fn(self.x, self.y)
        finally:  # also when capture fails: the eager fallback must start from the same model
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    v.copy_(snapshot[k])
                for state in opt.state.values():
                    for value in state.values():
                        if torch.is_tensor(value):
                            value.zero_()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.y.copy_(y)
        self.lr.copy_(lr)
        self.graph.replay()
        return self.loss


def train_pipeline(model: nn.Module, train, test, device: torch.device | str, epochs: int,
                   recipe: PipelineRecipe = PipelineRecipe(), seed: int = 0, label: str = "pipeline") -> TrainRun:
    """Our GPU-resident pipeline. One-off costs (torch.compile, graph capture) fall in the first epoch or
    before it; the median over epochs is the steady state, and wall_s/extra keep the one-off cost visible."""
    device = torch.device(device)
    started = time.perf_counter()
    torch.manual_seed(seed)
    on_gpu = device.type == "cuda"
    bf16 = recipe.bf16 and on_gpu
    use_graph = recipe.cuda_graph and on_gpu
    memory_format = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    torch.backends.cudnn.benchmark = on_gpu  # fastest conv algorithms, picked before any capture
    loader = GpuLoader(train, recipe.batch_size, device, augment=recipe.augment, shuffle=True, drop_last=True,
                       dtype=torch.bfloat16 if bf16 else torch.float32, channels_last=recipe.channels_last,
                       seed=seed)
    lrs = onecycle_lrs(recipe.lr, epochs * len(loader), recipe.pct_start)
    lr_schedule = torch.tensor(lrs, device=device)
    # A graph reads the learning rate from a device tensor (capturable AdamW); eager steps take a float.
    lr_now = torch.zeros((), device=device) if use_graph else lrs[0]
    if use_graph:
        impl = {"capturable": True, "foreach": True}
    else:
        impl = {"fused": True} if on_gpu else {}
    opt = torch.optim.AdamW(model.parameters(), lr=lr_now, weight_decay=recipe.weight_decay, **impl)
    if use_graph:
        lr_now = opt.param_groups[0]["lr"]  # the very tensor the captured AdamW step reads
    forward = torch.compile(model) if recipe.compile else model

    def loss_backward_step(x, y):
        # Autocast's weight-cast cache must be off under graph capture.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not use_graph):
            loss = F.cross_entropy(forward(x).float(), y, label_smoothing=recipe.label_smoothing)
        loss.backward()
        opt.step()
        return loss.detach()

    graphed = None
    if use_graph:
        try:
            images, labels = loader.prepare_epoch()
            graphed = GraphedStep(loss_backward_step, model, opt, lr_now,
                                  (images[:recipe.batch_size], labels[:recipe.batch_size]))
        except Exception as exc:  # a model the graph cannot hold: say so and run eagerly
            graph_error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("CUDA graph capture failed (%s); running eagerly", graph_error)
            run = train_pipeline(model, train, test, device, epochs,
                                 replace(recipe, cuda_graph=False), seed, label)
            run.extra["graph_error"] = graph_error
            return run
    setup_s = time.perf_counter() - started

    epoch_ms, step = [], 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        with DeviceTimer(device) as timer:
            for x, y in loader:
                if graphed is not None:
                    loss = graphed(x, y, lr_schedule[step])
                else:
                    for group in opt.param_groups:
                        group["lr"] = lrs[step]
                    opt.zero_grad(set_to_none=True)
                    loss = loss_backward_step(x, y)
                step += 1
        epoch_ms.append(timer.ms)
        log.info("  %s epoch %d/%d: %.1f ms (loss %.3f)", label, epoch + 1, epochs, timer.ms, loss.item())
    synchronize(device)
    x_test, y_test = host_arrays(test)
    accuracy = evaluate(model, x_test, y_test, device, bf16=bf16, channels_last=recipe.channels_last)
    ran = replace(recipe, cuda_graph=graphed is not None)
    extra = {"first_epoch_ms": epoch_ms[0], "setup_s": round(setup_s, 2), "variant": ran.label,
             "compiled": recipe.compile, "cuda_graph": graphed is not None, "bf16": bf16,
             "augment": str(recipe.augment), "lr": recipe.lr, "label_smoothing": recipe.label_smoothing}
    return TrainRun(label, epoch_ms, accuracy, epochs, recipe.batch_size, len(loader), len(loader),
                    time.perf_counter() - started, extra)


def fresh(model: nn.Module) -> nn.Module:
    """An independent copy with the same initial weights, so every side starts from the same point."""
    return copy.deepcopy(model)
