"""How the optimizer treats latent weights: weight decay groups and clipping, per method.

Sign+clip binarizers (BWN, XNOR; Hubara et al., Bi-Real, ReActNet) train with no weight decay on
the binary latent weights and clip them to [-1, 1] after every step; the other methods keep weight
decay (their papers train with it). Biases and normalisation parameters (1-D tensors) never get
weight decay, nor the parameters a model names in ``no_weight_decay()`` (timm's convention: a set of
parameter names, e.g. a ViT's position embedding).

A weight an optimizer trains without a latent copy (Bop, `qat.train.bop`: the weight *is* the
binary value) is marked latent-free (`mark_latent_free`) and never clipped.
"""
from __future__ import annotations

from typing import Collection

import torch
from torch import nn

from layers import QuantizedLayer


def _latent_weights_without_decay(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules()
            if isinstance(m, QuantizedLayer) and not m.method_spec.latent_weight_decay}


def _named_without_decay(model: nn.Module) -> set[int]:
    names = model.no_weight_decay() if callable(getattr(model, "no_weight_decay", None)) else ()
    parameters = dict(model.named_parameters())
    unknown = sorted(set(names) - parameters.keys())
    if unknown:
        raise ValueError(f"{type(model).__name__}.no_weight_decay() names no parameter {unknown}")
    return {id(parameters[name]) for name in names}


def param_groups(model: nn.Module, weight_decay: float, exclude: Collection[nn.Parameter] = ()) -> list[dict]:
    """Two optimizer groups: decayed parameters and the rest (binary latent weights, 1-D params,
    the model's ``no_weight_decay()`` names), leaving out `exclude` (parameters another optimizer trains)."""
    no_decay_ids = _latent_weights_without_decay(model) | _named_without_decay(model)
    excluded = {id(p) for p in exclude}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in excluded:
            continue
        (no_decay if id(p) in no_decay_ids or p.dim() <= 1 else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


LATENT_FREE_ATTRIBUTE = "qat_latent_free"


def mark_latent_free(weight: nn.Parameter) -> None:
    """Record that `weight` holds the quantized value itself, not a latent weight: no clipping."""
    setattr(weight, LATENT_FREE_ATTRIBUTE, True)


def is_latent_free(weight: torch.Tensor) -> bool:
    return bool(getattr(weight, LATENT_FREE_ATTRIBUTE, False))


@torch.no_grad()
def clip_latent_weights(model: nn.Module) -> None:
    """Clip latent weights of the methods that ask for it (W <- clip(W, -c, c)); call after step().
    Latent-free weights are left alone."""
    for m in model.modules():
        if (isinstance(m, QuantizedLayer) and m.method_spec.clip_latent is not None
                and not is_latent_free(m.weight)):
            c = m.method_spec.clip_latent
            m.weight.clamp_(-c, c)
