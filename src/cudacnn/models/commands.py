"""`cudacnn models`: every registered model with what it is, the presets that train it, its parameter count and
FLOPs per 32x32 image."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from cudacnn.models.registry import create_model, list_models

# Variants worth listing besides each model's defaults.
EXTRA_VARIANTS = {"resnet18": [{"stem": "imagenet"}]}
# One line per listed variant (its label in the table)
DESCRIPTIONS = {
    "simple": "the Keras tutorial CNN: three 3x3 convs (32, 64, 64), max-pools, dense 64",
    "bn_dropout": "the Keras CNN with BatchNorm and Dropout: two conv blocks, dense head",
    "smallnet": "three stages of two Conv-BN-ReLU blocks (64, 128, 256), global pool, dropout",
    "resnet18": "ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no pool)",
    "resnet18 stem=imagenet": "ResNet-18 with the ImageNet stem: takes torchvision ImageNet weights (--pretrained)",
    "fast94": "record-speed net after airbench94 (widths 64/256/256)",
    "fast96": "record-speed net after airbench96 (widths 128/512/512)",
}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: torch.nn.Module, image_size: int = 32) -> int:
    """FLOPs of one forward pass on a 1x3xSxS input (convs and matmuls, 2 FLOPs per multiply-add); a model on
    the meta device is counted from shapes alone."""
    from torch.utils.flop_counter import FlopCounterMode  # heavy: only `cudacnn models` needs it
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    model.train(was_training)
    return counter.get_total_flops()


def variant_label(name: str, kwargs: dict) -> str:
    return name + "".join(f" {k}={v}" for k, v in kwargs.items())


def presets_by_variant() -> dict[str, list[str]]:
    """Which listed variant each preset trains: the one with the most of the preset's model keywords."""
    from cudacnn.train.presets import PRESETS

    found: dict[str, list[str]] = {}
    for preset, recipe in PRESETS.items():
        name, given = recipe["config"].get("model", "smallnet"), recipe["config"].get("model_kwargs", {})
        variants = [v for v in [{}] + EXTRA_VARIANTS.get(name, []) if v.items() <= given.items()]
        found.setdefault(variant_label(name, max(variants, key=len)), []).append(preset)
    return found


def model_rows(num_classes: int = 10) -> list[tuple[str, str, str, int, int]]:
    """(label, description, presets, parameters, FLOPs) per listed variant."""
    presets = presets_by_variant()
    rows = []
    for name in list_models():
        for kwargs in [{}] + EXTRA_VARIANTS.get(name, []):
            model = create_model(name, num_classes=num_classes, **kwargs)
            label = variant_label(name, kwargs)
            rows.append((label, DESCRIPTIONS.get(label, ""), ", ".join(presets.get(label, [])) or "-",
                         count_parameters(model), count_flops(model)))
    return rows


def add_commands(subparsers) -> None:
    cmd = subparsers.add_parser("models", help="list the model zoo: what each is, the presets that train it, "
                                "parameters and FLOPs per image")
    cmd.add_argument("--num-classes", type=int, default=10, help="head size to count with (default 10)")
    cmd.set_defaults(func=run_models)


def run_models(args) -> int:
    table = Table(title="cudacnn models (FLOPs per 32x32 image)")
    table.add_column("model", no_wrap=True)
    table.add_column("description", ratio=3)  # the long columns wrap in a narrow terminal, the numbers do not
    table.add_column("presets", no_wrap=True)
    table.add_column("parameters", no_wrap=True, justify="right")
    table.add_column("MFLOPs/image", justify="right")
    for label, about, presets, params, flops in model_rows(args.num_classes):
        table.add_row(label, about, presets.replace(", ", "\n"), f"{params:,}", f"{flops / 1e6:,.1f}")
    Console().print(table)
    return 0
