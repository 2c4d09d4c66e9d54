"""Bop, the latent-free binary optimizer (Helwegen et al., "Latent Weights Do Not Exist: Rethinking
Binarized Neural Network Optimization", NeurIPS 2019), and which weights of a model it trains.

For every binary weight w in {-1, +1} with gradient g = dL/dw:

    m_t = (1 - gamma) m_{t-1} + gamma g_t                       (exponential moving average, m_0 = 0)
    w_t = -w_{t-1}   if |m_t| > tau and sign(m_t) == sign(w_{t-1}),  i.e. sign(w_{t-1}) m_t > tau
    w_t =  w_{t-1}   otherwise

gamma is the adaptivity rate, tau the flip threshold; Larq's defaults gamma = 1e-4, tau = 1e-8
(`larq.optimizers.Bop`, which writes the rule as w_t = sign(-sign(w m_t - tau) w) on w = +-1). A
weight flips when the averaged gradient has pushed against its sign for long and hard enough; there
is no latent magnitude that "accumulates" the gradient. gamma is kept in the param group as `lr` so
a learning-rate schedule scales it like a learning rate (Larq lets gamma follow a schedule too);
tau is constant.

Which weights (`prepare_binary_weights`): the `weight` of every quantized layer with 1-bit weights
whose code is sign(W) (`weight_quantizer.bits == 1` and `is_plain_sign`: bwn, xnor, reactnet);
everything else (float layers, BN, biases, learned modules such as RSign thresholds) is trained by
Adam (`qat.train.optim`). A 1-bit layer whose code is not plain sign(W) (FDA's noise term, the
standardised W of Libra-PB / IMB) cannot be flipped by Bop and is an error.

The magnitude. Bop's weight is the binary value itself, so each managed W is set once to sign(W)
in {-1, +1} (sign(0) = +1) and Bop only ever flips signs. This is what Larq does: Bop keeps a
QuantConv2D's kernel at +-1, and a scale, if any, is a separate variable. For these layers the
scale alpha_c = mean|W_c| is then exactly 1 for the rest of training (the layer computes
op(x, sign(W)); a BatchNorm after it absorbs any per-channel scale, and in training mode its output
does not change when its input is multiplied by a positive per-channel factor). Two consequences
are made explicit:
  - the scale is detached (`detach_scale = True` on those quantizers): otherwise autograd adds
    (1/n) sign(W_i) sum_j G_j sign(W_j) (G = dL/dW~) to every weight's gradient, a signal for a
    magnitude that Bop cannot change. Then g = G * est'(W) with est'(+-1) required to be 1
    (clipped_ste, identity): g is the gradient w.r.t. the binary weight, as in Larq;
  - latent clipping does not touch them (`qat.latent.mark_latent_free`): there is no latent weight.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

import qat.latent
from layers import METHODS, QuantizedLayer
from qat.train.errors import ConfigError


def bop_methods() -> list[str]:
    """The methods whose weights Bop can train: 1-bit weights coded as plain sign(W) (from the
    method table: a quantizer class whose `is_plain_sign` is the constant True)."""
    return [m.name for m in METHODS.values()
            if m.weight_quantizer.bits == 1 and m.weight_quantizer.is_plain_sign is True]


class Bop(torch.optim.Optimizer):
    """The update of the module docstring over parameters that hold +-1 values.

    State per parameter: `momentum` (m). `step_metrics()` gives the share of managed weights the
    last step flipped (`train/bop_flip_ratio`), kept on the device until asked for."""

    def __init__(self, params, gamma: float = 1e-4, threshold: float = 1e-8):
        def number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not (number(gamma) and 0.0 < gamma <= 1.0):
            raise ConfigError(f"optim.gamma must be in (0, 1], got {gamma!r}")
        if not (number(threshold) and threshold >= 0.0):
            raise ConfigError(f"optim.threshold must be >= 0, got {threshold!r}")
        super().__init__(params, {"lr": float(gamma), "threshold": float(threshold)})
        self.last_flips: torch.Tensor | None = None
        self.managed = sum(p.numel() for group in self.param_groups for p in group["params"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flips = []
        for group in self.param_groups:
            gamma, tau = group["lr"], group["threshold"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                state = self.state[w]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                m = state["momentum"]
                m.mul_(1.0 - gamma).add_(w.grad, alpha=gamma)
                flip = torch.where(w >= 0, m, -m) > tau  # sign(w) m > tau, sign(0) = +1
                w.copy_(torch.where(flip, -w, w))
                flips.append(flip.sum())
        self.last_flips = torch.stack(flips).sum() if flips else None
        return loss

    def step_metrics(self) -> dict[str, float]:
        """{'train/bop_flip_ratio': flips of the last step / managed weights} (empty before a step)."""
        if self.last_flips is None:
            return {}
        return {"train/bop_flip_ratio": self.last_flips.item() / self.managed}


def prepare_binary_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights Bop trains (module docstring), set to sign(W) with a detached scale and marked
    latent-free. ConfigError when there are none, when a 1-bit layer's code is not sign(W), or when
    a layer's weight estimator does not pass the gradient at +-1 unchanged."""
    managed = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantizedLayer) or layer.weight_quantizer.bits != 1:
            continue
        quantizer = layer.weight_quantizer
        if not quantizer.is_plain_sign:
            raise ConfigError(f"optim=bop cannot train layer {name!r} (method {layer.method}): its 1-bit code is "
                              f"not sign(W), Bop only flips signs; methods it can train: {', '.join(bop_methods())}")
        at_unit = quantizer.estimator.grad(torch.tensor([-1.0, 1.0]))
        if not torch.equal(at_unit, torch.ones(2)):
            raise ConfigError(
                f"optim=bop: layer {name!r}: weight estimator {quantizer.estimator.name!r} has derivative "
                f"{at_unit.tolist()} at w = -1, +1, so the gradient Bop averages is not dL/dw; add "
                f"+quant.weight_estimator=clipped_ste (or identity)")
        with torch.no_grad():
            layer.weight.copy_(torch.where(layer.weight >= 0, 1.0, -1.0))
        if hasattr(quantizer, "detach_scale"):
            quantizer.detach_scale = True
        qat.latent.mark_latent_free(layer.weight)
        managed.append(layer.weight)
    if not managed:
        methods = sorted({getattr(m, "method", "fp") for m in model.modules() if isinstance(m, QuantizedLayer)})
        raise ConfigError(f"optim=bop found no layer with 1-bit sign(W) weights to train (quantized methods in "
                          f"this model: {', '.join(methods) or 'none'}); use quant= one of {', '.join(bop_methods())}, "
                          f"or another optim")
    return managed


def bop_config(cfg: Any) -> dict[str, float]:
    """Bop's keyword arguments from `optim.gamma` and `optim.threshold` (checked by Bop)."""
    return {"gamma": cfg.get("gamma", 1e-4), "threshold": cfg.get("threshold", 1e-8)}
