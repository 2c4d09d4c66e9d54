"""The six surrogate derivatives of sign(x). Each class: hyperparameters, a pure ``grad(x)``,
its formula and reference in the docstring."""
from __future__ import annotations

import math

import torch

from .base import Estimator, check_progress, require


class Identity(Estimator):
    """Plain straight-through estimator (BinaryConnect): d sign/dx := 1."""

    name = "identity"

    def grad(self, x):
        return torch.ones_like(x)


class ClippedSTE(Estimator):
    """Hubara et al. 2016 / XNOR-Net: d sign/dx := 1[|x| <= clip] (the derivative of hardtanh).

    Larq ``ste_sign(clip_value=1)``. ``clip`` defaults to 1.
    """

    name = "clipped_ste"

    def __init__(self, clip: float = 1.0):
        super().__init__()
        require(clip > 0, f"clipped_ste: clip must be > 0, got {clip!r}")
        self.clip = float(clip)

    def grad(self, x):
        return x.abs().le_(self.clip)  # in-place comparison on a float tensor writes 1.0 / 0.0

    def backward(self, x, grad_output):
        # One fused pass: hardtanh's backward keeps g where min < x < max (exclusive), so the
        # bounds are moved one ulp of x's dtype outwards to keep |x| == clip (inclusive).
        bound = float(torch.nextafter(torch.tensor(self.clip, dtype=x.dtype), torch.tensor(math.inf, dtype=x.dtype)))
        return torch.ops.aten.hardtanh_backward(grad_output, x, -bound, bound)

    def hyperparameters(self):
        return {"clip": self.clip}


class ApproxSign(Estimator):
    """Bi-Real Net (Liu et al. 2018) ApproxSign: d sign/dx := (2 - 2|x|) for |x| < 1, else 0.

    It is the derivative of F(x) = -1 (x < -1); 2x + x^2 (-1 <= x < 0); 2x - x^2 (0 <= x < 1); 1.
    """

    name = "approx_sign"

    def grad(self, x):
        return torch.relu(2.0 - 2.0 * x.abs())


class SwishSign(Estimator):
    """BNN+ (Darabi et al. 2018) SwishSign, as in Larq:

        d sign/dx := beta * (2 - beta*x * tanh(beta*x/2)) / (1 + cosh(beta*x)),

    the derivative of 2*sigmoid(beta*x)*(1 + beta*x*(1 - sigmoid(beta*x))) - 1. Default beta = 5.
    """

    name = "swish_sign"

    def __init__(self, beta: float = 5.0):
        super().__init__()
        require(beta > 0, f"swish_sign: beta must be > 0, got {beta!r}")
        self.beta = float(beta)

    def grad(self, x):
        # With h = beta*x/2 and 1 + cosh(2h) = 2 cosh^2(h), the formula becomes
        # beta * (1 - h tanh(h)) * (1 - tanh^2(h)): one tanh, no overflow for large |x|.
        h = (0.5 * self.beta) * x
        th = torch.tanh(h)
        return self.beta * (1.0 - h * th) * (1.0 - th * th)

    def hyperparameters(self):
        return {"beta": self.beta}


class ErrorDecay(Estimator):
    """IR-Net's Error Decay Estimator (Qin et al. 2020): sign(x) ~ k*tanh(t*x), so

        d sign/dx := k * t * (1 - tanh^2(t*x)),
        t(p) = t_min * 10^(p * log10(t_max / t_min)),   k(p) = max(1/t(p), 1),

    with p the training progress in [0, 1] (the paper's epoch i of N). Stage 1 (t < 1, k = 1/t)
    is near-identity, stage 2 (t >= 1) approaches sign. Paper: t_min = 0.1, t_max = 10 (the
    official CIFAR ResNet-20 1w1a trainer uses t_min = 1e-3). The official code updates t once per
    epoch; here it follows whatever progress the trainer hands in (every step).
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
        return self.k * self.t * (1.0 - torch.tanh(self.t * x) ** 2)

    def hyperparameters(self):
        return {"t_min": self.t_min, "t_max": self.t_max, "t": self.t, "k": self.k}


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
        # The derivative is even, so it is computed from a = |x|. sin(2(n+1)u)/sin(u) is accurate
        # while u = w a is a normal float; below that (subnormal a) the quotient of rounded
        # subnormals is wrong, so such a is set to 0, where 0/0 = NaN is replaced by the limit
        # 2(n+1) (the true value differs by a relative O((n w a)^2), far below rounding). A NaN
        # input also gets the derivative at 0. At u = m*pi (|x| >= pi/w, only without clipping)
        # sin(u) is tiny but not 0 in floating point. In-place steps: on CPU every fresh
        # activation-sized tensor costs page faults.
        a = torch.threshold_(x.abs(), torch.finfo(x.dtype).tiny / w, 0.0)
        g = (a * (2 * (n + 1) * w)).sin_()
        g.div_((a * w).sin_()).nan_to_num_(nan=2.0 * (n + 1)).mul_(2.0 * w / math.pi)
        if self.clip is not None:
            g.mul_(a.le_(self.clip))
        return g

    def hyperparameters(self):
        return {"terms": self.terms, "start_terms": self.start_terms, "max_terms": self.max_terms,
                "omega": self.omega, "clip": self.clip}
