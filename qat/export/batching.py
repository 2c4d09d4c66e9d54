"""Inference in slices of the batch, to bound the activations' memory."""
from __future__ import annotations

import torch
from torch import nn


class BatchSlices(nn.Module):
    """Runs ``model`` on at most ``size`` samples at a time and concatenates the outputs along
    dim 0: the result of one call for a model whose samples do not interact (eval mode: no batch
    statistics) -- up to the float layers' rounding, which BLAS may block differently for another
    batch size -- with activations of ``size`` samples alive at once instead of the whole batch's.
    For a packed network at batch 64, where the weights are a few MiB and the float maps of the
    first layers are 16 MiB each, that is most of the peak memory."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.model, self.size = model, int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.size:
            return self.model(x)
        return torch.cat([self.model(part) for part in x.split(self.size)])
