"""DIR-Net's Information Maximized Binarization (IMB), Qin et al., IJCV 2022.

IMB is IR-Net's Libra-PB under DIR-Net's name: the abstract names "weight balance and
standardization" as its means and the weights' and activations' information and binarization
error as what it improves, which is what Libra-PB's official code computes [V]. The paper's own
equations were not available (``docs/dirnet_notes.md``), so no change to Libra-PB is made; a
verified difference would go into ``IMBWeight``.

Activations: sign(x) with the estimator's backward, as in IR-Net's code (the same estimator as the
weights, DIR-Net's DTE): the existing ``layers.quantizers.SignActivation``; nothing is added.
"""
from __future__ import annotations

from .irnet import LibraWeight


class IMBWeight(LibraWeight):
    """IMB weights: balance and standardise each output channel, binarise, scale by a power of two,

        w^_c = (W_c - mean(W_c)) / std(W_c)      (unbiased std over the n weights of W_c)
        Q_w(W)_c = sign(w^_c) * 2^{s_c},   s_c = round(log2(mean|w^_c|)),

    exactly IR-Net's ``LibraWeight`` [V official code; IMB = Libra-PB is inferred from DIR-Net's
    abstract]. Zero-mean w^ balances each filter's +-1 code (maximum entropy), unit std fixes the
    scale (s_c <= 0, and 0 for Gaussian-like filters, whose mean|w^_c| is about 0.8). Backward:
    the estimator's derivative at w^ (DIR-Net: DTE), then through the standardisation to W;
    2^{s_c} is a constant. The code is sign(w^), not sign(W), so ``is_plain_sign`` is False.
    """
