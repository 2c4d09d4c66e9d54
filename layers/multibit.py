"""Vertical-layered multi-bit weights (Wu, He, Tan, Qi, Huang, "Vertical Layering of Quantized Neural
Networks for Heterogeneous Inference", TPAMI 2023, arXiv 2212.05326): one latent weight W from which
the 8-, 4-, 2-bit, ternary and binary weights are obtained by cascade down-sampling of the 8-bit code.

Only the abstract of the paper could be read (``docs/multibit_notes.md``: sources, and every choice
below marked [I] for inferred). What the abstract fixes [V]: the weights are "a group of bits
organized from the most significant bit (the basic layer) to less significant bits (enhance
layers)"; a lower-precision network is obtained from the adjacent higher one by cascade
down-sampling, "every bit dropped along the down-sampling process acts as an enhance layer", and the
lowest width is the basic layer. Hence the lower code is the higher code with its low bits dropped.

Formulas (per tensor; ``per_channel=True`` computes S per output channel instead):

    S      = max |W|                                   (detached; a constant for backward)   [I]
    u_8    = round((W / S + 1) / 2 * 255)  in [0, 255]  the unsigned 8-bit code               [I]
    u_4    = floor(u_8 / 2^4),  u_2 = floor(u_4 / 2^2),  u_1 = floor(u_2 / 2)  (bits dropped)   [V]
    c_b    = 2 u_b - (2^b - 1)  odd, in [-(2^b - 1), 2^b - 1]    (binary: c_1 = +-1)
    t      = sign(c_k) * 1[|c_k| >= tau_k]  in {-1, 0, +1}  (the ternary code, k = ternary_from)  [I]
             k = 2: tau_2 = 3, the 2-bit code's outer levels (nonzero where |W| >= S / 2)
             k = 4: tau_4 = 5, the 4-bit code's levels from 5 on (nonzero where |W| >~ S / 4)
    W_b    = a_b * c_b                                  the b-bit weight: scale_b * code_b, with
    a_b    = <W, c_b> / <c_b, c_b>     (scale="fit", default: the least-squares scale of the code)  [I]
    a_b    = S / (2^b - 1)             (scale="range": the grid's own step; ternary: S)          [I]

The b-bit code is the b most significant bits of the 8-bit code, so c_b = 2 c_{b-1} + (2 e_b - 1)
with e_b the dropped (enhance) bit: every width is the basic layer plus its enhance bits. The
levels are mid-rise (DoReFa / Any-Precision style: u maps to 2u/(2^b-1) - 1 in [-1, 1]), which is
what makes bit dropping symmetric: dropping a bit halves the code and adds -+1/2, no bias toward a
sign. Ternary is not a bit width of this ladder; it is cut from a higher code by zeroing its inner
levels, and sign(t) = c_1 wherever t is nonzero (the binary code is the ternary code's sign where
it has one). ``ternary_from=2`` (the option's default, the rule of every run before it existed)
cuts it from the 2-bit code (+-1 -> 0, +-3 -> +-1): the codes nest c_8 -> c_4 -> c_2 -> {t, c_1}.
With S the max over a whole layer that zero set is most of the layer: |W| < S / 2 is 83-96 % of
mnist_bnn's trained weights, where TWN's threshold 0.7 mean|W| zeroes 37-38 %; the ternary
network is then the odd one out (its gradient about 3-5x as long as the 8-bit width's, cosine
0.2-0.4 with it) and the summed loss leans on it. ``ternary_from=4`` (configs/quant/multibit.yaml) cuts it
from the 4-bit code at |c_4| >= 5 (zero where |W| <~ S / 4, 39-56 % of those weights kept; TWN's
threshold 0.7 mean|W| is 0.15-0.21 S there, between the 4-bit cuts 3 and 5): c_8 -> c_4 ->
{t, c_2 -> c_1}. Measured (benchmarks/ACCURACY.md): better for the ternary network trained alone
and for the multi-bit model at every width; the cut at 3 gave the same mean validation and a
stronger one-width ternary model [I: the paper's ternary is unknown].

The scale. The vertical layers are the codes' bits; each width's scale is one float per layer
(per channel) stored beside them. With the grid's own step (scale="range", W_ternary = W_2 where t
!= 0) the widths' weights differ in magnitude by up to max|W| / mean|W| (binary: S sign(W)), and
the BatchNorm statistics the widths share (running means and variances, updated by every width's
forward) then fit none of them: on Fashion-MNIST the 8-bit network scored below the 2-bit one. The
default (scale="fit") gives each code its least-squares scale, so every width approximates W
itself (binary: BWN's mean|W|; ternary: TWN's mean of the kept |W|) and the shared statistics fit
all widths; the codes, and so the vertical layering, are the same [I: the paper's scales unknown].

Backward: straight-through (the estimator, ``identity`` by default) from W_b to W for every width,
S a constant [I: the paper's "once QAT" with STE, as DoReFa/Any-Precision]. The active width is a
plain attribute of the quantizer (``width``), set for a whole model by ``qat.multibit.set_bits`` or
the ``qat.multibit.bits`` context; training with the losses of several widths is
``qat.train.multibit``.
"""
from __future__ import annotations

import torch

from .options import Option
from .quantizers import ProjectedWeight, per_channel

#: the widths a multi-bit layer provides, widest first; "ternary" is the 3-level {-1, 0, +1} code
WIDTHS: tuple = (8, 4, 2, "ternary", 1)
TERNARY = "ternary"
#: stored bits per weight of each width (ternary: 2, as TWN)
STORED_BITS = {8: 8, 4: 4, 2: 2, TERNARY: 2, 1: 1}
#: the ternary code's cut: nonzero where |c_k| >= TERNARY_CUT[k], k the code it is cut from (ternary_from)
TERNARY_CUT = {2: 3, 4: 5}


def parse_width(value) -> int | str:
    """A width as configs write it (8, 4, 2, 1 or "ternary"), or ValueError saying what is valid."""
    if isinstance(value, str) and value.strip().lower() == TERNARY:
        return TERNARY
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value in STORED_BITS:
        return value
    raise ValueError(f"unknown multi-bit width {value!r}; valid widths: 8, 4, 2, ternary, 1 "
                     f"(ternary is written 'ternary', not 1.58)")


def width_label(width) -> str:
    """'8b', '4b', '2b', 'ternary', '1b': the suffix of per-width metrics (val/acc1@4b)."""
    width = parse_width(width)
    return TERNARY if width == TERNARY else f"{width}b"


def unsigned_code8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """u_8 = round((W / S + 1) / 2 * 255), clamped to [0, 255] (S = 0 gives the middle, 127 or 128)."""
    normalized = w / scale.clamp(min=torch.finfo(w.dtype).tiny)
    return torch.round((normalized + 1.0) * 127.5).clamp_(0, 255)


def drop_bits(u: torch.Tensor, from_bits: int, to_bits: int) -> torch.Tensor:
    """The ``to_bits`` most significant bits of the unsigned ``from_bits`` code: floor(u / 2^(from - to))."""
    return torch.floor(u / 2 ** (from_bits - to_bits))


def signed_code(u: torch.Tensor, bits: int) -> torch.Tensor:
    """c_b = 2 u_b - (2^b - 1): the odd, zero-free, symmetric code of u_b."""
    return 2.0 * u - (2 ** bits - 1)


def cascade_codes(w: torch.Tensor, scale: torch.Tensor, ternary_from: int = 2) -> dict:
    """{width: signed code} for every width, each derived from the previous one (8 -> 4 -> 2 -> 1), the
    ternary code cut from the ``ternary_from``-bit code: sign(c_k) * 1[|c_k| >= TERNARY_CUT[k]]."""
    u8 = unsigned_code8(w, scale)
    u4 = drop_bits(u8, 8, 4)
    u2 = drop_bits(u4, 4, 2)
    u1 = drop_bits(u2, 2, 1)
    codes = {8: signed_code(u8, 8), 4: signed_code(u4, 4), 2: signed_code(u2, 2), 1: signed_code(u1, 1)}
    source = codes[ternary_from]
    codes[TERNARY] = torch.sign(source) * (source.abs() >= TERNARY_CUT[ternary_from]).to(w.dtype)
    return codes


def code_scale(scale: torch.Tensor, width) -> torch.Tensor:
    """scale_b = S / (2^b - 1) (ternary: S, the 2-bit outer level S * 3 / 3)."""
    return scale if width == TERNARY else scale / (2 ** width - 1)


class MultiBitWeight(ProjectedWeight):
    """Vertical-layered multi-bit weights: W_b = scale_b * code_b at the active ``width`` (module
    docstring). ``bits`` (the stored bits of the active width) and ``packed_format`` follow it."""

    bits = 8  # the stored precision of the full code; an instance follows its active width
    options = (Option("per_channel", bool, False, "S and a_b per output channel instead of per layer"),
               Option("scale", str, "fit", "a_b: the code's least-squares scale (fit) or the grid step (range)",
                      choices=("fit", "range")),
               Option("ternary_from", int, 2, "the code the ternary one is cut from: 2 (|c_2| = 3, |W| >= S / 2) "
                      "or 4 (|c_4| >= 5, |W| >~ S / 4)", choices=(2, 4)))

    def __init__(self, estimator, **options):
        super().__init__(estimator, **options)
        self.set_width(8)

    def set_width(self, width) -> None:
        self.width = parse_width(width)
        self.bits = STORED_BITS[self.width]

    @property
    def packed_format(self) -> str:
        """The packed export's code: binary and ternary use the +-1 / {-1, 0, +1} kernels, 8/4/2 bits
        are stored as unsigned b-bit integers (``qat.export.packed``)."""
        if self.width == 1:
            return "binary"
        return TERNARY if self.width == TERNARY else f"int{self.width}"

    def range_scale(self, w: torch.Tensor) -> torch.Tensor:
        """S: max|W| (a 0-d tensor), or max|W_c| shaped [C_out, 1, ...] with ``per_channel``."""
        magnitude = w.detach().abs()
        return per_channel(torch.amax, magnitude) if self.per_channel else magnitude.amax()

    @torch.no_grad()
    def codes(self, w: torch.Tensor, width=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(code_b, scale_b) at ``width`` (default: the active one), code_b shaped like W, scale_b
        shaped [C_out] (per channel) or [1]: W_b = scale_b * code_b exactly."""
        width = self.width if width is None else parse_width(width)
        code, scale = self._code_and_scale(w, width)
        return code, scale.reshape(-1)

    def _code_and_scale(self, w: torch.Tensor, width) -> tuple[torch.Tensor, torch.Tensor]:
        w = w.detach()
        grid = self.range_scale(w)
        code = cascade_codes(w, grid, self.ternary_from)[width]
        if self.scale == "range":
            return code, code_scale(grid, width)
        reduce = (lambda t: per_channel(torch.sum, t)) if self.per_channel else torch.sum
        return code, reduce(w * code) / reduce(code * code).clamp(min=1)

    def project(self, w: torch.Tensor) -> torch.Tensor:
        code, scale = self._code_and_scale(w, self.width)
        return code * scale

    def extra_repr(self):
        return (f"width={self.width}, per_channel={self.per_channel}, scale={self.scale}, "
                f"ternary_from={self.ternary_from}")
