"""Per-layer diagnostics of binary / ternary training, for the loggers.

For every quantized layer (`layers.QuantizedLayer`), depending on its method:
  flip_ratio     (bwn, xnor, fda)  share of weights whose sign changed since the previous call:
                 mean(sign(Q_t) != sign(Q_prev)), sign(0) = +1; absent at the first call
  zero_fraction  (ternary, hq)     mean(Q == 0) of the ternary weights
  clip_fraction  (all)             share of latent weights at the clip boundary, mean(|W| >= 1)
  cosine_similarity, sparsity (hq) and terms, noise_weight (fda): the layer's own properties
Snapshots are kept as int8 on the weights' device.
"""
from __future__ import annotations

import torch
import torch.nn as nn

BINARY_METHODS = ("bwn", "xnor", "fda")
TERNARY_METHODS = ("ternary", "hq")
LAYER_PROPERTIES = {"hq": ("cosine_similarity", "sparsity"), "fda": ("terms", "noise_weight")}


def quantized_layers(model: nn.Module):
    """(name, module) for every quantized layer of `model` (empty when layers is not installed)."""
    try:
        from layers import QuantizedLayer
    except ImportError:
        return []
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
            method = getattr(layer, "method", "")
            prefix = f"diag/{name}"
            quantized = layer.quantized_weight()
            if method in BINARY_METHODS:
                signs = torch.where(quantized >= 0, 1, -1).to(torch.int8)
                if name in self.previous_signs:
                    metrics[f"{prefix}/flip_ratio"] = _as_float(
                        (signs != self.previous_signs[name]).float().mean())
                self.previous_signs[name] = signs
            if method in TERNARY_METHODS:
                metrics[f"{prefix}/zero_fraction"] = _as_float((quantized == 0).float().mean())
            metrics[f"{prefix}/clip_fraction"] = _as_float((layer.weight.abs() >= 1).float().mean())
            for attribute in LAYER_PROPERTIES.get(method, ()):
                if hasattr(layer, attribute):
                    metrics[f"{prefix}/{attribute}"] = _as_float(getattr(layer, attribute))
        return metrics
