"""Quantizers and the drop-in quantized layers built from them.

    >>> from layers import XNORConv2d
    >>> conv = XNORConv2d(64, 128, 3, padding=1, bias=False, estimator="approx_sign")
    >>> conv.load_state_dict(float_conv.state_dict())
    >>> conv.quantized_weight()   # alpha_c * sign(W), what the forward uses
"""
from .dropin import (LAYER_CLASSES, BWNConv2d, BWNLinear, FDAConv2d, FDALinear, HQConv2d, HQLinear,
                     TernaryConv2d, TernaryLinear, XNORConv2d, XNORLinear)
from .methods import METHOD_NAMES, METHODS, Method, get_method, method_bits
from .noise_adaptation import NoiseAdaptation
from .quantized import QuantizedConv2d, QuantizedLayer, QuantizedLinear
from . import quantizers

__all__ = ["XNORConv2d", "XNORLinear", "BWNConv2d", "BWNLinear", "TernaryConv2d", "TernaryLinear",
           "HQConv2d", "HQLinear", "FDAConv2d", "FDALinear", "QuantizedLayer", "QuantizedConv2d",
           "QuantizedLinear", "LAYER_CLASSES", "METHODS", "METHOD_NAMES", "Method", "get_method",
           "method_bits", "NoiseAdaptation", "quantizers"]
