"""CIFAR-form ResNets: ResNet-18 (3x3 stem, no max-pool) and ResNet-20 (He et al. 2016, 16-32-64).

ResNet-18 uses a 1x1 conv + BN projection shortcut when the shape changes (the `downsample` layers
that `keep_fp: [downsample]` keeps float). ResNet-20 uses option A by default (stride-2 subsample and
zero-padded channels, no parameters), as in the CIFAR papers; `shortcut="B"` gives a 1x1 projection.
`bireal=True` gives every conv its own identity shortcut (Bi-Real / IR-Net ResNet-20 1w1a block):
    out = act(bn1(conv1(x)) + shortcut(x));  out = act(bn2(conv2(out)) + out)
otherwise the standard block:  out = act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x)).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qat.models.activations import make_activation


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: subsample by `stride`, zero-pad the channels up to `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs with a shortcut (see the module docstring for the two wirings)."""

    def __init__(self, in_channels, out_channels, stride, activation, shortcut="B", bireal=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = make_activation(activation, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = make_activation(activation, out_channels)
        self.bireal = bireal
        if stride == 1 and in_channels == out_channels:
            self.downsample = nn.Identity()
        elif shortcut == "A":
            self.downsample = OptionAShortcut(in_channels, out_channels, stride)
        elif shortcut == "B":
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            raise ValueError(f"unknown shortcut {shortcut!r}; valid: 'A', 'B'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x)
        if self.bireal:
            out = self.act1(self.bn1(self.conv1(x)) + identity)
            return self.act2(self.bn2(self.conv2(out)) + out)
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + identity)


class CifarResNet(nn.Module):
    """3x3 stem conv -> stages of BasicBlocks -> global average pool -> (BN1d) -> linear."""

    def __init__(self, widths, blocks_per_stage, num_classes, in_channels=3, activation="relu",
                 shortcut="B", bireal=False, bn_before_fc=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = make_activation(activation, widths[0])
        stages, channels = [], widths[0]
        for index, (width, blocks) in enumerate(zip(widths, blocks_per_stage)):
            layer = []
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                layer.append(BasicBlock(channels, width, stride, activation, shortcut, bireal))
                channels = width
            stages.append(nn.Sequential(*layer))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn_fc = nn.BatchNorm1d(channels) if bn_before_fc else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.pool(self.layers(x)).flatten(1)
        return self.fc(self.bn_fc(x))


def resnet18_cifar(num_classes=10, in_channels=3, activation="relu", bireal=False,
                   bn_before_fc=False) -> CifarResNet:
    """ResNet-18, CIFAR form: 64-128-256-512 widths, 2 blocks each, projection shortcuts."""
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels, activation,
                       "B", bireal, bn_before_fc)


def resnet20(num_classes=10, in_channels=3, activation="relu", shortcut="A", bireal=False,
             bn_before_fc=False) -> CifarResNet:
    """ResNet-20 (He et al.): 16-32-64 widths, 3 blocks each, option-A shortcuts by default."""
    return CifarResNet((16, 32, 64), (3, 3, 3), num_classes, in_channels, activation, shortcut,
                       bireal, bn_before_fc)
