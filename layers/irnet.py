"""IR-Net's weight binarizer, Libra Parameter Binarization (Qin et al., CVPR 2020), as its official
code computes it (``reference/algorithms.md`` §6). The activations of IR-Net are a plain sign
(``quantizers.SignActivation``) and both use the Error Decay Estimator (``estimators`` ``ede``)."""
from __future__ import annotations

import torch

from .quantizers import Quantizer, per_channel


class LibraWeight(Quantizer):
    """Libra-PB: balance and standardise each output channel's filter, binarize, scale by a power
    of two:

        W^_c = (W_c - mean(W_c)) / std(W_c)      (torch's unbiased std over the n weights of W_c)
        Q_c  = sign(W^_c) * 2^{s_c},   s_c = round(log2(mean |W^_c|))

    Centring maximises the entropy of the binary weights (balanced +-1); unit std fixes the scale.
    Gradients flow through the standardisation (autograd through mean and std, as the official
    code, which does not detach it); 2^{s_c} is detached; sign(W^) has the estimator's backward.
    At inference 2^{s_c} is a bit shift. A filter whose weights are all equal has std 0: the
    denominator is clamped at 1e-12 so W^ = 0 and sign gives +1 (the official code would divide
    by zero); a one-weight filter takes the biased std (the unbiased one divides by n - 1 = 0).
    """

    bits = 1

    @staticmethod
    def standardize(w: torch.Tensor) -> torch.Tensor:
        centred = w - per_channel(torch.mean, w)
        rows = centred.flatten(1)
        # unbiased as the official code; a one-weight filter (n = 1) has no unbiased std: use n
        std = rows.std(dim=1, correction=1 if rows.shape[1] > 1 else 0).view(-1, *([1] * (w.dim() - 1)))
        return centred / std.clamp(min=1e-12)

    def factors(self, w):
        """(code, scale): sign(W^) with the estimator's backward, and 2^{s_c} shaped [C_out, 1, ...]."""
        balanced = self.standardize(w)
        with torch.no_grad():
            scale = torch.exp2(torch.round(torch.log2(per_channel(torch.mean, balanced.abs()))))
        return self.estimator(balanced), scale

    def forward(self, w):
        code, scale = self.factors(w)
        return code * scale
