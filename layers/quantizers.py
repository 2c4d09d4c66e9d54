"""Weight and activation quantizers: the methods themselves, independent of the layer type.

A weight quantizer maps the latent float weight W (shape [C_out, ...]) to the weight the layer's
forward uses; an activation quantizer maps the layer input. Each holds its estimator(s) (the
surrogate derivative used in backward) and receives the training progress via ``set_progress``.
``W_c`` is the slice of output channel c, with n = numel(W_c) elements.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from estimators import Estimator, check_progress
from estimators.base import sign

from .fresh_state import KeepsFreshState
from .noise_adaptation import NoiseAdaptation
from .options import Option, validate_options


def per_channel(reduce, w: torch.Tensor) -> torch.Tensor:
    """Apply ``reduce(tensor, dim, keepdim=True)`` over every axis but the output-channel axis 0."""
    return reduce(w, dim=tuple(range(1, w.dim())), keepdim=True)


def cosine_schedule(start: float, progress: float) -> float:
    """start * (1 + cos(pi p)) / 2: start at p = 0, exactly 0.0 at p = 1 (cos(pi) == -1.0)."""
    return 0.5 * start * (1.0 + math.cos(math.pi * progress))


class Quantizer(KeepsFreshState):
    """Base: holds ``estimator``; ``bits`` is the stored precision of the output.

    A subclass declares its hyperparameters in ``options`` (``layers.options.Option``): the
    constructor takes them as keywords, validates them and sets each as an attribute, so
    ``TernaryWeight(est, threshold_factor=0.5).threshold_factor == 0.5``. A quantizer holding a
    learned module sized by the layer's feature width sets ``needs_features`` and takes
    ``features`` (and the factory ``device``/``dtype``) before its options. A float layer's
    state_dict leaves a quantizer's own state fresh (``KeepsFreshState``).
    """

    bits: int = 32
    options: tuple[Option, ...] = ()
    needs_features: bool = False

    def __init__(self, estimator: Estimator, **options):
        super().__init__()
        self.estimator = estimator
        for name, value in validate_options(self.options, options, type(self).__name__).items():
            setattr(self, name, value)

    def diagnostics(self, weight: torch.Tensor) -> dict[str, float]:
        """Method-specific figures for the training logs (``qat.train.diagnostics``): none by default."""
        return {}

    def set_progress(self, progress: float) -> None:
        self.estimator.set_progress(progress)

    def update_latent_(self, weight: torch.Tensor) -> None:
        """Hook for quantizers that rewrite the latent weight at a schedule boundary (HQ)."""

    def scale_count(self, weight: torch.Tensor) -> int:
        """How many float32 scales the stored form of ``weight`` needs (one per output channel)."""
        return weight.shape[0]

    @property
    def is_plain_sign(self) -> bool:
        """Whether the binary code this quantizer gives (an activation quantizer's output, a weight
        quantizer's ``factors`` code) is exactly ``self.estimator(t)`` = sign(t), nothing added: then
        backward can rebuild it from one bit per element (``layers.quantized``)."""
        return False


class SignActivation(Quantizer):
    """Binary activations: x_b = sign(x), sign(0) = +1, with the estimator's backward."""

    bits = 1
    is_plain_sign = True

    def forward(self, x):
        return self.estimator(x)


class FloatWeight(Quantizer):
    """Weights left float: code = W, scale = 1 (a method that binarizes only the inputs, such as
    ReActNet's first stage). No estimator is applied: the gradient reaches W unchanged."""

    def factors(self, w):
        return w, w.new_ones(w.shape[0], *([1] * (w.dim() - 1)))

    def forward(self, w):
        return w


class ScaledSignWeight(Quantizer):
    """BWN / XNOR-Net weights (Rastegari et al. 2016): W_c ~ alpha_c * sign(W_c),

        alpha_c = ||W_c||_1 / n   (mean |W| per output channel, the L2-optimal scale).

    By default gradients flow through alpha (autograd gives the paper's exact chain rule
    dC/dW_i = (1/n) sign(W_i) sum_j dC/dW~_j sign(W_j) + alpha * sign'(W_i) dC/dW~_i);
    ``detach_scale=True`` treats alpha as a constant, as most modern code does.
    Departure: the official Lua code also mean-centres each filter every iteration; here latent
    weights are left as they are and clipped to [-1, 1] after each step (``qat.latent``).
    """

    bits = 1
    is_plain_sign = True
    options = (Option("detach_scale", bool, False, "treat alpha_c as a constant in backward"),)

    def factors(self, w):
        """(code, scale): sign(W) with the estimator's backward, and alpha_c shaped [C_out, 1, ...]."""
        alpha = per_channel(torch.mean, w.abs())
        return self.estimator(w), (alpha.detach() if self.detach_scale else alpha)

    def forward(self, w):
        code, scale = self.factors(w)
        return code * scale


class ProjectedWeight(Quantizer):
    """A weight quantizer defined by a projection ``project(W)`` = W_q (code times scale): forward is
    W_q, backward the estimator's ``quantize`` around it (dL/dW = dL/dW_q * est'(W); identity = STE).
    By default ``project`` is code * scale of the subclass's ``factors(W)`` = (code, scale). The
    stored form has one float32 scale per output channel with ``per_channel``, else one per layer.
    """

    per_channel: bool = False

    def project(self, w: torch.Tensor) -> torch.Tensor:
        code, scale = self.factors(w)
        return code * scale

    def forward(self, w):
        return self.estimator.quantize(w, self.project)

    def scale_count(self, weight):
        return weight.shape[0] if self.per_channel else 1


class TernaryWeight(ProjectedWeight):
    """TWN (Li, Zhang, Liu 2016): W ~ alpha * T with

        delta = 0.7 * E|W|,   T_i = sign(W_i) 1[|W_i| > delta],   alpha = mean_{i: |W_i| > delta} |W_i|,

    computed per layer as in the paper (``per_channel=True`` computes delta and alpha per output
    channel, as many reimplementations do). Backward: straight-through to W (times the estimator's
    derivative, 1 for the default ``identity``); delta and alpha are constants.
    """

    bits = 2
    options = (Option("threshold_factor", float, 0.7, "delta = threshold_factor * E|W|",
                      check=lambda v: v >= 0, rule=">= 0"),
               Option("per_channel", bool, False, "delta and alpha per output channel instead of per layer"))

    def _reduce(self, t):
        return per_channel(torch.sum, t) if self.per_channel else t.sum()

    def project(self, w):
        magnitude = w.abs()
        n = magnitude[0].numel() if self.per_channel else magnitude.numel()
        delta = self.threshold_factor * self._reduce(magnitude) / n
        kept = (magnitude > delta).to(w.dtype)
        alpha = self._reduce(magnitude * kept) / self._reduce(kept).clamp(min=1)
        return alpha * sign(w) * kept

    def extra_repr(self):
        return f"threshold_factor={self.threshold_factor:g}, per_channel={self.per_channel}"


class HypersphericalTernaryWeight(Quantizer):
    """Hyperspherical ternary quantization (HQ, Liu et al. WACV 2023), as reconstructed in
    ``reference/algorithms.md`` §4 (no public code; the method section was not available):

    1. Project each filter onto the unit sphere: w^_c = W_c / ||W_c||_2 (gradients flow through
       the normalisation, so updates are tangent to the sphere).
    2. Magnitude pruning: delta = the s-quantile of |w^| over the layer, where s follows the cubic
       gradual-pruning schedule (Zhu & Gupta 2017)
           s(p) = s_f * (1 - (1 - clip((p - p_0) / (p_1 - p_0), 0, 1))^3),
       so s = target_sparsity once p >= prune_end.
    3. Ternary projection onto a unit vector: t_c = sign(w^_c) 1[|w^_c| > delta],
       t^_c = t_c / sqrt(k_c), k_c = ||t_c||_0 (the "ternary orthonormal bases"); the forward uses t^
       (the following BatchNorm absorbs the scale). Backward: straight through from t^ to w^.
    4. Reinitialisation: when p first reaches prune_end, the latent weights are reset to the
       ternary point, W_c <- ||W_c|| t^_c (survivors get equal magnitude, pruned weights 0), so that
       retraining starts where the cosine similarity is 1.

    Choices the papers leave open, made here: per-filter normalisation; a per-layer quantile;
    cubic schedule; reinitialisation rewrites latent weights but not the optimizer state.
    Diagnostics: ``stats(W)`` gives the zero fraction and cos(w^_c, t^_c) averaged over filters.
    """

    bits = 2
    options = (Option("target_sparsity", float, 0.7, "final zero fraction s_f", check=lambda v: 0 <= v < 1,
                      rule="in [0, 1)"),
               Option("prune_start", float, 0.0, "progress p_0 where pruning starts", check=lambda v: 0 <= v <= 1,
                      rule="in [0, 1]"),
               Option("prune_end", float, 0.5, "progress p_1 where s reaches s_f", check=lambda v: 0 <= v <= 1,
                      rule="in [0, 1]"),
               Option("reinitialize", bool, True, "reset latent weights to the ternary point at p_1"))

    def __init__(self, estimator: Estimator, **options):
        super().__init__(estimator, **options)
        if not self.prune_start < self.prune_end:
            raise ValueError(f"hq: need prune_start < prune_end, got {self.prune_start!r}, {self.prune_end!r}")
        # persistent, so a resumed run does not reinitialise a second time
        self.register_buffer("reinitialized", torch.tensor(False))
        self._reinitialized = False
        self.set_progress(0.0)

    def set_progress(self, progress):
        super().set_progress(progress)
        p = check_progress(progress)
        ramp = min(max((p - self.prune_start) / (self.prune_end - self.prune_start), 0.0), 1.0)
        self.sparsity = self.target_sparsity * (1.0 - (1.0 - ramp) ** 3)
        self._reinit_due = self.reinitialize and ramp >= 1.0 and not self._reinitialized

    @staticmethod
    def normalize(w):
        return w / per_channel(torch.linalg.vector_norm, w).clamp(min=1e-12)

    def ternary_directions(self, unit):
        """t_c = sign(w^_c) 1[|w^_c| > delta] with delta the current sparsity's quantile of |w^|."""
        magnitude = unit.abs()
        pruned = math.floor(self.sparsity * magnitude.numel())
        if pruned == 0:
            return sign(unit)
        delta = magnitude.flatten().kthvalue(pruned).values
        return sign(unit) * (magnitude > delta).to(unit.dtype)

    def project(self, unit):
        t = self.ternary_directions(unit)
        return t / per_channel(torch.sum, t.abs()).clamp(min=1).sqrt()

    def forward(self, w):
        return self.estimator.quantize(self.normalize(w), self.project)

    @torch.no_grad()
    def diagnostics(self, w) -> dict:
        """The zero fraction of t^ and cos(w^_c, t^_c) averaged over filters."""
        unit = self.normalize(w)
        t_hat = self.project(unit)
        cosine = per_channel(torch.sum, unit * t_hat)
        return {"sparsity": float((t_hat == 0).float().mean()), "cosine_similarity": float(cosine.mean())}

    @torch.no_grad()
    def update_latent_(self, weight):
        if not self._reinit_due:
            return
        norm = per_channel(torch.linalg.vector_norm, weight)
        weight.copy_(norm * self.project(self.normalize(weight)))
        self._reinitialized, self._reinit_due = True, False
        self.reinitialized.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # mirror the buffer in a Python flag: set_progress runs every step and must not sync
        self._reinitialized = bool(self.reinitialized)
        self._reinit_due = self._reinit_due and not self._reinitialized

    def extra_repr(self):
        return (f"target_sparsity={self.target_sparsity:g}, sparsity={self.sparsity:.3f}, "
                f"prune=[{self.prune_start:g}, {self.prune_end:g}], reinitialize={self.reinitialize}")


class _FourierWithNoise(Quantizer):
    """sign with the Fourier estimator plus FDA's noise adaptation term (Eq. 14):

        z = sign(t) + alpha(p) * e(t),   alpha(p) = alpha_0 (1 + cos(pi p)) / 2,

    so alpha goes from alpha_0 = 0.1 (BiBench's 0.05 (1 + cos)) to exactly 0 at p = 1 and the
    trained network is purely binary. The paper is inconsistent on whether alpha e(t) is in the
    forward pass (Fig. 2a: yes, Alg. 1: no); this follows Fig. 2a and BiBench (it is), which is the
    reading under which the alpha -> 0 schedule matters. Gradients of the NAM term come from
    autograd on Eq. 14, i.e. every NAM term is scaled by alpha (Eq. 15-17 as printed drop it).

    The noise term is a training-time adaptation: it is applied only in ``train()`` mode while
    alpha > 0. In ``eval()`` mode, and whenever alpha == 0, the module is skipped entirely and the
    quantizer computes the binary network itself (exactly the values it gives at p = 1), so every
    validation figure, and the checkpoint chosen on it, is that of the network that is deployed
    (reference/algorithms.md §8a: evaluate with training-only modules inactive).
    """

    bits = 1
    needs_features = True
    options = (Option("noise_weight", float, 0.1, "alpha_0, the noise term's weight at p = 0",
                      check=lambda v: v >= 0, rule=">= 0"),
               Option("nam_reduction", int, 64, "the NAM's hidden width is features // nam_reduction",
                      check=lambda v: v >= 1, rule=">= 1"),
               Option("nam_shortcut", float, 0.1, "the NAM's sin(t) shortcut weight a"))

    def __init__(self, estimator: Estimator, features: int, device=None, dtype=None, **options):
        super().__init__(estimator, **options)
        self.initial_noise_weight = self.noise_weight
        self.nam = NoiseAdaptation(features, self.nam_reduction, self.nam_shortcut, device=device, dtype=dtype)
        self.set_progress(0.0)

    def set_progress(self, progress):
        super().set_progress(progress)
        self.noise_weight = cosine_schedule(self.initial_noise_weight, check_progress(progress))

    @property
    def noise_active(self) -> bool:
        """Whether the forward adds alpha e(t): only while training and alpha > 0."""
        return self.training and self.noise_weight != 0.0

    @property
    def is_plain_sign(self) -> bool:
        return not self.noise_active

    def binarize(self, t, feature_dim):
        z = self.estimator(t)
        if not self.noise_active:
            return z
        return torch.add(z, self.nam(t, feature_dim), alpha=self.noise_weight)

    def diagnostics(self, weight) -> dict:
        """The current number of Fourier terms n and the noise weight alpha."""
        return {"terms": float(self.estimator.terms), "noise_weight": self.noise_weight}

    def extra_repr(self):
        return f"noise_weight={self.noise_weight:.4g}"


class FourierWeight(_FourierWithNoise):
    """FDA weights: (sign(W_c) + alpha e(W_c)) * mean|W_c|, the NAM over each flattened filter
    (d = C_in/groups * kh * kw). The per-output-channel scale is detached (BiBench's reading; the
    MindSpore inference code uses one per-layer scalar)."""

    def factors(self, w):
        """(code, scale): sign(W_c) + alpha e(W_c) shaped like W, and mean|W_c| shaped [C_out, 1]."""
        rows = w.flatten(1)
        return self.binarize(rows, feature_dim=-1).view_as(w), rows.abs().mean(dim=1, keepdim=True).detach()

    def forward(self, w):
        code, scale = self.factors(w)
        return code * scale.view(-1, *([1] * (w.dim() - 1)))


def _mix(t: torch.Tensor, w: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """The per-position linear map t -> w t along the feature axis (dim 1 of NCHW, or the last).
    NCHW uses a batched matmul over [C, H*W] planes: no layout change, and much faster than a
    1x1 convolution with a 1-channel side."""
    if channels_first:
        n, _, h, w_ = t.shape
        return torch.matmul(w, t.reshape(n, t.shape[1], h * w_)).view(n, w.shape[0], h, w_)
    return F.linear(t, w)


def _mix_add_(out: torch.Tensor, w: torch.Tensor, t: torch.Tensor, alpha: float, channels_first: bool) -> torch.Tensor:
    """out += alpha * (w t) in place (``_mix`` accumulated, without a temporary of out's size)."""
    if not out.is_contiguous():  # e.g. channels_last inputs: no flat view, take the plain route
        return out.add_(_mix(t, w, channels_first), alpha=alpha)
    if channels_first:
        n, c_in, h, w_ = t.shape
        out.view(n, w.shape[0], h * w_).baddbmm_(w.expand(n, *w.shape), t.reshape(n, c_in, h * w_), alpha=alpha)
    else:
        out.view(-1, w.shape[0]).addmm_(t.reshape(-1, t.shape[-1]), w.T, alpha=alpha)
    return out


def _outer(a: torch.Tensor, b: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """sum over positions of a b^T: the weight gradient of ``_mix``."""
    if channels_first:
        return torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)).sum(0)
    return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


class _SignWithNoise(torch.autograd.Function):
    """FDA's activation path in one autograd node (fewer activation-sized temporaries on CPU):

        forward:  z = sign(t) + alpha * (W2 relu(W1 t) + a sin(t))
        backward: dL/dt  = s_n'(t) g + alpha * (a cos(t) g + W1^T [(W2^T g) * 1[W1 t > 0]])
                  dL/dW2 = alpha * sum_pos g relu(W1 t)^T,   dL/dW1 = sum_pos [alpha (W2^T g) * 1[W1 t > 0]] t^T

    with g = dL/dz and s_n' the estimator's derivative: the same values autograd gives for
    ``estimator(t) + alpha * NoiseAdaptation(t)`` (tested against it).
    """

    @staticmethod
    def forward(ctx, t, w1, w2, estimator, alpha, shortcut, channels_first):
        hidden = F.relu(_mix(t, w1, channels_first))
        z = sign(t).add_(torch.sin(t), alpha=alpha * shortcut)
        _mix_add_(z, w2, hidden, alpha, channels_first)
        ctx.save_for_backward(t, hidden, w1, w2)
        ctx.estimator, ctx.alpha, ctx.shortcut, ctx.channels_first = estimator, alpha, shortcut, channels_first
        return z

    @staticmethod
    def backward(ctx, g):
        t, hidden, w1, w2 = ctx.saved_tensors
        cf, alpha = ctx.channels_first, ctx.alpha
        grad_t = ctx.estimator.grad(t).mul_(g)
        grad_t.addcmul_(torch.cos(t), g, value=alpha * ctx.shortcut)
        grad_hidden = _mix(g, w2.T, cf).mul_(alpha).mul_(hidden > 0)
        _mix_add_(grad_t, w1.T, grad_hidden, 1.0, cf)
        grad_w2 = _outer(g, hidden, cf).mul_(alpha)
        grad_w1 = _outer(grad_hidden, t, cf)
        return grad_t, grad_w1, grad_w2, None, None, None, None


class FourierActivation(_FourierWithNoise):
    """FDA activations: sign(x) + alpha e(x), the NAM along the channel axis (dim 1) at every
    position (d = C_in), as BiBench does (the paper does not say how x is reshaped). While the noise
    is active (training, alpha > 0) the fused ``_SignWithNoise`` computes it; otherwise sign(x)."""

    def forward(self, x):
        if not self.noise_active:
            return self.estimator(x)
        channels_first = x.dim() == 4
        return _SignWithNoise.apply(x, self.nam.w1, self.nam.w2, self.estimator, self.noise_weight,
                                    self.nam.shortcut, channels_first)
