"""The record recipes' training run: train fast94 / fast96 from scratch, report TTA test accuracy and device time.

The timed region (device events) runs from the whitening init through the final TTA evaluation: every
epoch's on-device shuffling and augmentation, every training step, the evaluation. It excludes moving
the uint8 data set to the device, normalizing the test images, and the one-time compile warm-up.
Nothing in it waits on the host except one eigendecomposition of a 12x12 matrix before the first step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from cudacnn.data import CIFAR10_MEAN, CIFAR10_STD, Augment, Dataset, GpuLoader
from cudacnn.errors import ConfigError
from cudacnn.evaluate.tta import TTA_LEVELS, predict_tta
from cudacnn.models import create_model
from cudacnn.models.fast import FastNet
from cudacnn.timing import DeviceTimer
from cudacnn.train.fast.config import RecordConfig
from cudacnn.train.fast.filtering import LastLossFilter
from cudacnn.train.fast.lookahead import Lookahead
from cudacnn.train.fast.muon import Muon, allow_static_graphs

@dataclass
class FastResult:
    model: nn.Module
    test_acc: float
    test_acc_plain: float
    train_time_s: float  # the whole timed region: training and the TTA evaluation
    eval_time_s: float = 0.0
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    mean: tuple = CIFAR10_MEAN  # the input normalization the model was trained with (checkpoints need it)
    std: tuple = CIFAR10_STD


def resolve_config(name: str, overrides: dict) -> RecordConfig:
    from cudacnn.train.presets import PRESETS, RECORD_PRESETS

    if name not in RECORD_PRESETS:
        raise ConfigError(f"unknown record preset '{name}'; choose one of: {', '.join(RECORD_PRESETS)}")
    return PRESETS[name]["record"].replace(overrides)


# ---------------------------------------------------------------- one compiled net per preset, device, classes
# and compile mode, re-initialised in place for every run

class TrainLoss(nn.Module):
    """The training forward and its loss as one graph (one compiled, CUDA-graphed call a step, as the Hiverge
    record compiles them): the summed loss backward starts from, each example's loss (for the hard-example
    filter) and the number of correct predictions."""

    def __init__(self, model: nn.Module, label_smoothing: float):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, images: torch.Tensor, labels: torch.Tensor, whiten_bias_grad: bool = True):
        logits = self.model(images, whiten_bias_grad)
        losses = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing, reduction="none")
        return losses.sum(), losses.detach(), (logits.detach().argmax(1) == labels).sum()


@dataclass
class Prepared:
    model: FastNet       # the weights
    net: nn.Module       # the model's forward, compiled when compiling (evaluation)
    train_loss: nn.Module  # TrainLoss, compiled when compiling (training)


_PREPARED: dict[tuple, Prepared] = {}


def training_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPUs, as airbench: weights live in this dtype, and Muon renormalizes them every step, so
    bf16's 8-bit mantissa would add rounding noise as large as the late, small updates. The summed loss
    keeps fp16 gradients clear of underflow without loss scaling."""
    return torch.float16 if device.type == "cuda" else torch.float32


def prepared_model(cfg: RecordConfig, device, num_classes: int, compile: bool) -> Prepared:
    device = torch.device(device)
    mode = cfg.compile_mode if device.type == "cuda" else "default"  # CUDA graphs need a GPU
    # the fused pool kernel is a GPU speed-up; elsewhere the same math runs as PyTorch ops
    pool = cfg.pool_kernel if device.type == "cuda" else "torch"
    key = (cfg.model, cfg.activation, cfg.label_smoothing, str(device), num_classes, compile, mode, pool)
    if key not in _PREPARED:
        if compile:  # both presets' static graphs (each batch size, train and eval) share FastNet.forward's
            allow_static_graphs()  # code object: more than dynamo's default 8
        model = create_model(cfg.model, num_classes=num_classes, activation=cfg.activation)
        model = model.to(device, memory_format=torch.channels_last).to_training_dtype(training_dtype(device))
        model.use_pool_kernel(pool)
        train_loss = TrainLoss(model, cfg.label_smoothing)
        # static shapes: every batch here is full-size, and a shape-generic graph would be slower
        compiled = (lambda m: torch.compile(m, dynamic=False, mode=mode)) if compile else (lambda m: m)
        _PREPARED[key] = Prepared(model, compiled(model), compiled(train_loss))
    return _PREPARED[key]


# The fields the compiled graphs depend on (static shapes, compile mode, the net's activation and pool kernel,
# and constants inside the graphs: label smoothing, Muon's momentum and step count and how its step runs): one
# warm-up per value.
GRAPH_FIELDS = ("batch_size", "compile_mode", "keep_fraction", "muon_momentum", "ns_steps", "activation",
                "label_smoothing", "tta_fraction", "pool_kernel", "muon_step")
_WARMED: set[tuple] = set()  # warm-up keys done in this process
WARM_STEPS = 3


def warmup(name: str, dataset: Dataset, device="cuda", compile: bool = True, **overrides) -> None:
    """Compile the training and evaluation graphs once (on random labels, weights reset afterwards),
    so the timed runs measure training only. `overrides` as for train_fast; only GRAPH_FIELDS matter:
    once per preset, device and value of those, later calls return at once."""
    graph = {k: v for k, v in overrides.items() if k in GRAPH_FIELDS}
    cfg = resolve_config(name, graph)
    key = (name, str(torch.device(device)), dataset.num_classes, compile, *(getattr(cfg, k) for k in GRAPH_FIELDS))
    if key in _WARMED:
        return
    # every TTA view's graph, and three steps each with and without the whitening bias's gradient (CUDA graphs
    # are recorded on a graph's second call)
    train_fast(name, dataset, seed=12345, device=device, compile=compile, log=lambda *_: None,
               max_steps=2 * WARM_STEPS, tta_level=max(TTA_LEVELS), _warm=True, **graph)
    _WARMED.add(key)


# ---------------------------------------------------------------- optimizers and schedule

def make_optimizers(model: FastNet, cfg: RecordConfig, compile: bool = False) -> tuple[torch.optim.Optimizer, Muon]:
    """SGD-Nesterov for the biases and head, Muon for the conv filters (when `compile` and on a GPU, its update
    compiled, or its whole step one CUDA graph: cfg.muon_step)."""
    wd = cfg.wd_per_example * cfg.examples_per_step
    norm_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    groups = [dict(params=[model.whiten.bias], lr=cfg.bias_lr, weight_decay=wd / cfg.bias_lr),
              dict(params=norm_biases, lr=cfg.bias_lr, weight_decay=wd / cfg.bias_lr),
              dict(params=[model.head.weight], lr=cfg.head_lr, weight_decay=wd / cfg.head_lr)]
    on_gpu = next(model.parameters()).device.type == "cuda"
    sgd = torch.optim.SGD(groups, momentum=cfg.sgd_momentum, nesterov=True, fused=on_gpu)
    filters = [p for p in model.parameters() if p.ndim == 4 and p.requires_grad]
    graphed = compile and on_gpu and cfg.muon_step == "graphed"
    muon = Muon(filters, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True, ns_steps=cfg.ns_steps,
                compiled=compile and on_gpu and not graphed, graphed=graphed)
    for opt in (sgd, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return sgd, muon


def set_lr_scale(groups, scale: float) -> None:
    for group in groups:
        group["lr"] = group["initial_lr"] * scale


def schedule(sgd, muon, step: int, total_steps: int, whiten_steps: int) -> None:
    """A linear decay to zero at the end for all groups but the whitening bias, which decays over its own
    short span, then stays frozen."""
    set_lr_scale(sgd.param_groups[1:] + muon.param_groups, 1 - step / total_steps)
    set_lr_scale(sgd.param_groups[:1], max(0.0, 1 - step / whiten_steps))


# ---------------------------------------------------------------- the training run

def train_fast(name: str, dataset: Dataset, *, seed: int = 0, device="cuda", compile: bool = True,
               log=print, _warm: bool = False, **overrides) -> FastResult:
    """Train preset `name` ('fast94' | 'fast96') on `dataset`; `overrides` replace RecordConfig fields
    (e.g. epochs=1, max_steps=5 for a smoke run)."""
    cfg = resolve_config(name, overrides)
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if compile and not _warm:
            warmup(name, dataset, device, compile, **{k: getattr(cfg, k) for k in GRAPH_FIELDS})
    prepared = prepared_model(cfg, device, dataset.num_classes, compile)
    model, net = prepared.model, prepared.net
    torch.manual_seed(seed)
    model.reset(cfg.head_init)
    train, test_images, test_labels = make_loaders(cfg, dataset, device, seed, random_labels=_warm)
    optimizers = make_optimizers(model, cfg, compile=compile)
    hard = LastLossFilter(len(dataset.train), cfg.examples_per_step, device) if cfg.keep_fraction < 1 else None

    timer = DeviceTimer(device)
    timer.start()
    # a strided sample: image-folder sources store the training set sorted by class
    stride = max(1, len(train.images) // cfg.whiten_images)
    model.init_whiten(train.normalize(train.images[::stride][: cfg.whiten_images]))
    whiten_steps = WARM_STEPS if _warm else cfg.whiten_bias_steps(len(train))
    history = train_steps(cfg, model, prepared.train_loss, train, optimizers, hard, whiten_steps)
    timer.stop()
    timer.start()  # the evaluation is timed too, as its own span
    model.eval()
    tta_acc = accuracy(predict_tta(channels_last_input(net), test_images, cfg.tta_level, fraction=cfg.tta_fraction),
                       test_labels)
    timer.stop()

    plain_acc = accuracy(predict_tta(channels_last_input(net), test_images, 0), test_labels)
    train_seconds, eval_seconds = timer.span_seconds()
    seconds = train_seconds + eval_seconds
    for row in history:
        row["train_loss"], row["train_acc"] = float(row["train_loss"]), float(row["train_acc"])
    result = FastResult(model=copy.deepcopy(model).eval(), test_acc=float(tta_acc), test_acc_plain=float(plain_acc),
                        train_time_s=seconds, eval_time_s=eval_seconds, history=history,
                        config=dict(asdict(cfg), seed=seed), mean=CIFAR10_MEAN, std=CIFAR10_STD)
    if not _warm:
        log(f"{name} seed {seed}: tta acc {result.test_acc:.4f} (plain {result.test_acc_plain:.4f}) "
            f"in {seconds:.3f} s ({eval_seconds:.3f} s of it evaluating), {history[-1]['step']} steps")
    return result


def make_loaders(cfg: RecordConfig, dataset: Dataset, device: torch.device, seed: int, random_labels: bool = False):
    """(training loader, normalized test images, test labels). The input normalization is CIFAR-10's whatever
    the source, as airbench's. `random_labels`: the compile warm-up must not learn anything that could leak
    into timed runs."""
    dtype = training_dtype(device)
    norm = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD)
    augment = Augment(crop_pad=cfg.crop_pad, flip="alternate", cutout=cfg.cutout, brightness=cfg.brightness,
                      contrast=cfg.contrast)
    train = GpuLoader(dataset.train, cfg.batch_size, device, augment=augment, shuffle=True, drop_last=True,
                      dtype=dtype, seed=seed, **norm)
    if len(train) == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} exceeds the {len(dataset.train)} training images")
    if random_labels:
        train.labels = torch.randint(0, dataset.num_classes, train.labels.shape, device=device)
    test_images, test_labels = GpuLoader(dataset.test, 2000, device, dtype=dtype, **norm).prepare_epoch()
    return train, test_images, test_labels


def train_steps(cfg: RecordConfig, model: FastNet, train_loss: nn.Module, train: GpuLoader, optimizers,
                hard: LastLossFilter | None, whiten_steps: int) -> list[dict]:
    """Every training step of the run, each on the `hard` filter's part of its batch if there is one, the
    whitening bias learning for the first `whiten_steps`; returns one history row per epoch (loss and
    accuracy as device tensors: reading them would wait on the device)."""
    device = next(model.parameters()).device
    sgd, muon = optimizers
    steps_per_epoch = len(train)
    total_steps = cfg.total_steps(steps_per_epoch)
    lookahead = Lookahead.of_model(model) if cfg.lookahead_every else None  # slow copy after the init

    history, step = [], 0
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for images, labels, indices in train.indexed_batches():
            if step >= total_steps:
                break
            schedule(sgd, muon, step, total_steps, whiten_steps)
            if hard:
                keep = hard.select(indices)
                images, labels, indices = images[keep], labels[keep], indices[keep]
            # the bias's lr is zero from whiten_steps on: its gradient would go unused
            loss, losses, step_correct = train_loss(images, labels, step < whiten_steps)
            if hard:
                hard.record(indices, losses)
            loss.backward()
            for opt in (sgd, muon):
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            if lookahead and step % cfg.lookahead_every == 0:
                # no averaging early on, growing to an EMA over the last few hundred steps
                lookahead.update(decay=(0.95 ** cfg.lookahead_every) * (step / total_steps) ** 3)
            loss_sum += loss.detach().float()
            correct += step_correct
            seen += len(labels)
        history.append(dict(epoch=epoch + 1, step=step, lr_scale=1 - step / total_steps,
                            train_loss=loss_sum / max(seen, 1), train_acc=correct / max(seen, 1)))
    if lookahead:
        lookahead.update(decay=1.0)  # end on the slow weights
    return history


def channels_last_input(net):
    """The TTA views (mirrors, reflect-padded shifts) come in other memory layouts; the compiled net sees
    channels_last only, so evaluation reuses one graph instead of recompiling per layout. The logits are
    cloned because TTA sums several calls' outputs, and under CUDA graphs (compile_mode reduce-overhead)
    each call would overwrite the previous one's."""
    return lambda x: net(x.contiguous(memory_format=torch.channels_last)).clone()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == labels).float().mean()
