"""The framework around the layers: config-driven layer swap, training progress, model summary,
latent-weight handling, compressed activations for backward (and, in submodules, models, data,
the trainer and packed export).

    >>> import qat, torchvision
    >>> model = qat.quantize_model(torchvision.models.resnet18(), {"method": "xnor"})
    >>> qat.set_progress(model, 0.5)
    >>> print(qat.summary(model, (3, 224, 224)))
"""
from layers import method_bits

from . import latent
from .act_compression import set_act_compression
from .progress import set_progress
from .summary import LayerProfile, ModelSummary, summary
from .swap import quantize_model, resolve_layer_specs

__all__ = ["quantize_model", "resolve_layer_specs", "set_progress", "summary", "ModelSummary",
           "LayerProfile", "method_bits", "latent", "set_act_compression"]
