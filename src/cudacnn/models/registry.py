"""Model registry (timm style): families register factories by name; `create_model` builds them."""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn as nn

from cudacnn.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: `@register_model("simple")` on a factory `fn(num_classes=10, **kwargs) -> nn.Module`."""

    def decorate(factory: Callable[..., nn.Module]):
        if name in _MODELS and _MODELS[name] is not factory:
            raise ValueError(f"model '{name}' is registered twice")
        _MODELS[name] = factory
        return factory

    return decorate


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    if name not in _MODELS:
        raise ConfigError(f"unknown model '{name}'; choose one of: {', '.join(list_models())}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    try:
        return _MODELS[name](num_classes=num_classes, **kwargs)
    except TypeError as exc:  # an option this family does not take
        raise ConfigError(f"model '{name}' does not accept these options {sorted(kwargs)}: {exc}") from exc


def takes_option(name: str, option: str) -> bool:
    """Whether model `name`'s factory has a parameter `option` (e.g. image_size, for nets whose head is sized
    by the input)."""
    return name in _MODELS and option in inspect.signature(_MODELS[name]).parameters


@torch.no_grad()
def check_input_size(model: nn.Module, name: str, image_size: int) -> None:
    """A ConfigError naming the model and the size when `model` cannot run on image_size x image_size inputs."""
    was_training = model.training
    model.eval()  # BatchNorm in training mode needs more than one value per channel: no such limit here
    # On the meta device: every shape is checked and nothing is computed (a real forward of resnet18 at
    # 1024x1024 on the CPU is ~570 GFLOPs). The model's own weights stay where they are.
    meta = {name: torch.empty_like(t, device="meta")
            for name, t in [*model.named_parameters(), *model.named_buffers()]}
    try:
        torch.func.functional_call(model, meta, (torch.zeros(1, 3, image_size, image_size, device="meta"),))
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"model '{name}' cannot take {image_size}x{image_size} images ({detail}); "
                          "choose another --image-size or model") from exc
    finally:
        model.train(was_training)
