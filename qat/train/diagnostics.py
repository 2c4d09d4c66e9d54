"""Per-layer diagnostics of binary / ternary training, for the loggers.

For every quantized layer (`layers.QuantizedLayer`), by its weights' bit width:
  flip_ratio     (1-bit weights)  share of weights whose sign changed since the previous call:
                 mean(sign(Q_t) != sign(Q_prev)), sign(0) = +1; absent at the first call
  zero_fraction  (2-bit weights)  mean(Q == 0) of the ternary weights
  clip_fraction  (all)            share of latent weights at the clip boundary, mean(|W| >= 1);
                                  absent for latent-free weights (Bop: W is +-1, there is no latent)
and whatever the layer's quantizers report themselves (`QuantizedLayer.diagnostics()`: HQ's
cosine_similarity and sparsity, FDA's terms and noise_weight, ...). Snapshots are kept as int8 on
the weights' device.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from layers import QuantizedLayer
from qat.latent import is_latent_free


def quantized_layers(model: nn.Module):
    """(name, module) for every quantized layer of `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)]


def _as_float(value) -> float:
    return float(value.detach().float().item()) if torch.is_tensor(value) else float(value)


class LayerDiagnostics:
    def __init__(self, model: nn.Module):
        self.layers = quantized_layers(model)
        self.previous_signs: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def collect(self) -> dict[str, float]:
        """{'diag/<layer>/<metric>': value} for every quantized layer."""
        metrics: dict[str, float] = {}
        for name, layer in self.layers:
            prefix = f"diag/{name}"
            quantized = layer.quantized_weight()
            if layer.weight_bits == 1:
                signs = torch.where(quantized >= 0, 1, -1).to(torch.int8)
                if name in self.previous_signs:
                    metrics[f"{prefix}/flip_ratio"] = _as_float(
                        (signs != self.previous_signs[name]).float().mean())
                self.previous_signs[name] = signs
            if layer.weight_bits == 2:
                metrics[f"{prefix}/zero_fraction"] = _as_float((quantized == 0).float().mean())
            if not is_latent_free(layer.weight):  # a Bop-trained weight is +-1: no latent to clip
                metrics[f"{prefix}/clip_fraction"] = _as_float((layer.weight.abs() >= 1).float().mean())
            for key, value in layer.diagnostics().items():
                metrics[f"{prefix}/{key}"] = _as_float(value)
        return metrics
