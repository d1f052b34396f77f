"""`cudacnn models`: every registered model with its parameter count and FLOPs per 32x32 image."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from cudacnn.models.registry import create_model, list_models

# Variants worth listing besides each model's defaults.
EXTRA_VARIANTS = {"resnet18": [{"stem": "imagenet"}]}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: torch.nn.Module, image_size: int = 32) -> int:
    """FLOPs of one forward pass on a 1x3xSxS input (convs and matmuls, 2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode  # heavy: only `cudacnn models` needs it
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    model.train(was_training)
    return counter.get_total_flops()


def model_rows(num_classes: int = 10) -> list[tuple[str, int, int]]:
    rows = []
    for name in list_models():
        for kwargs in [{}] + EXTRA_VARIANTS.get(name, []):
            model = create_model(name, num_classes=num_classes, **kwargs)
            label = name + "".join(f" {k}={v}" for k, v in kwargs.items())
            rows.append((label, count_parameters(model), count_flops(model)))
    return rows


def add_commands(subparsers) -> None:
    cmd = subparsers.add_parser("models", help="list the model zoo: parameters and FLOPs per image")
    cmd.add_argument("--num-classes", type=int, default=10, help="head size to count with (default 10)")
    cmd.set_defaults(func=run_models)


def run_models(args) -> int:
    table = Table("model", "parameters", "MFLOPs / image (32x32)", title="cudacnn models")
    for label, params, flops in model_rows(args.num_classes):
        table.add_row(label, f"{params:,}", f"{flops / 1e6:,.1f}")
    Console().print(table)
    return 0
