"""Quantizers and the drop-in quantized layers built from them.

    >>> from layers import XNORConv2d
    >>> conv = XNORConv2d(64, 128, 3, padding=1, bias=False, estimator="approx_sign")
    >>> conv.load_state_dict(float_conv.state_dict())
    >>> conv.quantized_weight()   # alpha_c * sign(W), what the forward uses

One class per method and layer type (``<prefix>Conv2d``, ``<prefix>Linear``), generated from the
method table ``layers.methods``; ``LAYER_CLASSES`` maps (method, float type) to them.
``QuantizedEmbedding`` (``layers.embedding``) is the quantized ``nn.Embedding`` (method ``int8``).
"""
from . import dropin, quantizers
from .dropin import LAYER_CLASSES
from .embedding import EMBEDDING_METHODS, QuantizedEmbedding
from .methods import METHOD_NAMES, METHODS, Method, binary_inputs, get_method, method_bits, weights_only_method
from .noise_adaptation import NoiseAdaptation
from .options import Option
from .quantized import QuantizedConv2d, QuantizedLayer, QuantizedLinear

globals().update({cls.__name__: cls for cls in LAYER_CLASSES.values()})

__all__ = [*(cls.__name__ for cls in LAYER_CLASSES.values()), "QuantizedLayer", "QuantizedConv2d",
           "QuantizedLinear", "QuantizedEmbedding", "EMBEDDING_METHODS",
           "LAYER_CLASSES", "METHODS", "METHOD_NAMES", "Method", "Option", "get_method",
           "method_bits", "binary_inputs", "weights_only_method", "NoiseAdaptation", "quantizers", "dropin"]
