"""How the optimizer treats latent weights: weight decay groups and clipping, per method.

Sign+clip binarizers (BWN, XNOR; Hubara et al., Bi-Real, ReActNet) train with no weight decay on
the binary latent weights and clip them to [-1, 1] after every step; the other methods keep weight
decay (their papers train with it). Biases and normalisation parameters (1-D tensors) never get
weight decay.
"""
from __future__ import annotations

import torch
from torch import nn

from layers import QuantizedLayer


def _latent_weights_without_decay(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules()
            if isinstance(m, QuantizedLayer) and not m.method_spec.latent_weight_decay}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: decayed parameters and the rest (binary latent weights, 1-D params)."""
    no_decay_ids = _latent_weights_without_decay(model)
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if id(p) in no_decay_ids or p.dim() <= 1 else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


@torch.no_grad()
def clip_latent_weights(model: nn.Module) -> None:
    """Clip latent weights of the methods that ask for it (W <- clip(W, -c, c)); call after step()."""
    for m in model.modules():
        if isinstance(m, QuantizedLayer) and m.method_spec.clip_latent is not None:
            c = m.method_spec.clip_latent
            m.weight.clamp_(-c, c)
