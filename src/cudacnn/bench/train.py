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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cudacnn.bench.harness import Stats, Timer, synchronize
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
    lr: float = 4e-3              # OneCycle peak for Adam
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    pct_start: float = 0.25
    augment: Augment = Augment(crop_pad=2, pad_mode="reflect", flip="alternate")
    compile: bool = True
    bf16: bool = True
    channels_last: bool = True


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
        with Timer(device) as timer:
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


def train_pipeline(model: nn.Module, train, test, device: torch.device | str, epochs: int,
                   recipe: PipelineRecipe = PipelineRecipe(), seed: int = 0, label: str = "pipeline") -> TrainRun:
    """Our GPU-resident pipeline. The first epoch carries torch.compile's compilation; the median over
    epochs is the steady state, and wall_s/extra['first_epoch_ms'] keep the one-off cost visible."""
    device = torch.device(device)
    started = time.perf_counter()
    torch.manual_seed(seed)
    on_gpu = device.type == "cuda"
    bf16 = recipe.bf16 and on_gpu
    memory_format = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    loader = GpuLoader(train, recipe.batch_size, device, augment=recipe.augment, shuffle=True, drop_last=True,
                       dtype=torch.bfloat16 if bf16 else torch.float32, channels_last=recipe.channels_last,
                       seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                            **({"fused": True} if on_gpu else {}))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=epochs * len(loader),
                                                pct_start=recipe.pct_start)
    forward = torch.compile(model) if recipe.compile else model

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x).float(), y, label_smoothing=recipe.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss

    epoch_ms = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        with Timer(device) as timer:
            for x, y in loader:
                loss = step(x, y)
        epoch_ms.append(timer.ms)
        log.info("  %s epoch %d/%d: %.1f ms (loss %.3f)", label, epoch + 1, epochs, timer.ms, loss.item())
    synchronize(device)
    x_test, y_test = host_arrays(test)
    accuracy = evaluate(model, x_test, y_test, device, bf16=bf16, channels_last=recipe.channels_last)
    extra = {"first_epoch_ms": epoch_ms[0], "compiled": recipe.compile, "bf16": bf16,
             "augment": str(recipe.augment), "lr": recipe.lr, "label_smoothing": recipe.label_smoothing}
    return TrainRun(label, epoch_ms, accuracy, epochs, recipe.batch_size, len(loader), len(loader),
                    time.perf_counter() - started, extra)


def fresh(model: nn.Module) -> nn.Module:
    """An independent copy with the same initial weights, so every side starts from the same point."""
    return copy.deepcopy(model)
