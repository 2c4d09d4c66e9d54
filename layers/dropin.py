"""The drop-in classes: every row of the method table (``layers.methods``) crossed with the two layer
types (``layers.quantized``), generated, never written out by hand:

    XNORConv2d, XNORLinear, BWNConv2d, ..., <class_prefix><Conv2d|Linear> for each method.

Each takes its float base class's constructor arguments plus the method's options; its docstring
(``help(XNORConv2d)``) lists them with their types, defaults and rules.
"""
from __future__ import annotations

from torch import nn

from .methods import ESTIMATOR_OPTIONS, METHODS, Method
from .quantized import QuantizedConv2d, QuantizedLayer, QuantizedLinear

LAYER_TYPES = (QuantizedConv2d, QuantizedLinear)


def dropin_class(method: Method, layer_type: type[QuantizedLayer]) -> type[QuantizedLayer]:
    float_name = layer_type.float_type.__name__
    name = f"{method.class_prefix}{float_name}"
    estimators = (f"default {method.default_estimator}" if method.default_input_estimator is None else
                  f"default {method.default_estimator} for weights, {method.default_input_estimator} for inputs")
    doc = (f"{method.summary}\n\nA drop-in nn.{float_name} (same arguments; a float layer's state_dict loads as is) "
           f"of method {method.name!r}: {method.weight_bits}-bit weights, "
           f"{method.input_bits}-bit inputs.\n\nKeyword options:\n"
           f"    {', '.join(ESTIMATOR_OPTIONS)}: an estimator name, mapping or object ({estimators})\n"
           f"{method.describe_options()}\n")
    return type(name, (layer_type,), {"method_spec": method, "__doc__": doc, "__module__": __name__,
                                      "__qualname__": name})


#: (method name, float layer type) -> drop-in class, the map ``qat.quantize_model`` swaps with.
LAYER_CLASSES: dict[tuple[str, type[nn.Module]], type[QuantizedLayer]] = {
    (method.name, layer_type.float_type): dropin_class(method, layer_type)
    for method in METHODS.values() for layer_type in LAYER_TYPES
}
globals().update({cls.__name__: cls for cls in LAYER_CLASSES.values()})
__all__ = ["LAYER_CLASSES", "dropin_class", *(cls.__name__ for cls in LAYER_CLASSES.values())]
