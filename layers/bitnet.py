"""BitNet's quantizers: BitLinear's weights and its 8-bit activations with the normalization before them.

BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs"; the authors' "Training Tips, Code and FAQ",
whose reference code this follows) and the original BitNet (Wang et al. 2023, "BitNet: Scaling
1-bit Transformers for Large Language Models"). Both replace each ``nn.Linear`` of a transformer by
a BitLinear:

    y = W_q Q_8(norm(x)) + b,    Q_8 per-token absmax to 8 bits,  norm parameter-free (see below),

with W_q ternary absmean (b1.58, ``AbsMeanTernaryWeight``) or centred binary (BitNet,
``CenteredSignWeight``), and the straight-through estimator (identity) on weights and activations:
the reference code writes ``w + (quant(w) - w).detach()``, so no gradient reaches the scales.

8-bit activations (``AbsMaxActivation``, the FAQ code's ``activation_quant``), per token:

    step = max(||x||_inf, eps) / 127,   codes = Clip(round(x / step), -128, 127),   Q_8(x) = codes * step,

eps = 1e-5 (the code's ``clamp_(min=1e-5)``). The code writes round(x * 127 / max) and divides by
127 / max afterwards; x / step is the same up to one float rounding of the multiplier (codes can
differ only where x / step lies within an ulp of a .5 tie), and it hands a kernel one float per token.
|x| <= max gives |codes| <= 127: the -128 end of the clip is never reached (kept as written). A
token is the last dimension of a linear layer's input; for ``Conv2d`` it is the channel vector at one
spatial position (what a ViT patch or a 1x1 convolution sees): BitNet defines BitLinear only, this
extension lets the method table's every consumer (and the CNN configs) run the method.
``input_granularity="tensor"`` uses one absmax over the whole tensor instead.

The normalization before the quantizer (``input_norm``, on by default) is the FAQ code's
``x_norm = RMSNorm(x)`` for b1.58 and, for the original BitNet, the paper's LayerNorm (SubLN):

    RMSNorm(x) = x / sqrt(mean(x^2) + eps_n),    LN(x) = (x - E[x]) / sqrt(Var[x] + eps_n),

over the token's features, eps_n = 1e-5 (LLaMA's and BitNet b1.58 2B4T's RMSNorm epsilon; the
papers give none). Departure: both are parameter-free here. BitNet's norms have a learned gain
g (per feature) that the drop-in layers leave out, so that a float ``nn.Linear``'s state_dict loads
as is (the project's contract) and the layer adds no parameters. What the gain would do is not
absorbed exactly: ``W (g * n)`` equals ``(W diag(g)) n`` before quantization, but the weights are
ternarized with one per-tensor scale and the activations are absmax-quantized per token after the
gain, so a per-feature gain changes which features reach the 8-bit range and which weights round
to 0; the following weight can learn a per-column rescaling only up to that quantization. A model
that wants the gain puts an ``nn.RMSNorm`` before the layer (it stays float).

The layer computes with the integer codes, ``layers.quantized._IntegerInputOp``: for a linear layer
y = op(codes, code_W) * (step * s) + b, whose op sums integer products exactly in float32 while
|sum| < 2^24 (in_features <= 131,072), so an int8 x ternary kernel with an int32 accumulator and the
same float epilogue reproduces it bit for bit (``qat.export``'s packed layers run the same ops).
So that the whole layer, normalization included, can be reproduced in C++ (``kernels.cpu_native``'s
``TernaryI8Linear``, which packed RMSNorm and no-norm linears run), every rounding of RMSNorm is
fixed independently of torch's reduction order and math library: ``mean_square`` sums in float64,
``rms_norm`` takes a correctly rounded square root; the rest are single IEEE float operations.
"""
from __future__ import annotations

import torch

from estimators.base import sign

from .options import Option
from .quantizers import ProjectedWeight, Quantizer

#: the reference code's floor under the absmean and absmax scales (``clamp_(min=1e-5)``)
SCALE_EPS = 1e-5
#: epsilon of the parameter-free RMSNorm / LayerNorm before the activation quantizer
NORM_EPS = 1e-5
#: 8-bit absmax: the largest |x| of a token maps to this code
INPUT_LEVELS = 127
INPUT_GRANULARITIES = ("token", "tensor")


def feature_dim(x: torch.Tensor) -> int:
    """The features of a token: dim 1 of an NCHW input (one pixel's channels), else the last dim."""
    return 1 if x.dim() == 4 else -1


def mean_square(x: torch.Tensor, dim: int) -> torch.Tensor:
    """mean(x^2) over ``dim`` (kept as 1) in x's dtype: x's squares (rounded in x's dtype), summed in
    float64, divided by the count there and rounded once to x's dtype.

    Why float64: a float32 sum depends on the order of its additions, and torch's (vectorized,
    pairwise, per build and CPU) cannot be reproduced by a C++ loop, so the native kernel
    (``kernels.cpu_native``) could not compute the same codes. A float64 sum of float32 squares
    has a relative error of ~1e-16 in any order, so after the rounding to float32 every order gives
    the same value, except when the float64 sum lies within ~1e-16 (relative) of a float32 rounding
    boundary (a chance of about 1e-9 per token, not seen in the tests)."""
    return x.square().sum(dim=dim, keepdim=True, dtype=torch.float64).div(x.shape[dim]).to(x.dtype)


def rms_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps_n) over ``dim``, without a gain: the mean of squares by
    ``mean_square``, the add and the division in x's dtype, the square root correctly rounded to
    x's dtype.

    The square root is taken in float64 and rounded to x's dtype: torch's float32 ``sqrt`` is not
    correctly rounded on every build (this one's AVX2 kernel misses the IEEE result on ~20% of
    inputs, and other CPUs differ), while any float64 square root within an ulp rounds to the
    correctly rounded float32 one (the exact root of a float32 is never that close to a float32
    half-way point), which a C++ ``sqrt`` gives too; for float64 x it is torch's float64 sqrt."""
    root = torch.sqrt((mean_square(x, dim) + NORM_EPS).double()).to(x.dtype)
    return x / root


def layer_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(x - E[x]) / sqrt(Var[x] + eps_n) over ``dim`` (biased variance, as ``nn.LayerNorm``), without
    gain or bias."""
    centred = x - x.mean(dim=dim, keepdim=True)
    return centred / torch.sqrt(centred.square().mean(dim=dim, keepdim=True) + NORM_EPS)


#: the normalizations an activation quantizer (and a packed layer's spec) can name
NORMS = {"rms": rms_norm, "layer": layer_norm}


def normalize(x: torch.Tensor, norm: str) -> torch.Tensor:
    """``NORMS[norm]`` over the token features of ``x``; x itself for ``norm=""``."""
    return NORMS[norm](x, feature_dim(x)) if norm else x


@torch.no_grad()
def absmax_codes(x: torch.Tensor, granularity: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, step): codes = Clip(round(x / step), -128, 127) as floats (integers), step =
    max(|x|_inf, eps) / 127 per token (shaped for broadcasting, the feature dim kept as 1) or one per
    tensor (every dim 1)."""
    magnitude = x.abs()
    if granularity == "token":
        peak = magnitude.amax(dim=feature_dim(x), keepdim=True)
    else:
        peak = magnitude.amax().reshape([1] * x.dim())
    step = peak.clamp_(min=SCALE_EPS).div_(INPUT_LEVELS)
    return torch.div(x, step).round_().clamp_(-INPUT_LEVELS - 1, INPUT_LEVELS), step


def _activation_options(norm_doc: str) -> tuple[Option, ...]:
    return (Option("input_norm", bool, True, norm_doc),
            Option("input_granularity", str, "token", "one absmax scale per token (feature vector) or per tensor",
                   choices=INPUT_GRANULARITIES))


class AbsMaxActivation(Quantizer):
    """BitNet b1.58's activations: Q_8(RMSNorm(x)), per-token absmax to 8 bits (module docstring).

    forward:   x_q = codes * step of n = RMSNorm(x) (n = x with ``input_norm=False``)
    backward:  dL/dn = dL/dx_q * est'(n)   (identity: the reference code's STE), then through the norm
    ``factors(n)`` gives (codes, step) of an already normalized input, what the layer computes with.
    """

    bits = 8
    norm = "rms"
    options = _activation_options("parameter-free RMSNorm over the token's features before quantizing")

    @property
    def input_norm_kind(self) -> str:
        """The normalization this quantizer applies: ``norm``, or "" with ``input_norm=False``."""
        return self.norm if self.input_norm else ""

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.input_norm_kind)

    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, step) of ``x`` (normalized already), not differentiable."""
        return absmax_codes(x.detach(), self.input_granularity)

    def dequantize(self, x: torch.Tensor) -> torch.Tensor:
        codes, step = self.factors(x)
        return codes * step

    def forward(self, x):
        return self.estimator.quantize(self.normalize(x), self.dequantize)

    def extra_repr(self):
        return f"input_norm={self.input_norm_kind or 'none'}, input_granularity={self.input_granularity}"


class LayerNormAbsMaxActivation(AbsMaxActivation):
    """The original BitNet's activations: Q_8(LN(x)), LN the paper's parameter-free LayerNorm (SubLN).

    Departures from the paper (Wang et al. 2023, its absmax quantization): it writes Q_b = 2^(b-1) = 128 and clips to
    [-Q_b + eps, Q_b - eps] without saying how x Q_b / gamma is rounded; this uses b1.58's
    round-then-clip with 127 (the same int8 codes a kernel takes). The paper scales per tensor in
    training and per token at inference; the default here is per token in both, so the trained and
    the exported model compute the same function and no sample's output depends on the rest of its
    batch (``input_granularity="tensor"`` trains as the paper does, and exports per tensor too).
    """

    norm = "layer"
    options = _activation_options("parameter-free LayerNorm (SubLN) over the token's features before quantizing")


class _PerTensorCodeWeight(ProjectedWeight):
    """A BitNet weight: ``factors(W)`` = (code, one scale for the whole matrix), forward
    W_q = scale * code with the estimator's backward around it (identity: the reference code's STE)."""


class AbsMeanTernaryWeight(_PerTensorCodeWeight):
    """BitNet b1.58 weights, absmean ternary with one scale per weight matrix (the reference code's
    ``weight_quant``):

        gamma = max(mean |W|, eps),   T = RoundClip(W / gamma, -1, 1) = Clip(round(W / gamma), -1, 1),
        W_q = gamma T,   backward dL/dW = dL/dW_q * est'(W)   (identity STE; gamma a constant)

    The paper writes W / (gamma + eps); the code clamps gamma at eps (1e-5) instead, followed here:
    the two differ only for mean |W| < 1e-5. The code multiplies by 1 / gamma and divides by it again;
    here W / gamma and gamma T, equal up to one rounding (a code can differ only at an exact .5 tie).
    round is half-to-even (``torch.round``, as the code).

    ``weight_scale="fitted"`` (a departure from the paper, off by default) keeps the codes T and
    multiplies them by their least-squares scale instead,

        s = argmin_s ||W - s T||^2 = <W, T> / <T, T> = mean of |W| over the weights with T != 0,

    (max(s, eps); eps when every code is 0, i.e. W = 0), which is TWN's alpha for absmean's zero set. gamma
    is below it (a third below on benchmarks/ACCURACY.md's small GPT, where that cost 0.37 bits per
    byte: TWN at threshold 0.5 mean|W|, the same zero set with this scale, against ``bitnet158_w``).
    """

    bits = 2
    options = (Option("weight_scale", str, "absmean",
                      "absmean: gamma = mean|W| (the paper's); fitted: the codes' least-squares scale, mean |W| "
                      "over the nonzero codes (a departure)", choices=("absmean", "fitted")),)

    def factors(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, scale), scale shaped [1, ...] like W's dims; not differentiable (the STE is ``forward``'s)."""
        w = w.detach()
        gamma = w.abs().mean().clamp(min=SCALE_EPS).reshape([1] * w.dim())
        code = torch.div(w, gamma).round_().clamp_(-1, 1)
        if self.weight_scale == "absmean":
            return code, gamma
        kept = code.abs()  # fitted; no branch on the count: no device synchronisation
        fitted = (w.abs() * kept).sum().div(kept.sum().clamp(min=1)).clamp(min=SCALE_EPS)
        return code, fitted.reshape(gamma.shape)


class CenteredSignWeight(_PerTensorCodeWeight):
    """The original BitNet's binary weights (Wang et al. 2023, BitLinear), one scale per weight matrix:

        alpha = mean(W),   W~ = sign(W - alpha),   beta = ||W||_1 / (n m) = mean |W|,   W_q = beta W~,
        backward dL/dW = dL/dW_q * est'(W)   (identity STE; alpha and beta constants)

    The centring makes W~ zero-mean in expectation, so its +1 and -1 are balanced. The paper's Sign
    maps 0 to -1; here sign(0) = +1 as everywhere in the project (bit 1 = -1 in the packed format):
    they differ only where a weight equals the mean exactly. beta has no eps (the paper has none): an
    all-zero matrix quantizes to 0.
    """

    bits = 1

    @staticmethod
    def factors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sign(W - alpha), beta), beta shaped [1, ...]; not differentiable (the STE is ``forward``'s)."""
        w = w.detach()
        return sign(w - w.mean()), w.abs().mean().reshape([1] * w.dim())

