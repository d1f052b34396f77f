"""The classic Keras CIFAR-10 CNN with batch norm and dropout: two blocks of
[conv 'same', BN, ReLU, conv 'valid', ReLU, 2x2 max-pool, dropout 0.25] at 32 and 64 channels,
then dense 512 + BN + ReLU + dropout 0.5 and dense N. The 'valid' second conv of each block
(32 -> 30 -> 15 -> 13 -> 6) gives the recipe's ~1.25 M parameters at 32x32; the first dense layer's width
follows the image size."""

from __future__ import annotations

import torch.nn as nn

from cudacnn.errors import ConfigError
from cudacnn.models.registry import register_model


def conv_block(c_in: int, c_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Dropout(dropout),
    )


class BNDropoutCNN(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.25, head_dropout: float = 0.5,
                 image_size: int = 32):
        super().__init__()
        side = ((image_size - 2) // 2 - 2) // 2  # 32 -> 30 -> 15 -> 13 -> 6
        if side < 1:
            raise ConfigError(f"model 'bn_dropout' needs images of at least 10x10 pixels, got --image-size {image_size}")
        self.features = nn.Sequential(conv_block(3, 32, dropout), conv_block(32, 64, dropout))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Dropout(head_dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


@register_model("bn_dropout")
def bn_dropout(num_classes: int = 10, dropout: float = 0.25, head_dropout: float = 0.5,
               image_size: int = 32) -> nn.Module:
    return BNDropoutCNN(num_classes, dropout, head_dropout, image_size)
