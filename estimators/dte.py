"""DIR-Net's Distribution-sensitive Two-stage Estimator (DTE), Qin et al., IJCV 2022.

The paper's equations were not available (``docs/dirnet_notes.md``); what is verified is the
abstract (a "distribution-sensitive soft approximation" of sign "jointly considering the updating
capability and accurate gradient") and the base it extends, IR-Net's EDE (official code). The
distribution-sensitive part below is the inferred reading, stated in the class docstring.
"""
from __future__ import annotations

import math

import torch

from .base import Estimator, check_progress, register, require
from .surrogates import sech_squared

SCALES = ("std", "none")


@register
class DistributionSensitiveTwoStage(Estimator):
    """DTE: sign(x) = sign(x / s) is approximated by k * tanh(t * x / s), so

        d sign/dx := (k t / s) * sech^2(t x / s),
        t(p) = t_min * 10^(p * log10(t_max / t_min)),   k(p) = max(1/t(p), 1),
        s    = std(x)  (unbiased, over the whole tensor handed in; ``scale="std"``),

    with p the training progress in [0, 1]. Two stages, as IR-Net's EDE [V official code]:
    stage 1 (t < 1, k = 1/t) has slope 1/s at 0 and is near-identity over the bulk of the
    distribution (updating capability); stage 2 (t >= 1, k = 1) narrows towards sign (accurate
    gradient). With the defaults the stages meet at p = 0.5.

    Inferred [I] (``docs/dirnet_notes.md``): the distribution sensitivity is read as measuring x in
    units of its own spread s, so the stage boundary and the share of inputs that get a gradient
    are the same for every layer. For IMB's standardised weights s ~ 1 and DTE equals EDE; for a
    layer's input s is that batch's std. ``scale="none"`` sets s = 1: exactly IR-Net's EDE.
    s is a constant in backward (sign(x / s) does not depend on s). If s is 0 (a constant tensor)
    or not finite (inf or NaN in x), s = 1 is used: NaN inputs still give NaN, +-inf gives 0, the
    other estimators' convention. Defaults t_min = 0.1, t_max = 10 (IR-Net paper; its CIFAR
    ResNet-20 1w1a trainer uses t_min = 1e-3). t follows the progress the trainer hands in (every
    step), not once per epoch as in the official code.
    """

    name = "dte"
    scheduled = True

    def __init__(self, t_min: float = 0.1, t_max: float = 10.0, scale: str = "std"):
        super().__init__()
        require(t_min > 0, f"dte: t_min must be > 0, got {t_min!r}")
        require(t_max >= t_min, f"dte: t_max must be >= t_min ({t_min!r}), got {t_max!r}")
        require(scale in SCALES, f"dte: scale must be one of {', '.join(SCALES)}, got {scale!r}")
        self.t_min, self.t_max, self.scale = float(t_min), float(t_max), scale
        self.set_progress(0.0)

    def set_progress(self, progress):
        p = check_progress(progress)
        self.t = self.t_min * 10.0 ** (p * math.log10(self.t_max / self.t_min))
        self.k = max(1.0 / self.t, 1.0)

    @property
    def stage(self) -> int:
        """1 while t < 1 (k = 1/t, updating capability), 2 from t = 1 on (k = 1, towards sign)."""
        return 1 if self.t < 1.0 else 2

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """s as a 0-dim tensor of x's dtype (no host sync): std(x), or 1 where that is 0 or not finite."""
        if self.scale == "none" or x.numel() < 2:
            return x.new_ones(())
        s = x.detach().std()
        return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))

    def grad(self, x):
        s = self.spread(x)
        return sech_squared(x, self.t / s).mul_(self.k * self.t / s)

    def hyperparameters(self):
        return {"t_min": self.t_min, "t_max": self.t_max, "scale": self.scale, "t": self.t, "k": self.k}
