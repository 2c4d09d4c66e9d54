"""FDA-BNN's noise adaptation module (NAM), Xu et al. NeurIPS 2021, §2.3, Eq. 13:

    e(t) = ReLU(t W1) W2 + a * sin(t),    W1: d x h,  W2: h x d,  h = max(1, d // k),  k = 64,

applied to row vectors t of length d, with the sine shortcut a = 0.1 (the paper's best, Tab. 4) and
no biases. Weights are initialised zero-mean (PyTorch's symmetric uniform Kaiming init), which the
paper asks for (the residual it models is zero-mean noise) without fixing a distribution.

``h = max(1, d // k)``: for d < 64 the bottleneck would otherwise be empty (a bug in BiBench's
reference). The module is built eagerly by its owner's ``__init__`` so the optimizer sees it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .fresh_state import KeepsFreshState


class NoiseAdaptation(KeepsFreshState):
    def __init__(self, features: int, reduction: int = 64, shortcut: float = 0.1, device=None, dtype=None):
        super().__init__()
        if features < 1:
            raise ValueError(f"noise adaptation needs features >= 1, got {features}")
        if reduction < 1:
            raise ValueError(f"noise adaptation reduction must be >= 1, got {reduction}")
        self.features, self.hidden, self.shortcut = features, max(1, features // reduction), float(shortcut)
        factory = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(self.hidden, features, **factory))
        self.w2 = nn.Parameter(torch.empty(features, self.hidden, **factory))
        for w in (self.w1, self.w2):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """e(t) along ``dim`` (the feature axis of length d)."""
        if t.dim() == 4 and dim == 1:
            # NCHW feature maps: the per-position MLP is a pair of 1x1 convolutions, which keeps
            # the layout contiguous (a channels-last view makes every elementwise op slow).
            hidden = F.relu(F.conv2d(t, self.w1[:, :, None, None]))
            return torch.add(F.conv2d(hidden, self.w2[:, :, None, None]), torch.sin(t), alpha=self.shortcut)
        rows = t.movedim(dim, -1)
        e = torch.add(F.linear(F.relu(F.linear(rows, self.w1)), self.w2), torch.sin(rows), alpha=self.shortcut)
        return e.movedim(-1, dim)

    def extra_repr(self) -> str:
        return f"features={self.features}, hidden={self.hidden}, shortcut={self.shortcut:g}"
