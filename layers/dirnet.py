"""DIR-Net's Information Maximized Binarization (IMB), Qin et al., IJCV 2022.

IMB is IR-Net's Libra-PB under DIR-Net's name: the abstract names "weight balance and
standardization" as the means and the weights' and activations' information and binarization
error as what it improves; the forward below is IR-Net's official code [V]. The paper's own
equations were not available (``docs/dirnet_notes.md``).

Activations: sign(x) with the estimator's backward, as in IR-Net's code (the same estimator as the
weights): the existing ``layers.quantizers.SignActivation``; nothing DIR-Net-specific is added.
"""
from __future__ import annotations

import torch

from .quantizers import Quantizer, per_channel


def balance_and_standardize(w: torch.Tensor) -> torch.Tensor:
    """w^_c = (W_c - mean(W_c)) / std(W_c - mean(W_c)) per output channel, std unbiased (torch's
    default, as IR-Net's code), differentiable: gradients flow through the mean and the std.

    A channel whose variance is 0 (constant, or a single element) keeps std = 1: its balanced
    weights are 0 and stay finite, in forward and backward (the official code gives 0/0 = NaN).
    """
    centered = w - per_channel(torch.mean, w)
    correction = 1 if w[0].numel() > 1 else 0
    var = torch.var(centered, dim=tuple(range(1, w.dim())), correction=correction, keepdim=True)
    return centered / torch.where(var > 0, var, torch.ones_like(var)).sqrt()


def power_of_two_scale(balanced: torch.Tensor) -> torch.Tensor:
    """s_c = 2^round(log2(mean|w^_c|)), shaped [C_out, 1, ...] and detached: a bit shift at inference.
    (A channel of zeros gets 2^-inf = 0.)"""
    return torch.exp2(torch.round(torch.log2(per_channel(torch.mean, balanced.detach().abs()))))


class IMBWeight(Quantizer):
    """IMB weights: balance and standardise each output channel, binarise, scale by a power of two,

        w^_c = (W_c - mean(W_c)) / std(W_c - mean(W_c)),
        Q_w(W)_c = sign(w^_c) * 2^{s_c},   s_c = round(log2(mean|w^_c|)),

    so each filter's code is balanced (zero-mean w^: maximum entropy of the +-1 code) and w^ has
    unit std (the scale is fixed; s_c is nearly always 0: for Gaussian-like filters mean|w^_c| is
    about 0.8). Backward: the estimator's derivative at w^ (DIR-Net: DTE), then through the
    standardisation to W; 2^{s_c} is a constant, as in IR-Net's code. The code is sign(w^), not
    sign(W), so ``is_plain_sign`` is False (a layer cannot rebuild it from the latent weight).
    Latent weights: scale-invariant, trained with weight decay as IR-Net does.
    """

    bits = 1

    def factors(self, w):
        """(code, scale): sign(w^) with the estimator's backward, and 2^{s_c} shaped [C_out, 1, ...]."""
        balanced = balance_and_standardize(w)
        return self.estimator(balanced), power_of_two_scale(balanced)

    def forward(self, w):
        code, scale = self.factors(w)
        return code * scale
