"""The Keras tutorial CNN: three 3x3 valid convs (32, 64, 64) with 2x2 max-pools between, dense 64, dense N.
122,570 parameters for 10 classes."""

from __future__ import annotations

import torch.nn as nn

from cudacnn.models.registry import register_model


class SimpleCNN(nn.Sequential):
    def __init__(self, num_classes: int = 10):
        super().__init__(
            nn.Conv2d(3, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),    # 32 -> 30 -> 15
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),   # 15 -> 13 -> 6
            nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True),                    # 6 -> 4
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 64), nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )


@register_model("simple")
def simple(num_classes: int = 10) -> nn.Module:
    return SimpleCNN(num_classes)
