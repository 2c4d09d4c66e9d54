"""ReActNet's activation binarizer RSign (Liu et al., ECCV 2020; ``reference/algorithms.md`` §7).
RPReLU, the other generalised activation, sits between layers and lives with the models
(``qat.models``)."""
from __future__ import annotations

import torch
from torch import nn

from .quantizers import Quantizer


class RSign(Quantizer):
    """x_b = sign(x - alpha_c), with a learnable threshold alpha_c per input channel (init 0):

        forward:   sign(x - alpha_c)                       (sign(0) = +1)
        backward:  dL/dx = dL/dx_b * est'(x - alpha_c),    dL/dalpha_c = -sum_{positions in c} dL/dx

    est' is the estimator's derivative (ApproxSign in ReActNet). The channel axis is dim 1 of an
    NCHW input and the last dim of a linear layer's input. ReActNet's code writes the shift as a
    ``LearnableBias`` b added before the sign, x + b, i.e. alpha = -b; the parameter here is alpha
    as the paper writes it.
    """

    bits = 1
    needs_features = True

    def __init__(self, estimator, features: int, device=None, dtype=None, **options):
        super().__init__(estimator, **options)
        self.threshold = nn.Parameter(torch.zeros(features, device=device, dtype=dtype))

    def forward(self, x):
        shape = (1, -1, 1, 1) if x.dim() == 4 else (-1,)
        return self.estimator(x - self.threshold.view(shape))

    def diagnostics(self, weight) -> dict:
        """The mean |alpha_c|: how far the learned thresholds moved from 0."""
        return {"threshold_mean_abs": float(self.threshold.detach().abs().mean())}
