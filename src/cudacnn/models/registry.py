"""Model registry (timm style): families register factories by name; `create_model` builds them."""

from __future__ import annotations

from typing import Callable

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
