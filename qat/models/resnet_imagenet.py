"""ResNet-18, ImageNet form: torchvision's definition (7x7 stem, max-pool, 1x1 projection shortcuts)."""
from __future__ import annotations

import torch.nn as nn
import torchvision

from qat.models.activations import make_activation
from qat.modules import replace_submodule


def resnet18_imagenet(num_classes=1000, in_channels=3, activation="relu") -> nn.Module:
    """torchvision.models.resnet18 with random init.

    The stem is rebuilt when in_channels != 3, and every nn.ReLU is replaced by `activation`
    (binary-input methods need a sign-keeping activation such as hardtanh). torchvision applies
    each block's one ReLU module twice (after bn1 and after the residual add, both `planes`
    channels wide), so an activation with parameters (prelu, rprelu) is shared by the two places.
    """
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if activation != "relu":
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.ReLU):
                parent = model.get_submodule(name.rpartition(".")[0])  # the stem or a block, both have bn1
                replace_submodule(model, name, make_activation(activation, parent.bn1.num_features))
    return model
