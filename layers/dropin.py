"""The ten drop-in classes: a method (``layers.methods``) crossed with a layer type
(``layers.quantized``). HQ and FDA layers add read-only diagnostics for logging."""
from __future__ import annotations

from . import methods
from .quantized import QuantizedConv2d, QuantizedLinear


class HypersphericalDiagnostics:
    """HQ: the current zero fraction of the ternary weight and cos(w^, t^) (mean over filters)."""

    @property
    def sparsity(self) -> float:
        return self.weight_quantizer.stats(self.weight)["sparsity"]

    @property
    def cosine_similarity(self) -> float:
        return self.weight_quantizer.stats(self.weight)["cosine_similarity"]

    @property
    def target_sparsity(self) -> float:
        return self.weight_quantizer.target_sparsity


class FourierDiagnostics:
    """FDA: the current number of Fourier terms n and the noise-adaptation weight alpha."""

    @property
    def terms(self) -> int:
        return self.weight_quantizer.estimator.terms

    @property
    def noise_weight(self) -> float:
        return self.weight_quantizer.noise_weight


class BWNConv2d(QuantizedConv2d):
    """Binary-weight conv (BWN): alpha_c sign(W), float inputs."""
    method_spec = methods.BWN


class BWNLinear(QuantizedLinear):
    """Binary-weight linear (BWN): alpha_c sign(W), float inputs."""
    method_spec = methods.BWN


class XNORConv2d(QuantizedConv2d):
    """XNOR-Net conv: alpha_c sign(W) and sign(x); ``activation_scale=True`` adds the K map."""
    method_spec = methods.XNOR


class XNORLinear(QuantizedLinear):
    """XNOR-Net linear: alpha_c sign(W) and sign(x); ``activation_scale=True`` adds beta = mean|x|."""
    method_spec = methods.XNOR


class TernaryConv2d(QuantizedConv2d):
    """TWN ternary-weight conv: alpha T, float inputs."""
    method_spec = methods.TERNARY


class TernaryLinear(QuantizedLinear):
    """TWN ternary-weight linear: alpha T, float inputs."""
    method_spec = methods.TERNARY


class HQConv2d(HypersphericalDiagnostics, QuantizedConv2d):
    """Hyperspherical ternary conv (HQ reconstruction), float inputs."""
    method_spec = methods.HQ


class HQLinear(HypersphericalDiagnostics, QuantizedLinear):
    """Hyperspherical ternary linear (HQ reconstruction), float inputs."""
    method_spec = methods.HQ


class FDAConv2d(FourierDiagnostics, QuantizedConv2d):
    """FDA-BNN conv: Fourier estimator and noise adaptation on weights and inputs."""
    method_spec = methods.FDA


class FDALinear(FourierDiagnostics, QuantizedLinear):
    """FDA-BNN linear: Fourier estimator and noise adaptation on weights and inputs."""
    method_spec = methods.FDA


#: (method name, float layer type) -> drop-in class, the map ``qat.quantize_model`` swaps with.
LAYER_CLASSES = {
    (cls.method_spec.name, cls.float_type): cls
    for cls in (BWNConv2d, BWNLinear, XNORConv2d, XNORLinear, TernaryConv2d, TernaryLinear,
                HQConv2d, HQLinear, FDAConv2d, FDALinear)
}
