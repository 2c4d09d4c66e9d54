"""The method table: the one place that knows what a quantization method is.

A row names the method's weight and input quantizers (their ``bits`` give the method's bit widths:
no input quantizer means float inputs, a 1-bit one binary inputs, an 8-bit one BitNet's int8
activations), its default estimators, the method a layer with float inputs falls back to (the first
layer of ``mnist_bnn``), how the optimizer treats its latent weights, and options of the layer
itself. Everything else derives from it: the drop-in classes (``layers.dropin``),
``qat.quantize_model``, the config resolvers, the training diagnostics and labels, and the tests'
method lists. Adding a method is its quantizer, one row here and
``configs/quant/<name>.yaml``.

| method          | weights                        | inputs          | default estimator    | latent weights           |
|-----------------|--------------------------------|-----------------|----------------------|--------------------------|
| bwn             | alpha_c sign(W)                | float           | clipped_ste          | clip [-1, 1], no wd      |
| xnor            | alpha_c sign(W)                | sign(x) [* K]   | clipped_ste          | clip [-1, 1], no wd      |
| ternary         | TWN alpha T                    | float           | identity             | wd (TWN trains with wd)  |
| ternary24       | TWN alpha T, 2 of every 4 kept | float           | identity             | wd                       |
| hq              | unit ternary t^_c              | float           | identity             | wd                       |
| fda             | sign(W)+NAM, mean|W_c|         | sign(x)+NAM     | fourier              | wd (paper: SGD, wd 1e-4) |
| irnet           | Libra-PB 2^s_c sign(W^_c)      | sign(x)         | ede                  | wd (standardised)        |
| irnet_w         | Libra-PB 2^s_c sign(W^_c)      | float           | ede                  | wd                       |
| reactnet        | mean|W_c| sign(W), detached    | sign(x - a_c)   | clipped_ste / approx_sign | no wd (stage 2)     |
| reactnet_stage1 | float                          | sign(x - a_c)   | - / approx_sign      | wd (stage 1: 1e-5)       |
| dirnet          | IMB (Libra-PB) 2^s_c sign(W^_c)| sign(x)         | dte                  | wd (standardised)        |
| bitnet158       | absmean ternary gamma T        | int8 RMSNorm(x) | identity             | wd                       |
| bitnet158_w     | absmean ternary gamma T        | float           | identity             | wd                       |
| bitnet          | beta sign(W - mean(W))         | int8 LN(x)      | identity             | wd                       |

The bitnet rows (``layers.bitnet``): one weight scale per layer (gamma = mean|W|, beta = mean|W|),
inputs absmax-quantized to int8 per token after a parameter-free norm (``input_norm``). Their
first-layer fallback is ``fp``: BitNet keeps embeddings float, and a norm over an image's 1-3
channels per pixel would all but binarize it. ``bitnet158_w`` is b1.58's weights with float inputs
(W1.58A16, as ``irnet_w`` is IR-Net's 1/32): what the 8-bit inputs cost, measured against
``bitnet158`` with everything else equal.

| method          | weights                        | inputs          | default estimator    | latent weights           |
|-----------------|--------------------------------|-----------------|----------------------|--------------------------|
| multibit        | S_b c_b, c_b top b bits of u_8 | float           | identity             | wd                       |

The multibit row (``layers.multibit``): one latent weight, whose 8/4/2-bit, ternary and binary
codes are cascaded from one 8-bit code; ``qat.multibit`` selects the active width.

| method          | weights                        | inputs          | default estimator    | latent weights           |
|-----------------|--------------------------------|-----------------|----------------------|--------------------------|
| int8            | s_r Clip(round(W_r / s_r)), per-row absmax int8 | float | identity     | wd                       |

The int8 row (``layers.int8``): 8-bit weights for the layers a binary or ternary network keeps at
high precision (``overrides: {last: {method: int8}}``: a language model's head), and the method of
its embedding tables (``quant.embeddings: int8``, ``layers.embedding``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import quantizers as q
from .bitnet import AbsMaxActivation, AbsMeanTernaryWeight, CenteredSignWeight, LayerNormAbsMaxActivation
from .dirnet import IMBWeight
from .int8 import AbsMaxInt8Weight
from .irnet import LibraWeight
from .multibit import MultiBitWeight
from .options import Option, validate_options
from .reactnet import RSign
from .sparse_ternary import SparseTernary24Weight

#: Options every quantized layer accepts besides the method's own: estimator choices, which are a
#: registry name, a mapping {name: ..., **hyperparameters} or an Estimator object.
ESTIMATOR_OPTIONS = ("estimator", "weight_estimator", "input_estimator")


@dataclass(frozen=True)
class Method:
    name: str
    #: one line for docs: what the method computes
    summary: str
    #: the drop-in class names: <prefix>Conv2d, <prefix>Linear
    class_prefix: str
    weight_quantizer: type[q.Quantizer]
    input_quantizer: type[q.Quantizer] | None
    default_estimator: str
    #: the method of a layer whose inputs must stay float (first layer) when this one quantizes its
    #: inputs: a row name, or "fp"; None means this method itself (it has float inputs already)
    weights_only: str | None
    clip_latent: float | None
    latent_weight_decay: bool
    #: the input quantizer's default estimator when it differs from ``default_estimator``
    default_input_estimator: str | None = None
    #: options consumed by the layer itself rather than by a quantizer
    layer_options: tuple[Option, ...] = ()
    #: this method's defaults for its quantizers' options, where they differ from the quantizer's
    defaults: dict = field(default_factory=dict)

    @property
    def weight_bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def input_bits(self) -> int:
        return 32 if self.input_quantizer is None else self.input_quantizer.bits

    @property
    def binary_inputs(self) -> bool:
        """Whether the layer's inputs are binarized (1 bit): a ReLU before it would make every input +1.
        8-bit inputs (BitNet) are not binary."""
        return self.input_bits == 1

    @property
    def quantized_inputs(self) -> bool:
        """Whether the layer quantizes its inputs at all (binary or 8-bit): then a layer whose inputs must
        stay float (the first) falls back to ``weights_only``."""
        return self.input_quantizer is not None

    @property
    def options(self) -> dict[str, Option]:
        """Every option of the method (layer and quantizer options), with this method's defaults."""
        declared: dict[str, Option] = {}
        quantizers = (self.weight_quantizer, self.input_quantizer)
        for option in (*self.layer_options, *(o for cls in quantizers if cls is not None for o in cls.options)):
            if declared.setdefault(option.name, option) != option:
                raise TypeError(f"method {self.name}: two different options are called {option.name!r}")
        return {name: replace(o, default=self.defaults[name]) if name in self.defaults else o
                for name, o in declared.items()}

    def option_names(self) -> set[str]:
        return set(self.options) | set(ESTIMATOR_OPTIONS)

    def validate_options(self, given: dict) -> dict:
        """Every option's value (given or default), checked once; ValueError names a bad one."""
        return validate_options(self.options.values(), given, f"method {self.name}")

    def describe_options(self) -> str:
        lines = [f"    {o.describe()}" for o in self.options.values()]
        return "\n".join(lines) if lines else "    (none)"


def quantizer_kwargs(quantizer: type[q.Quantizer], values: dict) -> dict:
    """The validated option values that ``quantizer`` declares."""
    return {o.name: values[o.name] for o in quantizer.options}


ROWS = (
    Method("bwn", "Binary-weight network (BWN): alpha_c sign(W), float inputs.", "BWN",
           q.ScaledSignWeight, None, "clipped_ste", weights_only=None, clip_latent=1.0,
           latent_weight_decay=False),
    Method("xnor", "XNOR-Net: alpha_c sign(W) and sign(x); activation_scale=True adds the K map.", "XNOR",
           q.ScaledSignWeight, q.SignActivation, "clipped_ste", weights_only="bwn", clip_latent=1.0,
           latent_weight_decay=False,
           layer_options=(Option("activation_scale", bool, False, "multiply by XNOR-Net's K = mean|x| map"),)),
    Method("ternary", "TWN ternary weights alpha T, float inputs.", "Ternary",
           q.TernaryWeight, None, "identity", weights_only=None, clip_latent=None, latent_weight_decay=True),
    Method("ternary24", "2:4-sparse ternary weights: TWN with the 2 largest |W| of every 4 kept (ASP), float inputs.",
           "Ternary24", SparseTernary24Weight, None, "identity", weights_only=None, clip_latent=None,
           latent_weight_decay=True),
    Method("hq", "Hyperspherical ternary weights (HQ reconstruction), float inputs.", "HQ",
           q.HypersphericalTernaryWeight, None, "identity", weights_only=None, clip_latent=None,
           latent_weight_decay=True),
    Method("fda", "FDA-BNN: Fourier estimator and noise adaptation on weights and inputs.", "FDA",
           q.FourierWeight, q.FourierActivation, "fourier", weights_only="bwn", clip_latent=None,
           latent_weight_decay=True),
    Method("irnet", "IR-Net: Libra-PB weights 2^s_c sign(W^_c) and sign(x), EDE backward.", "IRNet",
           LibraWeight, q.SignActivation, "ede", weights_only="irnet_w", clip_latent=None,
           latent_weight_decay=True),
    Method("irnet_w", "IR-Net 1/32: Libra-PB weights, float inputs, EDE backward.", "IRNetW",
           LibraWeight, None, "ede", weights_only=None, clip_latent=None, latent_weight_decay=True),
    Method("reactnet", "ReActNet: mean|W_c| sign(W) (scale detached) and RSign sign(x - alpha_c).", "ReActNet",
           q.ScaledSignWeight, RSign, "clipped_ste", weights_only="bwn", clip_latent=None,
           latent_weight_decay=False, default_input_estimator="approx_sign", defaults={"detach_scale": True}),
    Method("reactnet_stage1", "ReActNet stage 1: float weights, RSign sign(x - alpha_c) inputs.",
           "ReActNetStage1", q.FloatWeight, RSign, "identity", weights_only="fp", clip_latent=None,
           latent_weight_decay=True, default_input_estimator="approx_sign"),
    Method("dirnet", "DIR-Net: IMB weights 2^s_c sign(W^_c) and sign(x), DTE backward (RBD: qat.rbd).", "DIRNet",
           IMBWeight, q.SignActivation, "dte", weights_only="irnet_w", clip_latent=None,
           latent_weight_decay=True),
    Method("bitnet158", "BitNet b1.58: absmean ternary weights (one scale per layer), int8 per-token absmax "
           "inputs after a parameter-free RMSNorm, STE.", "BitNet158",
           AbsMeanTernaryWeight, AbsMaxActivation, "identity", weights_only="fp", clip_latent=None,
           latent_weight_decay=True),
    Method("bitnet158_w", "BitNet b1.58's weights only: absmean ternary weights (one scale per layer), float "
           "inputs, STE.", "BitNet158W",
           AbsMeanTernaryWeight, None, "identity", weights_only=None, clip_latent=None, latent_weight_decay=True),
    Method("bitnet", "BitNet: centred binary weights beta sign(W - mean W) (one scale per layer), int8 per-token "
           "absmax inputs after a parameter-free LayerNorm, STE.", "BitNet",
           CenteredSignWeight, LayerNormAbsMaxActivation, "identity", weights_only="fp", clip_latent=None,
           latent_weight_decay=True),
    Method("multibit", "Vertical-layered multi-bit weights: 8/4/2-bit, ternary, binary codes cascaded from one "
           "8-bit code (qat.multibit selects the width), float inputs.", "MultiBit",
           MultiBitWeight, None, "identity", weights_only=None, clip_latent=None, latent_weight_decay=True),
    Method("int8", "8-bit weights: per-row symmetric absmax int8 codes times one float scale per row, float "
           "inputs, STE.", "Int8",
           AbsMaxInt8Weight, None, "identity", weights_only=None, clip_latent=None, latent_weight_decay=True),
)

METHODS: dict[str, Method] = {m.name: m for m in ROWS}
#: ``fp`` means "leave the layer float"; it has no Method entry.
METHOD_NAMES = ("fp", *METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; valid methods: {', '.join(METHOD_NAMES)}")
    return METHODS[name]


def method_bits(name: str) -> tuple[int, int]:
    """(weight bits, activation bits) of a method name, e.g. xnor -> (1, 1), fp -> (32, 32)."""
    if name == "fp":
        return 32, 32
    method = get_method(name)
    return method.weight_bits, method.input_bits


def binary_inputs(name: str) -> bool:
    """Whether ``name``'s layers binarize their inputs to 1 bit (fp and 8-bit inputs: no)."""
    return name != "fp" and get_method(name).binary_inputs


def weights_only_method(name: str) -> str:
    """The method for a layer of a ``name`` network whose inputs stay float: xnor -> bwn, irnet ->
    irnet_w, bitnet158 -> fp, a method with float inputs -> itself."""
    if name == "fp":
        return name
    return get_method(name).weights_only or name
