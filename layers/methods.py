"""The method table: what each quantization method builds for a layer, and how its latent weights
are treated by the optimizer. The drop-in layers and ``qat.quantize_model`` both read it.

| method  | weights               | activations     | default estimator | latent weights           |
|---------|-----------------------|-----------------|-------------------|--------------------------|
| bwn     | alpha_c sign(W)       | float           | clipped_ste       | clip [-1, 1], no wd      |
| xnor    | alpha_c sign(W)       | sign(x) [* K]   | clipped_ste       | clip [-1, 1], no wd      |
| ternary | TWN alpha T           | float           | identity          | wd (TWN trains with wd)  |
| hq      | unit ternary t^_c     | float           | identity          | wd                       |
| fda     | sign(W)+NAM, mean|W_c|| sign(x)+NAM    | fourier           | wd (paper: SGD, wd 1e-4) |
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable


from . import quantizers as q

#: Options every quantized layer accepts besides the method's own.
COMMON_OPTIONS = ("estimator", "weight_estimator", "input_estimator")


@dataclass(frozen=True)
class Method:
    name: str
    weight_bits: int
    input_bits: int
    default_estimator: str
    weight_quantizer: type[q.Quantizer]
    input_quantizer: type[q.Quantizer] | None
    clip_latent: float | None
    latent_weight_decay: bool
    #: method options consumed by the layer itself rather than a quantizer
    layer_options: tuple[str, ...] = ()

    def option_names(self) -> set[str]:
        names = set(self.layer_options) | set(COMMON_OPTIONS)
        for quantizer in (self.weight_quantizer, self.input_quantizer):
            if quantizer is not None:
                names |= set(inspect.signature(quantizer.__init__).parameters) - {"self", "estimator", "features", "device", "dtype"}
        return names


BWN = Method("bwn", 1, 32, "clipped_ste", q.ScaledSignWeight, None, clip_latent=1.0, latent_weight_decay=False)
XNOR = Method("xnor", 1, 1, "clipped_ste", q.ScaledSignWeight, q.SignActivation, clip_latent=1.0,
              latent_weight_decay=False, layer_options=("activation_scale",))
TERNARY = Method("ternary", 2, 32, "identity", q.TernaryWeight, None, clip_latent=None, latent_weight_decay=True)
HQ = Method("hq", 2, 32, "identity", q.HypersphericalTernaryWeight, None, clip_latent=None, latent_weight_decay=True)
FDA = Method("fda", 1, 1, "fourier", q.FourierWeight, q.FourierActivation, clip_latent=None, latent_weight_decay=True)

METHODS: dict[str, Method] = {m.name: m for m in (BWN, XNOR, TERNARY, HQ, FDA)}
#: ``fp`` means "leave the layer float"; it has no Method entry.
METHOD_NAMES = ("fp", *METHODS)


def method_bits(name: str) -> tuple[int, int]:
    """(weight bits, activation bits) of a method name, e.g. xnor -> (1, 1), fp -> (32, 32)."""
    if name == "fp":
        return 32, 32
    return get_method(name).weight_bits, get_method(name).input_bits


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; valid methods: {', '.join(METHOD_NAMES)}")
    return METHODS[name]


def split_options(quantizer: Callable, options: dict) -> dict:
    """The subset of ``options`` that ``quantizer``'s constructor takes."""
    accepted = inspect.signature(quantizer.__init__).parameters
    return {k: v for k, v in options.items() if k in accepted}
