"""Surrogate derivatives of sign(x). Each class: hyperparameters, a pure ``grad(x)``, its formula
and reference in the docstring, and ``@register`` to make it selectable by name."""
from __future__ import annotations

import math

import torch

from .base import Estimator, check_progress, register, require


def sech_squared(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """sech^2(scale * x) = 1 - tanh^2(scale * x), computed as 4 s (1 - s), s = sigmoid(-2 scale |x|).

    ``1 - tanh(y)**2`` cancels: tanh(y) rounds to exactly 1 once |y| > 9 in float32 (19 in float64),
    so the difference is 0 although sech^2(9) = 6e-8 (a SwishSign with beta = 10 loses its whole
    tail beyond |x| = 1.8). s = 1 / (1 + e^{2|y|}) <= 1/2 keeps its relative accuracy down to the
    underflow of e^{-2|y|} (|y| ~ 44 in float32), and 1 - s has no cancellation. (sigmoid is
    also much cheaper than tanh or cosh on CPU.) NaN stays NaN, +-inf gives 0.
    """
    s = x.abs().mul_(-2.0 * scale).sigmoid_()
    return s.mul_(torch.rsub(s, 1.0)).mul_(4.0)


@register
class Identity(Estimator):
    """Plain straight-through estimator (BinaryConnect): d sign/dx := 1."""

    name = "identity"
    needs = "none"

    def grad(self, x):
        return torch.ones_like(x)


@register
class ClippedSTE(Estimator):
    """Hubara et al. 2016 / XNOR-Net: d sign/dx := 1[|x| <= clip] (the derivative of hardtanh).

    Larq ``ste_sign(clip_value=1)``. ``clip`` defaults to 1.
    """

    name = "clipped_ste"
    needs = "zeros"

    def __init__(self, clip: float = 1.0):
        super().__init__()
        require(clip > 0, f"clipped_ste: clip must be > 0, got {clip!r}")
        self.clip = float(clip)

    def grad(self, x):
        return x.abs().le_(self.clip)  # in-place comparison on a float tensor writes 1.0 / 0.0

    def _bound(self, dtype):
        return float(torch.nextafter(torch.tensor(self.clip, dtype=dtype), torch.tensor(math.inf, dtype=dtype)))

    def zeros(self, x):
        """1[|x| > clip] as ``backward`` applies it (NaN is not in it: hardtanh_backward passes it)."""
        return torch.ge(x.abs(), self._bound(x.dtype))

    def zeros_comparison(self, dtype):
        return "ge", self._bound(dtype), True  # zeros(x) = |x| >= bound

    def backward(self, x, grad_output):
        # One fused pass: hardtanh's backward keeps g where min < x < max (exclusive), so the
        # bounds are moved one ulp of x's dtype outwards to keep |x| == clip (inclusive).
        bound = self._bound(x.dtype)
        return torch.ops.aten.hardtanh_backward(grad_output, x, -bound, bound)

    def hyperparameters(self):
        return {"clip": self.clip}


@register
class ApproxSign(Estimator):
    """Bi-Real Net (Liu et al. 2018) ApproxSign: d sign/dx := (2 - 2|x|) for |x| < 1, else 0.

    It is the derivative of F(x) = -1 (x < -1); 2x + x^2 (-1 <= x < 0); 2x - x^2 (0 <= x < 1); 1.
    """

    name = "approx_sign"

    def grad(self, x):
        return torch.relu(2.0 - 2.0 * x.abs())


@register
class SwishSign(Estimator):
    """BNN+ (Darabi et al. 2018) SwishSign, as in Larq:

        d sign/dx := beta * (2 - beta*x * tanh(beta*x/2)) / (1 + cosh(beta*x)),

    the derivative of 2*sigmoid(beta*x)*(1 + beta*x*(1 - sigmoid(beta*x))) - 1. Default beta = 5.
    With h = beta*x/2 and 1 + cosh(2h) = 2 cosh^2(h) it is computed as
    beta * (1 - h tanh(h)) * sech^2(h) (``sech_squared``: no cancellation, so the tail stays
    nonzero in float32, e.g. at |x| = 5 with beta = 10, and no overflow). +-inf gives the limit 0.
    """

    name = "swish_sign"

    def __init__(self, beta: float = 5.0):
        super().__init__()
        require(beta > 0, f"swish_sign: beta must be > 0, got {beta!r}")
        self.beta = float(beta)

    # sech^2(h) is exactly 0 beyond |h| = 374 in every float dtype (4 e^{-748} < the smallest
    # float64), so clamping h there changes no finite value and turns +-inf into 0 instead of
    # (1 - inf) * 0 = NaN.
    _H_MAX = 400.0

    def grad(self, x):
        h = torch.clamp(x, -self._H_MAX / (0.5 * self.beta), self._H_MAX / (0.5 * self.beta)).mul_(0.5 * self.beta)
        g = torch.tanh(h).mul_(h).neg_().add_(1.0)
        return g.mul_(sech_squared(h)).mul_(self.beta)

    def hyperparameters(self):
        return {"beta": self.beta}


@register
class ErrorDecay(Estimator):
    """IR-Net's Error Decay Estimator (Qin et al. 2020): sign(x) ~ k*tanh(t*x), so

        d sign/dx := k * t * (1 - tanh^2(t*x)) = k * t * sech^2(t*x),
        t(p) = t_min * 10^(p * log10(t_max / t_min)),   k(p) = max(1/t(p), 1),

    with p the training progress in [0, 1] (the paper's epoch i of N). Stage 1 (t < 1, k = 1/t)
    is near-identity, stage 2 (t >= 1) approaches sign. Paper: t_min = 0.1, t_max = 10 (the
    official CIFAR ResNet-20 1w1a trainer uses t_min = 1e-3). The official code updates t once per
    epoch; here it follows whatever progress the trainer hands in (every step). sech^2 is computed
    by ``sech_squared``, not as 1 - tanh^2, which is exactly 0 in float32 once |t x| > 9.
    """

    name = "ede"
    scheduled = True

    def __init__(self, t_min: float = 0.1, t_max: float = 10.0):
        super().__init__()
        require(t_min > 0, f"ede: t_min must be > 0, got {t_min!r}")
        require(t_max >= t_min, f"ede: t_max must be >= t_min ({t_min!r}), got {t_max!r}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.set_progress(0.0)

    def set_progress(self, progress):
        p = check_progress(progress)
        self.t = self.t_min * 10.0 ** (p * math.log10(self.t_max / self.t_min))
        self.k = max(1.0 / self.t, 1.0)

    def grad(self, x):
        return sech_squared(x, self.t).mul_(self.k * self.t)

    def hyperparameters(self):
        return {"t_min": self.t_min, "t_max": self.t_max, "t": self.t, "k": self.k}


@register
class Fourier(Estimator):
    """FDA-BNN (Xu et al. NeurIPS 2021): the derivative of the truncated Fourier series of sign,

        s_n(x)  = (4/pi) * sum_{i=0..n} sin((2i+1) w x) / (2i+1)            (paper Eq. 9)
        s_n'(x) = (4w/pi) * sum_{i=0..n} cos((2i+1) w x)                    (Eq. 10)
                = (2w/pi) * sin(2(n+1) w x) / sin(w x),   -> 4w(n+1)/pi as sin(w x) -> 0,

    evaluated in the closed form (one sin ratio, not a sum of n+1 cosines), and zeroed for
    |x| > ``clip`` (BiBench's reference reimplementation clips at 1; the paper text does not say;
    ``clip=None`` disables it). Note the paper's n counts n+1 sine terms.

    Schedule (paper §3.2): n starts at ``terms`` (n_s = 9) and grows to ``max_terms``
    (n_p = 2 n_s = 18). The paper does not give the increment rule; here every value of n gets an
    equal share of training: n(p) = min(n_p, n_s + floor((n_p - n_s + 1) * p)), so n(1) = n_p.
    ``max_terms = terms`` fixes n. The paper does not give omega either; BiBench uses 0.1.
    Late in training the surrogate is negative just inside |x| <= 1 (first zero at
    pi / (2 (n+1) w)); that is a property of the truncated series and is kept.

    Non-finite inputs, the same with and without ``clip``: a NaN input gives a NaN derivative (it
    propagates, so anomaly detection and AMP's inf/NaN check on gradients see it), and x = +-inf
    gives 0: it lies outside every clip range, and without clipping the periodic series has no
    limit at infinity, so 0, the derivative of sign there (and every other estimator's value at
    +-inf but the identity's), is used.
    """

    name = "fourier"
    scheduled = True

    def __init__(self, terms: int = 9, max_terms: int | None = None, omega: float = 0.1, clip: float | None = 1.0):
        super().__init__()
        require(isinstance(terms, int) and terms >= 1, f"fourier: terms must be an integer >= 1, got {terms!r}")
        max_terms = 2 * terms if max_terms is None else max_terms
        require(isinstance(max_terms, int) and max_terms >= terms,
                f"fourier: max_terms must be an integer >= terms ({terms}), got {max_terms!r}")
        require(omega > 0, f"fourier: omega must be > 0, got {omega!r}")
        require(clip is None or clip > 0, f"fourier: clip must be > 0 or None, got {clip!r}")
        self.start_terms, self.max_terms = terms, max_terms
        self.omega = float(omega)
        self.clip = None if clip is None else float(clip)
        self.set_progress(0.0)

    def set_progress(self, progress):
        p = check_progress(progress)
        self.terms = min(self.max_terms, self.start_terms + math.floor((self.max_terms - self.start_terms + 1) * p))

    def grad(self, x):
        w, n = self.omega, self.terms
        # The derivative is even, so it is computed from a = |x| and u = w a. sin(2(n+1)u)/sin(u)
        # is accurate while u is a normal float; below that (0 and subnormal u) u is raised to
        # the smallest normal float, a power of two, where both sines are exactly their arguments
        # and the quotient is exactly the limit 2(n+1) (the true value differs by a relative
        # O((n u)^2), far below rounding): no 0/0, so a NaN input stays NaN. u is also capped
        # where 2(n+1)u would overflow, so +-inf gives a finite quotient, which the mask
        # 1[a <= clip] (1[a <= largest float] without clip) then sets to 0, while NaN * 0 stays
        # NaN. At u = m*pi (|x| >= pi/w, only without clipping) sin(u) is tiny but not 0 in
        # floating point. In-place steps: on CPU every fresh activation-sized tensor costs page faults.
        finfo = torch.finfo(x.dtype)
        a = x.abs()
        u = torch.clamp_(a * w, min=finfo.tiny, max=finfo.max / (2 * (n + 1)))
        g = (u * (2 * (n + 1))).sin_().div_(u.sin_()).mul_(2.0 * w / math.pi)
        return g.mul_(a.le_(finfo.max if self.clip is None else self.clip))

    def hyperparameters(self):
        return {"terms": self.terms, "start_terms": self.start_terms, "max_terms": self.max_terms,
                "omega": self.omega, "clip": self.clip}
