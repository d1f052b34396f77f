"""SmallNet: three stages of two Conv-BN-ReLU blocks (64, 128, 256 channels) with a 2x2 max-pool after
each stage, global average pooling, dropout and a linear head."""

from __future__ import annotations

import torch.nn as nn

from cudacnn.models.registry import register_model


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class SmallNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (64, 128, 256), dropout: float = 0.3):
        super().__init__()
        stages, c_in = [], 3
        for width in widths:
            stages += [conv_bn_relu(c_in, width), conv_bn_relu(width, width), nn.MaxPool2d(2)]
            c_in = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.fc(self.dropout(x))


@register_model("smallnet")
def smallnet(num_classes: int = 10, widths=(64, 128, 256), dropout: float = 0.3) -> nn.Module:
    return SmallNet(num_classes, tuple(widths), dropout)
