"""The activation choices shared by the model definitions.

Binary-activation networks need an activation that keeps the sign of its input: after a ReLU every
input of the next binary conv would be >= 0 and sign() would be +1 everywhere. `hardtanh` (IR-Net)
keeps the sign and matches the clipped STE; `none` is the Larq MNIST tutorial's choice (the sign
quantizer itself is the nonlinearity).
"""
from __future__ import annotations

import torch.nn as nn

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "hardtanh": lambda: nn.Hardtanh(inplace=True),
    "prelu": lambda: nn.PReLU(),
    "none": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for `name` (one of ACTIVATIONS)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]()
