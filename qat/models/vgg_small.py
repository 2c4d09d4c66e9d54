"""VGG-Small (LQ-Nets / IR-Net CIFAR form): 128-128-M-256-256-M-512-512-M, then one linear layer.

Per IR-Net's official code each conv is followed by (max-pool) -> BN -> activation, and the classifier
is a single linear layer 512*4*4 -> num_classes (for 32x32 inputs).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qat.models.activations import make_activation

CHANNELS = (128, 128, 256, 256, 512, 512)
POOL_AFTER = (False, True, False, True, False, True)


class VGGSmall(nn.Module):
    def __init__(self, num_classes=10, in_channels=3, activation="relu", image_size=32):
        super().__init__()
        layers, channels = [], in_channels
        for width, pool in zip(CHANNELS, POOL_AFTER, strict=False):
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=False))
            if pool:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.BatchNorm2d(width), make_activation(activation, width)]
            channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.fc = nn.Linear(channels * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def vgg_small(num_classes=10, in_channels=3, activation="relu", image_size=32) -> VGGSmall:
    return VGGSmall(num_classes, in_channels, activation, image_size)
