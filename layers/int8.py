"""8-bit weights: symmetric absmax int8 codes with one float scale per row (method ``int8``).

For the layers a binary or ternary network keeps at high precision (a language model's token and
position embeddings and its LM head, a CNN's first and last layers), stored at 8 bits instead of 32.
The quantizer is the per-row ("vector-wise") absmax quantization of LLM.int8() (Dettmers et al.
2022, section 3.1) applied to the weight, with BitNet b1.58's 8-bit rounding (``layers.bitnet``):
for each row r of W (an output channel of a Linear or Conv2d, flattened; a token's or a position's
vector of an embedding table, ``layers.embedding``)

    s_r = max(max_j |W_rj|, eps) / 127,    c_rj = Clip(round(W_rj / s_r), -128, 127),    W_q = s_r c_r,

eps = 1e-5 (BitNet's floor: an all-zero row quantizes to 0), round half-to-even (``torch.round``).
|W_rj| <= max_j |W_rj| gives |c_rj| <= 127, so the codes are symmetric and the -128 end of the clip
is never reached (kept as BitNet writes it; the stored format holds the whole int8 range anyway).
Backward: the straight-through estimator (``identity`` by default), dL/dW = dL/dW_q, s_r a constant,
as BitNet's ``w + (quant(w) - w).detach()``. The codes and steps are ``layers.bitnet.absmax_codes``
on the rows, the same float operations as BitNet's 8-bit activations (one row = one token).

Exact export: W_q is computed as ``c * s`` in the weight's dtype, one rounding per element, so a
packed model that stores the int8 codes and the float32 scales (``qat.export``: code format
``sint8``) rebuilds W_q bit for bit and computes what the trained layer computes.
"""
from __future__ import annotations

import torch

from .bitnet import absmax_codes
from .quantizers import ProjectedWeight


class AbsMaxInt8Weight(ProjectedWeight):
    """Per-row symmetric absmax int8 weights (module docstring):

        forward:   W_q = s_r * Clip(round(W / s_r), -128, 127),   s_r = max(||W_r||_inf, 1e-5) / 127
        backward:  dL/dW = dL/dW_q * est'(W)   (identity STE; s_r a constant)
    """

    bits = 8
    per_channel = True  # one scale per row
    #: the packed export stores the codes as signed 8-bit integers (``qat.export.intcodes``)
    packed_format = "sint8"

    @staticmethod
    def factors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes shaped like W, steps shaped [rows, 1, ...]): W_q = codes * steps. Not
        differentiable (the STE is ``forward``'s)."""
        w = w.detach()
        codes, steps = absmax_codes(w.reshape(w.shape[0], -1), "token")
        return codes.reshape(w.shape), steps.reshape(w.shape[0], *([1] * (w.dim() - 1)))

    def codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes shaped like W, scales [rows]): the packed export's contract (as ``MultiBitWeight.codes``)."""
        codes, steps = self.factors(w)
        return codes, steps.reshape(-1)
