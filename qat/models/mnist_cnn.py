"""The binarized-MNIST CNN of Larq's tutorial, as a float network.

conv32 3x3 -> maxpool2 -> BN -> conv64 3x3 -> maxpool2 -> BN -> conv64 3x3 -> BN -> flatten ->
linear64 -> BN -> linear10 -> BN; no biases. Larq's BatchNormalization(scale=False) has no learnable
scale (gamma fixed at 1) and Keras' momentum 0.99 / epsilon 1e-3, mirrored here as PyTorch
momentum 0.01 / eps 1e-3. `activation` goes after every hidden BN: `none` is Larq's network (the
next layer's sign quantizer is the nonlinearity); `hardtanh` leaves binary-input layers unchanged in
the forward pass (sign(hardtanh(x)) = sign(x)) and gives float-activation methods a nonlinearity.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qat.models.activations import make_activation


def batch_norm_without_scale(features: int, dims: int) -> nn.Module:
    """BN with gamma frozen at 1 and a learnable beta (Keras BatchNormalization(scale=False))."""
    bn_class = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    bn = bn_class(features, eps=1e-3, momentum=0.01)
    bn.weight.requires_grad_(False)
    return bn


class MnistCNN(nn.Module):
    def __init__(self, num_classes=10, in_channels=1, activation="none", image_size=28):
        super().__init__()
        act = lambda channels: make_activation(activation, channels)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, bias=False), nn.MaxPool2d(2),
            batch_norm_without_scale(32, 2), act(32),
            nn.Conv2d(32, 64, 3, bias=False), nn.MaxPool2d(2),
            batch_norm_without_scale(64, 2), act(64),
            nn.Conv2d(64, 64, 3, bias=False),
            batch_norm_without_scale(64, 2), act(64),
        )
        side = ((image_size - 2) // 2 - 2) // 2 - 2
        if side < 1:
            raise ValueError(f"mnist_cnn needs image_size >= 18, got {image_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 64, bias=False), batch_norm_without_scale(64, 1), act(64),
            nn.Linear(64, num_classes, bias=False), batch_norm_without_scale(num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mnist_cnn(num_classes=10, in_channels=1, activation="none", image_size=28) -> MnistCNN:
    return MnistCNN(num_classes, in_channels, activation, image_size)
