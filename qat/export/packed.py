"""Packed inference models: ``pack_model``, ``save_packed``, ``load_packed``.

``pack_model(model)`` turns a trained quantized model into an inference model in which every
binary and ternary layer holds its weight as bits (``kernels.pack_bits`` / ``pack_ternary``, 64-bit
words along K = C_in/groups * kh * kw, bit 1 = -1; 2:4-sparse ternary layers, whose quantizer names
``packed_format = "ternary24"``, in ``kernels.sparse24``'s 4/3-bit format along the tap-major K)
plus one float32 scale per output channel (one per layer for per-layer TWN), and nothing else of
the latent weight. Every quantized weight has
the form ``W_q[c] = scale[c] * code[c]`` with code in {-1, +1} (BWN, XNOR, FDA) or {-1, 0, +1}
(TWN, HQ), or odd b-bit integers (the multi-bit method at 8, 4 or 2 bits: ``qat.export.intcodes``,
stored at b bits per weight and unpacked to the float op), or signed 8-bit integers with one scale
per row (the ``int8`` method, ``layers.int8``: format ``sint8``); ``pack_model`` checks that the
codes and scales rebuild ``quantized_weight()`` exactly.

How a packed layer computes:
- binary inputs (XNOR, FDA): the exact integer accumulator of the +-1 inputs and weights,
  ``acc = kernels.binary_conv2d(x, bits)`` (zero padding reproduced exactly by the kernel's
  correction term) or ``kernels.binary_matmul``, then ``y = scale[c] * acc + bias[c]``
  (times XNOR's K map when the layer used it). A grouped conv (``groups`` = G, depthwise
  included) runs the kernel once per group on that group's C_in/G input channels and C_out/G
  filters and concatenates the G accumulators along the channels, which is what grouped
  convolution is by definition. The training layer computes the same ``scale[c] * acc + bias[c]``
  from the same exact integers (``layers.quantized``), so without BatchNorm folding the outputs
  are bit-identical; folding changes the rounding only (``kernels.fold_bn``).
  On CPU with float32 inputs the native engine (``kernels.cpu_native``) does all of it in two
  calls: pack the input's signs (NHWC, per group), then a direct convolution (or matmul) over the
  packed weights, prepacked once per layer, whose output transform writes ``scale * acc + bias``
  as float32 with the same two roundings, so its output is bit-identical to the path above.
- float inputs (BWN, TWN, HQ): the weight is unpacked to ``scale * code`` on every call (so the
  model stays 1/32 or 1/16 of float in memory) and the float conv/linear runs; outputs are
  bit-identical to the training layer's, since the unpacked weight is bit-identical.
- 8-bit inputs (BitNet, BitNet b1.58; spec ``input_bits`` 8, ``input_norm`` "rms" | "layer" | ""):
  ``int8_input(x)`` normalizes x and returns its int8 codes and per-token float steps
  (``layers.bitnet``), the inputs an int8 x ternary/binary kernel takes; the layer then runs the
  training layer's ops on them and the unpacked code, ``op(codes, code) * (step * scale) + bias``
  (a linear layer's exact integer sums; ``QuantizedLayer.integer_input_output``), so outputs are
  bit-identical to the training layer's. A linear layer with RMSNorm or no norm, per-token steps and
  one weight scale runs instead, on CPU with float32 inputs, the native engine's whole BitLinear
  (``kernels.cpu_native.TernaryI8Linear``, built once per layer: the norm, the int8 codes, the
  int8 x ternary/binary integer product and the same float epilogue in one call), which computes
  every rounding as ``layers.bitnet`` does, so it is bit-identical too. LayerNorm (BitNet's),
  per-tensor steps and convolutions keep the torch ops.
- quantized embedding tables (``layers.QuantizedEmbedding``, method ``int8``): ``PackedEmbedding``
  holds the int8 codes and one float32 scale per row; lookups read the table code * scale (built at
  the first lookup and kept), the training lookup's values (``quantized_weight()[idx]``) bit for bit.
Float layers (first/last, BatchNorm, embeddings left float, ...) are kept as they are.

``save_packed`` writes one safetensors file: the packed codes, scales, every float parameter and
buffer, and metadata: format tag, per-layer geometry, the model's ``qat.models`` architecture
(recorded by ``qat.models.build`` on the model itself) from which ``load_packed`` rebuilds a ready
model, and a SHA-256 checksum of all of it (``checksum``) that ``load_packed`` verifies.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from estimators import sign
from kernels import cpu_native, native
from kernels.sparse24 import from_tap_major, tap_major, ternary24_row_bytes
from layers import QuantizedConv2d, QuantizedEmbedding, QuantizedLayer, QuantizedLinear
from layers.bitnet import NORM_EPS, absmax_codes, normalize
from layers.quantized import conv_input_scale, linear_input_scale

from ..modules import replace_submodule
from ..multibit import keep_active_width
from .intcodes import int_format_bits, is_signed_format, pack_int_codes, row_bytes, unpack_int_codes

FORMAT = "bitqat-packed/1"


@dataclass
class PackedSpec:
    """Everything needed to rebuild one packed layer (stored as JSON in the file's metadata)."""

    kind: str  # "conv" | "linear" | "embedding" (out_features = rows, in_features = embedding_dim)
    code: str  # "binary" | "ternary" | "ternary24" | "int8" | "int4" | "int2" | "sint8" (qat.export.intcodes)
    in_features: int
    out_features: int
    bias: bool
    binary_input: bool
    activation_scale: bool = False
    shared_scale: bool = False
    method: str = ""
    kernel_size: tuple = (1, 1)
    stride: tuple = (1, 1)
    padding: tuple | str = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"
    folded_batchnorm: bool = False
    #: binary inputs are sign(x - threshold_c) (ReActNet's RSign), not sign(x)
    input_threshold: bool = False
    #: the training layer's input bits: 1 (binary), 8 (BitNet's int8 codes) or 32 (float)
    input_bits: int = 32
    #: the parameter-free normalization before 8-bit input quantization: "rms", "layer" or ""
    input_norm: str = ""
    #: 8-bit inputs: one absmax step per "token" or per "tensor"
    input_granularity: str = "token"

    @property
    def k(self) -> int:
        """Elements per output channel: C_in/groups * kh * kw, or in_features."""
        if self.kind != "conv":
            return self.in_features
        return self.in_features // self.groups * math.prod(self.kernel_size)

    @property
    def weight_shape(self) -> tuple:
        if self.kind != "conv":
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features // self.groups, *self.kernel_size)


class PackedLayer(nn.Module):
    """Base of the packed inference layers; subclasses add the geometry (conv or linear)."""

    def __init__(self, spec: PackedSpec):
        super().__init__()
        self.spec = spec
        int_bits = int_format_bits(spec.code)
        if spec.code == "ternary24" or int_bits:
            width = row_bytes(spec.k, int_bits) if int_bits else ternary24_row_bytes(spec.k)
            self.register_buffer("weight_codes", torch.zeros(spec.out_features, width, dtype=torch.uint8))
        else:
            words = kernels.packed_words(spec.k)
            planes = ("weight_bits",) if spec.code == "binary" else ("weight_sign", "weight_nonzero")
            for plane in planes:
                self.register_buffer(plane, torch.zeros(spec.out_features, words, dtype=torch.int64))
        self.register_buffer("scale", torch.zeros(1 if spec.shared_scale else spec.out_features))
        self.register_buffer("bias", torch.zeros(spec.out_features) if spec.bias else None)
        self.register_buffer("input_threshold", torch.zeros(spec.in_features) if spec.input_threshold else None)
        self._native = None  # native_weights() / native_int8_layer() cache

    @classmethod
    def from_quantized(cls, layer: QuantizedLayer) -> "PackedLayer":
        for quantizer in (layer.weight_quantizer, layer.input_quantizer):
            if getattr(quantizer, "noise_weight", 0.0) != 0.0:
                raise ValueError(f"{type(layer).__name__} still has a noise-adaptation weight of "
                                 f"{quantizer.noise_weight:g}; call qat.set_progress(model, 1.0) before packing")
        spec = cls.spec_of(layer)
        if spec.code == "ternary24" and not layer.weight_quantizer.pruned:
            raise ValueError(f"{type(layer).__name__} has not reached its "
                             f"prune_at={layer.weight_quantizer.prune_at:g}, so "
                             f"its weight is dense ternary, not 2:4; call qat.set_progress(model, 1.0) before packing")
        with torch.no_grad():
            quantized = layer.quantized_weight().detach().float().flatten(1)
        int_bits = int_format_bits(spec.code)
        if int_bits:  # multi-bit codes: the quantizer's own (code, scale), checked below like the others
            code, scale = layer.weight_quantizer.codes(layer.weight.detach())
            code, scale = code.float().flatten(1), scale.float()
        else:
            code = torch.sign(quantized) if layer.weight_bits == 2 else sign(quantized)
            scale = quantized.abs().amax(dim=1)
            if spec.shared_scale:
                scale = scale.amax().reshape(1)
        if not torch.equal(code * scale.unsqueeze(1), quantized):
            codes = ("signed integers" if is_signed_format(spec.code) else "odd integers") if int_bits \
                else "{-1, 0, +1}"
            raise ValueError(f"{type(layer).__name__}'s quantized weight is not scale[c] * code with "
                             f"code in {codes}; it cannot be packed")
        packed = cls(spec)
        if int_bits:
            packed.weight_codes.copy_(pack_int_codes(code, int_bits, signed=is_signed_format(spec.code)))
        elif spec.code == "binary":
            packed.weight_bits.copy_(kernels.pack_bits(code))
        elif spec.code == "ternary24":
            packed.weight_codes.copy_(kernels.pack_ternary24(tap_major(code.view(spec.weight_shape))))
        else:
            sign_plane, nonzero_plane = kernels.pack_ternary(code)
            packed.weight_sign.copy_(sign_plane)
            packed.weight_nonzero.copy_(nonzero_plane)
        packed.scale.copy_(scale)
        if spec.bias:
            packed.bias.copy_(layer.bias.detach())
        if spec.input_threshold:
            packed.input_threshold.copy_(layer.input_quantizer.threshold.detach())
        return packed.to(layer.weight.device)

    @staticmethod
    def common_spec(layer: QuantizedLayer) -> dict:
        code = getattr(layer.weight_quantizer, "packed_format", "binary" if layer.weight_bits == 1 else "ternary")
        spec = {"code": code, "bias": layer.bias is not None,
                "binary_input": layer.input_bits == 1, "activation_scale": layer.activation_scale,
                "shared_scale": layer.weight_quantizer.scale_count(layer.weight) == 1, "method": layer.method,
                "input_threshold": hasattr(layer.input_quantizer, "threshold"), "input_bits": layer.input_bits}
        if 1 < layer.input_bits < 32:
            if layer.input_bits != 8:
                raise ValueError(f"{type(layer).__name__} has {layer.input_bits}-bit inputs; packed layers take "
                                 f"1-bit, 8-bit (BitNet's int8) or float inputs")
            spec.update(input_norm=layer.input_quantizer.input_norm_kind,
                        input_granularity=layer.input_quantizer.input_granularity)
        return spec

    def codes(self, dtype=torch.float32) -> torch.Tensor:
        """The weight codes [C_out, K] in {-1, +1}, {-1, 0, +1} or odd b-bit integers."""
        int_bits = int_format_bits(self.spec.code)
        if int_bits:
            return unpack_int_codes(self.weight_codes, int_bits, self.spec.k, dtype=dtype,
                                    signed=is_signed_format(self.spec.code))
        if self.spec.code == "binary":
            return kernels.unpack_bits(self.weight_bits, self.spec.k, dtype=dtype)
        if self.spec.code == "ternary24":
            rows = kernels.unpack_ternary24(self.weight_codes, self.spec.k, dtype=dtype)
            return from_tap_major(rows, self.spec.weight_shape).reshape(self.spec.out_features, -1)
        return kernels.unpack_ternary((self.weight_sign, self.weight_nonzero), self.spec.k, dtype=dtype)

    def float_weight(self, dtype=torch.float32) -> torch.Tensor:
        """scale[c] * code[c], shaped like the training layer's weight."""
        return (self.codes(dtype) * self.scale.to(dtype).unsqueeze(1)).reshape(self.spec.weight_shape)

    def kept_float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``float_weight(dtype)`` of an integer-code layer (8/4/2-bit, ``sint8``), built once and
        kept (in the ``_native`` slot, so a state-dict load or fold rebuilds it): unpacking b-bit codes
        costs more per call than the float op at batch 1 (an 8-bit LM head: ~3x its matmul), and
        such a layer's codes are already 1/4 or more of float32. Binary and ternary layers unpack
        on every call instead, to stay 1/32 or 1/16 of float in memory."""
        kept = self._native
        if not (isinstance(kept, torch.Tensor) and kept.dtype == dtype and kept.device == self.scale.device):
            self._native = kept = self.float_weight(dtype)
        return kept

    def int8_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, step) of an 8-bit-input layer's input, as its training layer computes them: n =
        norm(x) (``spec.input_norm``), codes = Clip(round(n / step), -128, 127) as int8, step =
        max(|n|_inf, 1e-5) / 127 as x's float dtype, one per token (shaped [..., 1], or [N, 1, H, W]
        for a conv, whose token is a pixel's channels) or one per tensor (``spec.input_granularity``).
        ``codes * step`` is the quantized input; an int8 kernel takes these two."""
        if self.spec.input_bits != 8:
            raise ValueError(f"int8_input: this layer has {self.spec.input_bits}-bit inputs, not 8")
        codes, step = absmax_codes(normalize(x, self.spec.input_norm), self.spec.input_granularity)
        return codes.to(torch.int8), step

    def int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training layer's ``integer_input_output`` on ``int8_input(x)`` and the unpacked code:
        op(codes, code) * (step * scale) + bias, or op(codes * step, code) * scale + bias for a conv
        with per-pixel steps."""
        codes, step = self.int8_input(x)
        codes = codes.to(x.dtype)
        code = self.codes(x.dtype).reshape(self.spec.weight_shape)
        scale = self.channel_view(self.scale.to(x.dtype))
        if self.integer_accumulator(step):
            y = self.float_op(codes, code, with_bias=False).mul_(step * scale)
        else:
            y = self.float_op(codes * step, code, with_bias=False).mul_(scale)
        return y if self.bias is None else y.add_(self.channel_view(self.bias.to(x.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.input_bits == 8:
            return self.int8_forward(x)
        if not self.spec.binary_input:
            integer_code = int_format_bits(self.spec.code)
            return self.float_op(x, self.kept_float_weight(x.dtype) if integer_code else self.float_weight(x.dtype))
        if self.spec.input_threshold:  # sign(x - threshold_c): the same float subtraction as RSign's
            x = x - self.input_threshold.to(x.dtype).view((1, -1, 1, 1) if x.dim() == 4 else (-1,))
        if x.device.type == "cpu" and x.dtype == torch.float32 and native.available():
            y = self.native_output(x, *self.native_weights())
        else:
            acc = self.channels_to_last(self.binary_accumulator(x))
            y = kernels.epilogue(acc, scale=self.scale.expand(self.spec.out_features), bias=self.bias)
        y = self.channels_from_last(y, x).to(x.dtype)
        return y * self.input_scale(x) if self.spec.activation_scale else y

    def native_weights(self):
        """(prepacked weights, mul, add) for the native engine's fused output ``acc * mul + add``:
        the same float32 scale and bias as ``kernels.epilogue``, so the outputs are bit-identical.
        Built on first use; rebuilt after a state-dict load or a BatchNorm fold."""
        if self._native is None:
            n = self.spec.out_features
            mul = self.scale.detach().float().cpu().expand(n).contiguous()
            add = (self.bias.detach().float().cpu() if self.bias is not None else torch.zeros(n)).contiguous()
            self._native = (self.prepack_native(), mul, add)
        return self._native

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._native = None

    @torch.no_grad()
    def fold_batchnorm(self, bn: nn.Module) -> None:
        """Absorb an eval-mode BatchNorm that follows this layer into the epilogue:
        y = gamma (scale acc + b - mean) / sqrt(var + eps) + beta = mul acc + add, with
        mul = gamma scale / sqrt(var + eps) and add = gamma (b - mean) / sqrt(var + eps) + beta
        (``kernels.fold_bn``, in float64). Only for binary-input layers, whose output is acc."""
        if not self.spec.binary_input or self.spec.activation_scale:
            raise ValueError("only binary-input layers without an activation scale fold BatchNorm")
        n = self.spec.out_features
        mul, add = kernels.fold_bn(n, self.scale.expand(n), self.bias,
                                   (bn.running_mean, bn.running_var, bn.weight if bn.affine else 1.0,
                                    bn.bias if bn.affine else 0.0, bn.eps), device=self.scale.device)
        self.spec.shared_scale, self.spec.bias, self.spec.folded_batchnorm = False, True, True
        self.scale = mul.float()
        self.bias = add.float()
        self._native = None

    def extra_repr(self) -> str:
        s = self.spec
        inputs = f", input_bits=8, input_norm={s.input_norm or 'none'}" if s.input_bits == 8 else ""
        return (f"{s.in_features}, {s.out_features}, method={s.method}, code={s.code}, "
                f"binary_input={s.binary_input}{inputs}")


class PackedConv2d(PackedLayer):
    """Packed stand-in for a quantized Conv2d."""

    @staticmethod
    def spec_of(layer: QuantizedConv2d) -> PackedSpec:
        return PackedSpec(kind="conv", in_features=layer.in_channels, out_features=layer.out_channels,
                          kernel_size=tuple(layer.kernel_size), stride=tuple(layer.stride),
                          padding=layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
                          dilation=tuple(layer.dilation), groups=layer.groups, padding_mode=layer.padding_mode,
                          **PackedLayer.common_spec(layer))

    def __init__(self, spec: PackedSpec):
        super().__init__(spec)
        self._tap_bits = None  # cache of group_tap_bits(), rebuilt on load and on a device change

    def _explicit_padding(self) -> tuple[int, int]:
        s = self.spec
        if s.padding == "valid":
            return (0, 0)
        if s.padding == "same":
            # nn.Conv2d 'same' (stride 1): total d*(k-1), the extra one on the right/bottom
            totals = [d * (k - 1) for d, k in zip(s.dilation, s.kernel_size, strict=False)]
            if any(t % 2 for t in totals):
                raise ValueError("packed conv supports 'same' padding only with symmetric totals")
            return tuple(t // 2 for t in totals)
        return tuple(s.padding)

    def _pad_input(self, x):
        """Non-zero padding modes pad the float input first (then the kernel pads nothing)."""
        padding = self._explicit_padding()
        if self.spec.padding_mode == "zeros" or max(padding) == 0:
            return x, padding
        ph, pw = padding
        return F.pad(x, (pw, pw, ph, ph), mode=self.spec.padding_mode), (0, 0)

    def float_op(self, x, weight, with_bias=True):
        x, padding = self._pad_input(x)
        s = self.spec
        return F.conv2d(x, weight, self.bias if with_bias else None, s.stride, padding, s.dilation, s.groups)

    @staticmethod
    def channel_view(v):
        return v.view(1, -1, 1, 1)

    integer_accumulator = staticmethod(QuantizedConv2d.integer_accumulator)

    def binary_accumulator(self, x):
        """int32 [N, C_out, Ho, Wo] (an NHWC tensor viewed as NCHW): the exact conv of the +-1
        inputs and codes, one ``kernels.binary_conv2d`` per group, concatenated along channels."""
        s = self.spec
        x, padding = self._pad_input(x)
        if self._tap_bits is None or self._tap_bits[0].device != x.device:
            self._tap_bits = self.group_tap_bits(x.device)
        per_group = s.in_features // s.groups
        accs = [kernels.binary_conv2d(x[:, g * per_group:(g + 1) * per_group], bits, s.kernel_size,
                                      stride=s.stride, padding=padding, dilation=s.dilation).permute(0, 2, 3, 1)
                for g, bits in enumerate(self._tap_bits)]
        acc = accs[0] if len(accs) == 1 else torch.cat(accs, dim=-1)
        return acc.permute(0, 3, 1, 2)

    def prepack_native(self):
        s = self.spec
        return cpu_native.prepack_conv(self.group_tap_bits(torch.device("cpu")), s.kernel_size,
                                       s.in_features // s.groups)

    def native_input(self, x):
        """(packed NHWC signs of ``x``, per group; the padding the kernel still applies)."""
        x, padding = self._pad_input(x)
        return cpu_native.pack_pixels(x, self.spec.groups), padding

    def native_compute(self, bits, padding, weights, **output):
        """The native direct convolution of packed ``bits``, NHWC, in ``output``'s mode."""
        s = self.spec
        return cpu_native.conv(bits, weights, s.stride, padding, s.dilation, **output)

    def native_output(self, x, weights, mul, add):
        """NHWC float32 ``acc * mul + add`` from the native direct convolution of ``x``'s signs."""
        return self.native_compute(*self.native_input(x), weights, mode=native.OUT_FLOAT, mul=mul, add=add)

    def group_tap_bits(self, device) -> tuple[torch.Tensor, ...]:
        """The kernel's runtime weight layout (``kernels.pack_conv_weight``), one per group:
        group g holds output channels [g C_out/G, (g+1) C_out/G)."""
        s = self.spec
        rows = s.out_features // s.groups
        return tuple(kernels.repack_conv_weight(self.weight_bits[g * rows:(g + 1) * rows], s.in_features // s.groups,
                                                s.kernel_size).to(device) for g in range(s.groups))

    @staticmethod
    def channels_to_last(acc):
        return acc.permute(0, 2, 3, 1)  # the kernel's NHWC output: no copy

    @staticmethod
    def channels_from_last(y, x):
        """NHWC -> NCHW, laid out in memory as ``F.conv2d`` lays out its output for input ``x``
        (contiguous, or channels_last for a channels_last ``x``). Values alone are not enough: a
        float conv that follows picks its summation order by the memory format, so an NHWC view
        would make it differ from the training model's by a rounding."""
        y = y.permute(0, 3, 1, 2)
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return y if channels_last else y.contiguous()

    def input_scale(self, x):
        s = self.spec
        return conv_input_scale(x, s.kernel_size, s.stride, s.padding, s.dilation)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._tap_bits = None


class PackedLinear(PackedLayer):
    """Packed stand-in for a quantized Linear."""

    @staticmethod
    def spec_of(layer: QuantizedLinear) -> PackedSpec:
        return PackedSpec(kind="linear", in_features=layer.in_features, out_features=layer.out_features,
                          **PackedLayer.common_spec(layer))

    def float_op(self, x, weight, with_bias=True):
        return F.linear(x, weight, self.bias if with_bias else None)

    @staticmethod
    def channel_view(v):
        return v

    integer_accumulator = staticmethod(QuantizedLinear.integer_accumulator)

    #: 8-bit-input normalizations the native BitLinear computes (``kernels.cpu_native.quantize_i8``)
    NATIVE_INT8_NORMS = {"rms": NORM_EPS, "": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self._native
        if type(layer) is cpu_native.TernaryI8Linear and x.dtype is torch.float32 and x.is_cpu:
            return layer(x)  # built, so runs_int8_natively held: only its two checks on x are repeated
        if self.spec.input_bits == 8 and self.runs_int8_natively(x):
            return self.native_int8_layer()(x)
        return super().forward(x)

    def runs_int8_natively(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` runs the native BitLinear: float32 CPU input, the engine available,
        RMSNorm or no norm, per-token steps, one weight scale, ternary or binary codes. It equals
        ``int8_forward`` bit for bit; anything else runs ``int8_forward``."""
        s = self.spec
        return (x.dtype == torch.float32 and x.device.type == "cpu" and s.input_norm in self.NATIVE_INT8_NORMS
                and s.input_granularity == "token" and s.code in ("ternary", "binary") and self.scale.numel() == 1
                and native.available())

    def native_int8_layer(self) -> cpu_native.TernaryI8Linear:
        """The native BitLinear of this layer: y = float(codes @ code^T) * (step * scale) + bias on
        ``quantize_i8(x, eps)``'s codes and steps. Built on first use; rebuilt after a state-dict load."""
        if not isinstance(self._native, cpu_native.TernaryI8Linear):
            k = self.spec.k
            if self.spec.code == "binary":
                weights = cpu_native.binary_i8_prepack(self.weight_bits.cpu(), k)
            else:
                weights = cpu_native.ternary_i8_prepack((self.weight_sign.cpu(), self.weight_nonzero.cpu()), k)
            self._native = cpu_native.TernaryI8Linear(weights, self.scale.item(), self.bias,
                                                      self.NATIVE_INT8_NORMS[self.spec.input_norm])
        return self._native

    def prepack_native(self):
        return cpu_native.prepack_linear(self.weight_bits, self.spec.k)

    def native_input(self, x):
        """(packed signs of ``x``'s rows, None: a matmul pads nothing)."""
        return cpu_native.pack_rows(x.reshape(-1, x.shape[-1])), None

    def native_compute(self, bits, padding, weights, **output):
        return cpu_native.linear(bits, weights, **output)

    def native_output(self, x, weights, mul, add):
        y = self.native_compute(*self.native_input(x), weights, mode=native.OUT_FLOAT, mul=mul, add=add)
        return y.reshape(*x.shape[:-1], -1)

    def binary_accumulator(self, x):
        rows = x.reshape(-1, x.shape[-1])
        acc = kernels.binary_matmul(kernels.pack_bits(rows), self.weight_bits, self.spec.k)
        return acc.reshape(*x.shape[:-1], -1)

    @staticmethod
    def channels_to_last(acc):
        return acc

    @staticmethod
    def channels_from_last(y, x):
        return y

    def input_scale(self, x):
        return linear_input_scale(x)


class PackedEmbedding(PackedLayer):
    """Packed stand-in for a ``layers.QuantizedEmbedding``: codes [rows, embedding_dim] in the
    quantizer's integer format (``sint8``) and one float32 scale per row. A lookup gathers the
    table code * scale, element by element the value of the training table ``quantized_weight()``
    (one float rounding each), so the outputs are bit-identical. The float table is built at the
    first lookup and kept (``kept_float_weight``: per-row unpacking cost several small ops per
    token, more than the rest of a byte-level LM's embedding step); the file stores only codes."""

    @staticmethod
    def spec_of(layer: QuantizedEmbedding) -> PackedSpec:
        code = layer.weight_quantizer.packed_format
        if not int_format_bits(code):
            raise ValueError(f"{type(layer).__name__} stores its table as {code!r}; packed embeddings take integer "
                             f"codes (method int8)")
        return PackedSpec(kind="embedding", code=code, in_features=layer.embedding_dim,
                          out_features=layer.num_embeddings, bias=False, binary_input=False, method=layer.method)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.kept_float_weight(self.scale.dtype))

    def extra_repr(self) -> str:
        return f"{self.spec.out_features}, {self.spec.in_features}, method={self.spec.method}, code={self.spec.code}"


class FoldedBatchNorm(nn.Identity):
    """Stands where a BatchNorm was folded into the preceding packed layer (``load_packed`` puts it back)."""


PACKED_CLASSES = {"conv": PackedConv2d, "linear": PackedLinear, "embedding": PackedEmbedding}


def packed_class(layer: nn.Module) -> type[PackedLayer]:
    """The packed stand-in class of a quantized layer or embedding."""
    if isinstance(layer, QuantizedEmbedding):
        return PackedEmbedding
    return PackedConv2d if isinstance(layer, QuantizedConv2d) else PackedLinear


def pack_model(model: nn.Module, fold_batchnorm: bool = True) -> nn.Module:
    """A packed copy of ``model`` for inference (eval mode); ``model`` itself is left unchanged.

    ``fold_batchnorm``: a BatchNorm whose only input is a binary-input packed layer's output (found
    by tracing the model with torch.fx) is folded into that layer's epilogue and replaced by
    ``nn.Identity``. Models that cannot be traced are packed without folding.
    """
    packed = copy.deepcopy(model).eval()
    keep_active_width(packed)  # a multi-bit model with per-width BatchNorm: the exported width's statistics
    targets = [(n, m) for n, m in packed.named_modules() if isinstance(m, (QuantizedLayer, QuantizedEmbedding))]
    for name, layer in targets:
        packed = replace_submodule(packed, name, packed_class(layer).from_quantized(layer))
    if fold_batchnorm:
        for layer_name, bn_name in _batchnorms_after_binary_layers(packed):
            packed.get_submodule(layer_name).fold_batchnorm(packed.get_submodule(bn_name))
            packed = replace_submodule(packed, bn_name, FoldedBatchNorm())
    return packed


def _batchnorms_after_binary_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(packed layer, BatchNorm) module-name pairs where the BN consumes only that layer's output."""
    import torch.fx

    class PackedLeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualified_name):
            return isinstance(m, PackedLayer) or super().is_leaf_module(m, qualified_name)

    try:
        graph = PackedLeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: pack without folding
        return []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        layer = model.get_submodule(node.target)
        if not (isinstance(layer, PackedLayer) and layer.spec.binary_input and not layer.spec.activation_scale):
            continue
        (user,) = node.users
        if user.op != "call_module" or calls[user.target] != 1 or calls[node.target] != 1:
            continue
        bn = model.get_submodule(user.target)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats and user.args[0] is node:
            pairs.append((node.target, user.target))
    return pairs


def packed_specs(model: nn.Module) -> dict[str, dict]:
    return {n: asdict(m.spec) for n, m in model.named_modules() if isinstance(m, PackedLayer)}


CHECKSUM_KEY = "checksum"


def checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """``"sha256:<hex>"`` over every tensor's name, dtype, shape and bytes (in sorted name order),
    then every metadata entry but the checksum itself (sorted by key)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps(["tensor", name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    for key in sorted(k for k in metadata if k != CHECKSUM_KEY):
        digest.update(json.dumps(["metadata", key, metadata[key]]).encode())
    return "sha256:" + digest.hexdigest()


def _registered_architecture(model: nn.Module, architecture) -> dict | None:
    """The architecture to record: the one given, else the one ``qat.models.build`` tagged the
    model with; ``False`` records none. Refuses (ValueError) when there is neither."""
    from qat import models

    if architecture is False:
        return None
    if architecture is None:
        architecture = models.architecture_of(model)
        if architecture is None:
            raise ValueError(
                "save_packed cannot record this model's architecture: it was not built by "
                "qat.models.build. Pass the qat.models entry it is, architecture={'name': <one of "
                f"{', '.join(models.names())}>, 'num_classes': ..., 'in_channels': ..., **builder options}}, "
                "or architecture=False to save without one (then load with load_packed(path, model=<float model>))")
    if not isinstance(architecture, dict) or "name" not in architecture:
        raise ValueError(f"architecture must be a dict with a 'name' (a qat.models name), got {architecture!r}")
    try:
        json.dumps(architecture)
    except TypeError as error:
        raise ValueError(f"architecture {architecture!r} is not JSON-serializable: {error}") from None
    return dict(architecture)


def save_packed(model: nn.Module, path, architecture: dict | bool | None = None) -> Path:
    """Write a packed model (from ``pack_model``) to a safetensors file and return its path.

    ``architecture`` = ``{"name": <qat.models name>, "num_classes": .., "in_channels": .., **options}``
    lets ``load_packed(path)`` rebuild the model without being handed one. By default it is the one
    ``qat.models.build`` recorded on the model (kept by ``quantize_model`` and ``pack_model``); a
    model from elsewhere must be given one, or ``architecture=False`` for a file that loads only as
    ``load_packed(path, model=<float model>)``. Whatever is recorded is checked here: the model is
    rebuilt from the file's metadata (as a shape-only skeleton on the meta device) and the tensors
    must load into it strictly, so a file this writes also loads. The metadata holds a checksum
    (``checksum``) of all tensors and metadata, verified by ``load_packed``.
    """
    from safetensors.torch import save_file

    specs = packed_specs(model)
    if not specs:
        raise ValueError("the model holds no packed layers: pass the result of qat.export.pack_model(model)")
    architecture = _registered_architecture(model, architecture)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    folded = [n for n, m in model.named_modules() if isinstance(m, FoldedBatchNorm)]
    metadata = {"format": FORMAT, "layers": json.dumps(specs), "architecture": json.dumps(architecture),
                "folded_batchnorms": json.dumps(folded)}
    if architecture is not None:
        meta = {"layers": specs, "architecture": architecture, "folded_batchnorms": folded}
        skeleton_tensors = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
        try:
            with torch.device("meta"):
                _assemble(skeleton_tensors, meta, None, "the packed model")
        except ValueError as error:
            raise ValueError(f"save_packed: architecture={architecture} does not rebuild this model, so the file "
                             f"would not load: {str(error).rstrip('.')}. Pass architecture={{...}} of the "
                             f"qat.models model it is, "
                             f"or architecture=False (then load with load_packed(path, model=...))") from None
    metadata[CHECKSUM_KEY] = checksum(tensors, metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_packed(path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a packed file, with clear errors for a wrong or broken file.

    ``verify``: recompute the checksum ``save_packed`` stored and raise ValueError naming the file
    when it differs (flipped bytes, truncated or edited file) or is missing."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no packed model file at {path}")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); "
                         f"write packed models with qat.export.save_packed") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a packed model "
                         f"(format {metadata.get('format')!r}, expected {FORMAT!r})")
    if verify:
        stored = metadata.get(CHECKSUM_KEY)
        if stored is None:
            raise ValueError(f"{path} records no checksum, so its contents cannot be verified; "
                             f"write it again with qat.export.save_packed, or load it with verify=False")
        if checksum(tensors, metadata) != stored:
            raise ValueError(f"{path} is corrupt: its tensors or metadata do not match the checksum stored when it "
                             f"was written ({stored[:19]}...); write it again with qat.export.save_packed "
                             f"(load_packed(path, verify=False) skips this check)")
    try:
        meta = {key: json.loads(metadata.get(key, "[]")) for key in ("layers", "architecture", "folded_batchnorms")}
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} has unreadable packed-model metadata ({error})") from None
    return tensors, meta


def _assemble(tensors: dict[str, torch.Tensor], meta: dict, model: nn.Module | None, source) -> nn.Module:
    """The model ``meta`` describes with ``tensors`` loaded: ``model`` (or the float model its
    architecture names) with the packed layers and folded BatchNorms put in place."""
    assign = False
    if model is None:
        architecture = meta["architecture"]
        if not architecture:
            raise ValueError(f"{source} records no architecture; pass the float model: load_packed(path, model=...)")
        from qat import models
        # A shape-only skeleton: the file's tensors are assigned into it, so the float weights of the
        # layers that are packed never exist in memory (a packed ResNet-18 loads in a few MB).
        with torch.device("meta"):
            model = models.build_architecture(architecture)
        assign = True
    for name, spec_dict in meta["layers"].items():
        spec = PackedSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec_dict.items()})
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source} has a packed layer {name!r} that the model does not have") from None
        with torch.device("meta") if assign else contextlib.nullcontext():
            model = replace_submodule(model, name, PACKED_CLASSES[spec.kind](spec))
    for name in meta["folded_batchnorms"]:
        model = replace_submodule(model, name, FoldedBatchNorm())
    try:
        model.load_state_dict(tensors, strict=True, assign=assign)
    except RuntimeError as error:
        raise ValueError(f"{source} does not match the model it is loaded into: {error}") from None
    unfilled = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
                if t.is_meta and name not in tensors]
    if unfilled:
        raise ValueError(f"{source} leaves {', '.join(unfilled[:3])} of the model without values "
                         f"(tensors the file does not hold); load it with load_packed(path, model=<float model>)")
    return model


def load_packed(path, model: nn.Module | None = None, verify: bool = True) -> nn.Module:
    """Rebuild a packed model from ``save_packed``'s file, ready for inference (eval mode).

    Without ``model`` the file's architecture metadata names a ``qat.models`` builder; with it,
    ``model`` is the float model of the same architecture (its weights are overwritten).
    ``verify=False`` skips the checksum check (see ``read_packed``).
    """
    tensors, meta = read_packed(path, verify=verify)
    return _assemble({name: _aligned(tensor) for name, tensor in tensors.items()}, meta, model, path).eval()


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied to fresh memory (torch's allocator aligns it to 64 bytes) where its data is
    not 64-byte aligned: safetensors places tensors at any byte offset of the file, and BLAS sums a
    matrix at an unaligned address in another order than the aligned copy the trained model holds
    (a float head's logits at batch 1 then differ in the last bit)."""
    return tensor.clone() if tensor.data_ptr() % 64 else tensor
