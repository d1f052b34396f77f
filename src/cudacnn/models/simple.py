"""The Keras tutorial CNN: three 3x3 valid convs (32, 64, 64) with 2x2 max-pools between, dense 64, dense N.
122,570 parameters for 10 classes at 32x32; the first dense layer's width follows the image size."""

from __future__ import annotations

import torch.nn as nn

from cudacnn.errors import ConfigError
from cudacnn.models.registry import register_model


def feature_side(image_size: int) -> int:
    """The side of the last conv's output: 32 -> 30 -> 15 -> 13 -> 6 -> 4."""
    return ((image_size - 2) // 2 - 2) // 2 - 2


class SimpleCNN(nn.Sequential):
    def __init__(self, num_classes: int = 10, image_size: int = 32):
        side = feature_side(image_size)
        if side < 1:
            raise ConfigError(f"model 'simple' needs images of at least 18x18 pixels, got --image-size {image_size}")
        super().__init__(
            nn.Conv2d(3, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),    # 32 -> 30 -> 15
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),   # 15 -> 13 -> 6
            nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True),                    # 6 -> 4
            nn.Flatten(),
            nn.Linear(64 * side * side, 64), nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )


@register_model("simple")
def simple(num_classes: int = 10, image_size: int = 32) -> nn.Module:
    return SimpleCNN(num_classes, image_size)
