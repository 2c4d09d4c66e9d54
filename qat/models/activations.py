"""The activation choices shared by the model definitions.

Binary-activation networks need an activation that keeps the sign of its input: after a ReLU every
input of the next binary conv would be >= 0 and sign() would be +1 everywhere. `hardtanh` (IR-Net)
keeps the sign and matches the clipped STE; `none` is the Larq MNIST tutorial's choice (the sign
quantizer itself is the nonlinearity); `rprelu` is ReActNet's learnable one (`RPReLU`).

`make_activation(name, channels)` takes the channel count of the tensor the activation is applied
to, for the activations with per-channel parameters (`rprelu`); the others ignore it. `prelu` keeps
a single slope shared by all channels (nn.PReLU's default), as it always has.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RPReLU(nn.Module):
    """ReActNet's RPReLU (Liu et al., ECCV 2020, Eq. 5), per channel c:

        f(x) = PReLU_beta_c(x - gamma_c) + zeta_c
             = x - gamma_c + zeta_c             if x > gamma_c
               beta_c (x - gamma_c) + zeta_c    otherwise

    gamma (``shift``) moves the point where the slope changes, zeta (``bias``) moves the output,
    beta (``slope``) is the negative slope. Init as the official code (`LearnableBias`, zeros,
    around `nn.PReLU(C)`, 0.25): gamma = zeta = 0, beta = 0.25, so it starts as a PReLU. The three
    are parameters of this one module (not a child nn.PReLU), so the summary shows one row.

    Works on (N, C) and (N, C, *spatial) inputs: the channel axis is moved last so that the
    per-channel vectors broadcast whatever the rank, without reading ``x.dim()`` (that keeps the
    module traceable by torch.fx, which ``qat.export`` uses to fold BatchNorms).
    """

    def __init__(self, channels: int):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"RPReLU needs a positive channel count, got {channels!r}")
        self.shift = nn.Parameter(torch.zeros(channels))         # gamma
        self.slope = nn.Parameter(torch.full((channels,), 0.25))  # beta
        self.bias = nn.Parameter(torch.zeros(channels))          # zeta

    @staticmethod
    def _add_per_channel(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (x.movedim(1, -1) + v).movedim(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_per_channel(F.prelu(self._add_per_channel(x, -self.shift), self.slope), self.bias)

    def extra_repr(self) -> str:
        return f"channels={self.shift.numel()}"


ACTIVATIONS = {
    "relu": lambda channels: nn.ReLU(inplace=True),
    "hardtanh": lambda channels: nn.Hardtanh(inplace=True),
    "prelu": lambda channels: nn.PReLU(),
    "rprelu": RPReLU,
    "none": lambda channels: nn.Identity(),
}


def make_activation(name: str, channels: int) -> nn.Module:
    """A fresh activation module for `name` (one of ACTIVATIONS) applied to `channels` channels."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name](channels)
