"""The record recipes: train fast94 / fast96 from scratch and report TTA test accuracy and device time.

The timed region (device events) runs from the whitening init through the final TTA evaluation: every
epoch's on-device shuffling and augmentation, every training step, the evaluation. It excludes moving
the uint8 data set to the device, normalizing the test images, and the one-time compile warm-up.
Nothing in it waits on the host except one eigendecomposition of a 12x12 matrix before the first step.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from cudacnn.data import CIFAR10_MEAN, CIFAR10_STD, Augment, Dataset, GpuLoader
from cudacnn.errors import ConfigError
from cudacnn.evaluate.tta import TTA_LEVELS, predict_tta
from cudacnn.models.fast import RESIDUALS, FastNet, fast94, fast96
from cudacnn.train.fast.filtering import LastLossFilter, ProxyFilter
from cudacnn.train.fast.lookahead import Lookahead
from cudacnn.train.fast.muon import Muon, allow_static_graphs


@dataclass(frozen=True)
class FastConfig:
    model: str
    epochs: float
    batch_size: int = 2000
    muon_lr: float = 0.24           # Muon on the conv filters
    muon_momentum: float = 0.6
    bias_lr: float = 0.053          # SGD-Nesterov on BatchNorm and whitening biases (summed loss)
    head_lr: float = 0.67           # ... and on the linear head
    sgd_momentum: float = 0.85
    wd_per_example: float = 2e-6    # decoupled from the lr: each step decays by wd_per_example * batch
    label_smoothing: float = 0.2
    whiten_bias_epochs: float = 3.0  # the whitening bias learns only this long
    whiten_images: int = 5000
    crop_pad: int = 2
    cutout: int = 0
    tta_level: int = 2
    lookahead_every: int = 0        # 0 = off; else sync every k steps, decay 0.95^k * (step/total)^3
    compile_mode: str = "default"   # torch.compile mode of the net: default | reduce-overhead | max-autotune...
    widths: str = ""                # the conv groups' widths as "A/B/C"; "" keeps the model's own
    residual: str = ""              # fast96's residual add: "after_gelu" | "before_gelu"; "" keeps the model's own
    warmup_fraction: float = 0.0    # lr ramps from 0.2x to 1x over this part of the run before its linear decay
    keep_fraction: float = 1.0      # < 1: train on the hardest part of each batch (filtering.py)
    #                                 (the logged train loss/accuracy are then the kept part's)
    rank_by: str = "proxy"          # ... ranked by a proxy net, or by each example's "last_loss" in the main net
    proxy_widths: str = "32/64/64"  # the proxy: a fast94-style net of these widths (filtering.py)
    proxy_learn_every: int = 2      # the proxy learns from every k-th batch (and ranks them all); 4 lost 0.6 points
    max_steps: int | None = None    # cut training short (smoke tests)


PRESETS = {
    # CUDA graphs (reduce-overhead): fast94's 200 steps are short enough for kernel launches to matter
    "fast94": FastConfig("fast94", epochs=8.0, compile_mode="reduce-overhead"),
    # trains on the hardest 3/4 of each batch, ranked by last loss: 0.12-0.16 points above whole batches for 28
    # epochs, in the same time (session 6); CUDA graphs, because its smaller steps leave the launches exposed
    # session 8: airbench96's wider 128/512/512 net with the residual added before the last GELU, for 32 epochs
    "fast96": FastConfig("fast96", epochs=32.0, muon_lr=0.2, crop_pad=4, cutout=12, lookahead_every=5,
                         keep_fraction=0.75, rank_by="last_loss", compile_mode="reduce-overhead"),
}
FACTORIES = {"fast94": fast94, "fast96": fast96}
RANKINGS = ("proxy", "last_loss")  # how keep_fraction < 1 picks the hard examples


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


def resolve_config(name: str, overrides: dict) -> FastConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown fast preset '{name}'; choose one of: {', '.join(PRESETS)}")
    known = set(FastConfig.__dataclass_fields__) - {"model"}
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)} for preset '{name}'; known: {sorted(known)}")
    cfg = replace(PRESETS[name], **overrides)
    parse_widths(cfg.widths)
    parse_widths(cfg.proxy_widths)
    if cfg.residual not in ("", *RESIDUALS):
        raise ConfigError(f"residual must be one of {RESIDUALS}, got {cfg.residual!r}")
    if not 0.0 <= cfg.warmup_fraction < 1.0:
        raise ConfigError(f"warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")
    if not 0.0 < cfg.keep_fraction <= 1.0:
        raise ConfigError(f"keep_fraction must be in (0, 1], got {cfg.keep_fraction}")
    if cfg.rank_by not in RANKINGS:
        raise ConfigError(f"rank_by must be one of {RANKINGS}, got {cfg.rank_by!r}")
    if cfg.proxy_learn_every < 1:
        raise ConfigError(f"proxy_learn_every must be a positive integer, got {cfg.proxy_learn_every}")
    if cfg.tta_level not in TTA_LEVELS:
        raise ConfigError(f"tta_level must be one of {TTA_LEVELS}, got {cfg.tta_level}")
    return cfg


def examples_per_step(cfg: FastConfig) -> int:
    """How many examples each optimizer step learns from: the batch, or its kept part when filtering."""
    return max(1, round(cfg.batch_size * cfg.keep_fraction))


def parse_widths(text: str) -> dict:
    """'128/384/640' -> {'widths': (128, 384, 640)} (model keyword arguments); '' -> {}."""
    if not text:
        return {}
    try:
        widths = tuple(int(w) for w in text.split("/"))
    except ValueError:
        widths = ()
    if len(widths) != 3 or min(widths) <= 0:
        raise ConfigError(f"widths must be three positive integers as A/B/C (e.g. 128/384/512), got {text!r}")
    return {"widths": widths}


# -- one compiled model per preset, device, shape and compile mode (see the key), re-initialised in place for every run

_PREPARED: dict[tuple, tuple[FastNet, nn.Module]] = {}


def training_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPUs, as airbench: weights live in this dtype, and Muon renormalizes them every step, so
    bf16's 8-bit mantissa would add rounding noise as large as the late, small updates. The summed loss
    keeps fp16 gradients clear of underflow without loss scaling."""
    return torch.float16 if device.type == "cuda" else torch.float32


def prepared_model(name: str, device, num_classes: int, compile: bool,
                   mode: str = "default", widths: str = "", role: str = "main",
                   residual: str = "") -> tuple[FastNet, nn.Module]:
    """(model, callable): the callable is the compiled model when `compile`, else the model itself.
    `role` keeps a filtering run's proxy apart from a main net of the same preset and widths."""
    device = torch.device(device)
    key = (name, str(device), num_classes, compile, mode, widths, role, residual)
    if key not in _PREPARED:
        if compile:  # both presets' static graphs (each batch size, train and eval, the filtering proxy's)
            # share FastNet.forward's code object: more than dynamo's default 8
            allow_static_graphs()
        arch = parse_widths(widths) | (dict(residual=residual) if residual else {})
        model = FACTORIES[name](num_classes=num_classes, **arch)
        model = model.to(device, memory_format=torch.channels_last)
        model.to_training_dtype(training_dtype(device))
        # static shapes: every batch here is full-size, and a shape-generic graph would be slower
        mode = mode if device.type == "cuda" else "default"  # CUDA graphs need a GPU
        _PREPARED[key] = (model, torch.compile(model, dynamic=False, mode=mode) if compile else model)
    return _PREPARED[key]


# The FastConfig fields the compiled graphs depend on (static shapes, compile mode, and Muon's momentum, a
# constant inside its compiled update): one warm-up per value.
GRAPH_FIELDS = ("batch_size", "compile_mode", "widths", "residual", "keep_fraction", "rank_by", "proxy_widths",
                "muon_momentum")
_WARMED: set[tuple] = set()  # warm-up keys done in this process


def warmup(name: str, dataset: Dataset, device="cuda", compile: bool = True, **overrides) -> None:
    """Compile the training and evaluation graphs once (on random labels, weights reset afterwards),
    so the timed runs measure training only. `overrides` as for train_fast; only GRAPH_FIELDS matter:
    once per preset, device and value of those, later calls return at once."""
    graph = {k: v for k, v in overrides.items() if k in GRAPH_FIELDS}
    cfg = resolve_config(name, graph)
    key = (name, str(torch.device(device)), dataset.num_classes, compile, *(getattr(cfg, k) for k in GRAPH_FIELDS))
    if key in _WARMED:
        return
    train_fast(name, dataset, seed=12345, device=device, compile=compile, log=lambda *_: None,
               max_steps=3, tta_level=max(TTA_LEVELS), _warm=True, **graph)  # every TTA view's graph
    _WARMED.add(key)


# -- the training run

class DeviceTimer:
    """Sums device time over start/stop pairs without waiting on the device until `span_seconds()`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []

    def start(self) -> None:
        self.spans.append([self._mark(), None])

    def stop(self) -> None:
        self.spans[-1][1] = self._mark()

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def span_seconds(self) -> list[float]:
        if not self.cuda:
            return [b - a for a, b in self.spans]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in self.spans]


def make_optimizers(model: FastNet, cfg: FastConfig, compile: bool = False) -> tuple[torch.optim.Optimizer, Muon]:
    """SGD-Nesterov for the biases and head, Muon for the conv filters (its update compiled when `compile`
    and on a GPU)."""
    wd = cfg.wd_per_example * examples_per_step(cfg)
    norm_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    groups = [dict(params=[model.whiten.bias], lr=cfg.bias_lr, weight_decay=wd / cfg.bias_lr),
              dict(params=norm_biases, lr=cfg.bias_lr, weight_decay=wd / cfg.bias_lr),
              dict(params=[model.head.weight], lr=cfg.head_lr, weight_decay=wd / cfg.head_lr)]
    on_gpu = next(model.parameters()).device.type == "cuda"
    sgd = torch.optim.SGD(groups, momentum=cfg.sgd_momentum, nesterov=True, fused=on_gpu)
    filters = [p for p in model.parameters() if p.ndim == 4 and p.requires_grad]
    muon = Muon(filters, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True, compiled=compile and on_gpu)
    for opt in (sgd, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return sgd, muon


def set_lr_scale(groups, scale: float) -> None:
    for group in groups:
        group["lr"] = group["initial_lr"] * scale


def lr_scale(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """0.2x rising to 1x over the warm-up steps (airbench96's ramp), then a linear decay to zero at the end."""
    if step < warmup_steps:
        return 0.2 + 0.8 * step / warmup_steps
    return 1 - (step - warmup_steps) / (total_steps - warmup_steps)  # without warm-up: 1 - step / total_steps


def schedule(sgd, muon, step: int, total_steps: int, whiten_steps: int, warmup_steps: int = 0) -> None:
    """The lr_scale schedule for all groups but the whitening bias, which decays over its own short span,
    then stays frozen."""
    set_lr_scale(sgd.param_groups[1:] + muon.param_groups, lr_scale(step, total_steps, warmup_steps))
    set_lr_scale(sgd.param_groups[:1], max(0.0, 1 - step / whiten_steps))


def make_proxy_filter(cfg: FastConfig, device, num_classes: int, compile: bool) -> ProxyFilter | None:
    """The proxy filter of a run (fresh proxy weights), or None unless it filters by a proxy."""
    if cfg.keep_fraction >= 1.0 or cfg.rank_by != "proxy":
        return None
    proxy, proxy_net = prepared_model("fast94", device, num_classes, compile, cfg.compile_mode, cfg.proxy_widths,
                                      role="proxy")
    proxy.reset()
    optimizers = make_optimizers(proxy, cfg, compile=compile)
    return ProxyFilter(proxy, proxy_net, optimizers, examples_per_step(cfg), cfg.label_smoothing)


def train_fast(name: str, dataset: Dataset, *, seed: int = 0, device="cuda", compile: bool = True,
               log=print, _warm: bool = False, **overrides) -> FastResult:
    """Train preset `name` ('fast94' | 'fast96') on `dataset`; `overrides` replace FastConfig fields
    (e.g. epochs=1, max_steps=5 for a smoke run)."""
    cfg = resolve_config(name, overrides)
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if compile and not _warm:
            warmup(name, dataset, device, compile, **{k: getattr(cfg, k) for k in GRAPH_FIELDS})
    dtype = training_dtype(device)
    model, net = prepared_model(name, device, dataset.num_classes, compile, cfg.compile_mode, cfg.widths,
                                residual=cfg.residual)
    torch.manual_seed(seed)
    model.reset()
    proxy = make_proxy_filter(cfg, device, dataset.num_classes, compile)  # after the main net's init
    last_loss = (LastLossFilter(len(dataset.train), examples_per_step(cfg), device)
                 if cfg.keep_fraction < 1 and cfg.rank_by == "last_loss" else None)

    augment = Augment(crop_pad=cfg.crop_pad, flip="alternate", cutout=cfg.cutout)
    norm = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD)  # fixed, as airbench: whatever the source
    train = GpuLoader(dataset.train, cfg.batch_size, device, augment=augment, shuffle=True, drop_last=True,
                      dtype=dtype, seed=seed, **norm)
    if len(train) == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} exceeds the {len(dataset.train)} training images")
    if _warm:  # random labels: the warm-up must not learn anything that could leak into timed runs
        train.labels = torch.randint(0, dataset.num_classes, train.labels.shape, device=device)
    test = GpuLoader(dataset.test, 2000, device, dtype=dtype, **norm)
    test_images, test_labels = test.prepare_epoch()

    steps_per_epoch = len(train)
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    whiten_steps = max(1, math.ceil(cfg.whiten_bias_epochs * steps_per_epoch))
    warmup_steps = min(round(cfg.warmup_fraction * total_steps), total_steps - 1)  # a short run still decays
    sgd, muon = make_optimizers(model, cfg, compile=compile)

    timer = DeviceTimer(device)
    timer.start()
    # a strided sample: image-folder sources store the training set sorted by class
    stride = max(1, len(train.images) // cfg.whiten_images)
    model.init_whiten(train.normalize(train.images[::stride][: cfg.whiten_images]))
    if proxy:  # the same patches give the same whitening filters
        proxy.model.whiten.weight.copy_(model.whiten.weight)
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
            schedule(sgd, muon, step, total_steps, whiten_steps, warmup_steps)
            if proxy:
                learn = step % cfg.proxy_learn_every == 0
                if learn:
                    schedule(*proxy.optimizers, step, total_steps, whiten_steps, warmup_steps)
                images, labels = proxy(images, labels, learn)
            elif last_loss:
                hard = last_loss.select(indices)
                images, labels, indices = images[hard], labels[hard], indices[hard]
            outputs = net(images)
            if last_loss:
                losses = F.cross_entropy(outputs, labels, label_smoothing=cfg.label_smoothing, reduction="none")
                last_loss.record(indices, losses)
                loss = losses.sum()
            else:
                loss = F.cross_entropy(outputs, labels, label_smoothing=cfg.label_smoothing, reduction="sum")
            loss.backward()
            sgd.step()
            muon.step()
            sgd.zero_grad(set_to_none=True)
            muon.zero_grad(set_to_none=True)
            step += 1
            if lookahead and step % cfg.lookahead_every == 0:
                # no averaging early on, growing to an EMA over the last few hundred steps
                lookahead.update(decay=(0.95 ** cfg.lookahead_every) * (step / total_steps) ** 3)
            loss_sum += loss.detach().float()
            correct += (outputs.detach().argmax(1) == labels).sum()
            seen += len(labels)
        history.append(dict(epoch=epoch + 1, step=step, lr_scale=lr_scale(step, total_steps, warmup_steps),
                            train_loss=loss_sum / max(seen, 1), train_acc=correct / max(seen, 1)))
    if lookahead:
        lookahead.update(decay=1.0)  # end on the slow weights
    timer.stop()
    timer.start()  # the evaluation is timed too, as its own span
    model.eval()
    tta_acc = accuracy(predict_tta(channels_last_input(net), test_images, cfg.tta_level), test_labels)
    timer.stop()

    plain_acc = accuracy(predict_tta(channels_last_input(net), test_images, 0), test_labels)
    train_seconds, eval_seconds = timer.span_seconds()
    seconds = train_seconds + eval_seconds
    for row in history:
        row["train_loss"], row["train_acc"] = float(row["train_loss"]), float(row["train_acc"])
    result = FastResult(model=copy.deepcopy(model).eval(), test_acc=float(tta_acc), test_acc_plain=float(plain_acc),
                        train_time_s=seconds, eval_time_s=eval_seconds, history=history,
                        config=dict(asdict(cfg), seed=seed), **norm)
    if not _warm:
        log(f"{name} seed {seed}: tta acc {result.test_acc:.4f} (plain {result.test_acc_plain:.4f}) "
            f"in {seconds:.3f} s ({eval_seconds:.3f} s of it evaluating), {step} steps")
    return result


def channels_last_input(net):
    """The TTA views (mirrors, reflect-padded shifts) come in other memory layouts; the compiled net sees
    channels_last only, so evaluation reuses one graph instead of recompiling per layout. The logits are
    cloned because TTA sums several calls' outputs, and under CUDA graphs (compile_mode reduce-overhead)
    each call would overwrite the previous one's."""
    return lambda x: net(x.contiguous(memory_format=torch.channels_last)).clone()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == labels).float().mean()
