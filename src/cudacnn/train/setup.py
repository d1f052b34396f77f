"""Device, seeding and the optimisation pieces the trainer builds from a config."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cudacnn.errors import ConfigError
from cudacnn.train.config import TrainConfig, is_device_name

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    """`auto`: the GPU when PyTorch sees one, else the CPU with a warning; a named GPU that is not there is a
    ConfigError saying how to run anyway."""
    if not is_device_name(name):
        raise ConfigError(f"--device {name} is not a device name; use auto, cpu, cuda or cuda:N")
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda" if name == "auto" else name)
    if name != "auto":
        raise ConfigError(f"--device {name} asked for a GPU but PyTorch sees none; use --device cpu")
    log.warning("warning: no CUDA GPU found; running on the CPU (slow)")
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """The GPU's name, or "cpu": what results record as the device that produced them."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (the usual practice; it helps BN nets).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step on the GPU instead of a foreach chain: fewer launches where the host bounds the step.
    fused = {"fused": True} if all(p.is_cuda for p in decay + no_decay) else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0, **fused)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, **fused)
    return torch.optim.AdamW(groups, lr=config.lr, **fused)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """A per-step schedule (None for a constant learning rate)."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        if total < 4:  # too few steps for a warm-up and an annealing phase: keep the peak rate
            return None
        # OneCycleLR divides by each phase's length, so the warm-up needs at least two steps.
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total,
                                                   pct_start=max(0.25, 2 / total), div_factor=25,
                                                   final_div_factor=1e3)
    if config.schedule == "cosine":
        warmup = int(config.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return None


def build_ema(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def rng_state() -> dict:
    """The RNG streams training draws from (dropout, weight init): torch's CPU and CUDA generators.
    Data order and augmentation are derived from (seed, epoch), so they need no saved state."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """The generators take their states as CPU byte tensors; a checkpoint read onto the GPU holds them there."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
