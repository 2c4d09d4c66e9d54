"""Drop-in quantized layers: a float ``nn.Conv2d``/``nn.Linear`` plus a weight quantizer and an
optional input quantizer, both taken from the method table (``layers.methods``).

Each class takes exactly its float base class's constructor arguments, plus keyword options:
``estimator=`` (a registry name, a mapping ``{name: ..., **hp}`` or an Estimator object) for both
weights and inputs, ``weight_estimator=`` / ``input_estimator=`` to set them separately, and the
method's hyperparameters (``layers.methods.METHODS[name].option_names()``). The forward is

    y = op(x, Q_w(W)) + b                              (float inputs: BWN, TWN, HQ)
    y = alpha_c * op(Q_in(x), code(W)) + b  [* K]      (binary inputs: XNOR, FDA)
    y = op(codes, code(W)) * (step * s) + b            (8-bit inputs: BitNet; Q_in(x) = codes * step)

with op = conv2d or linear, Q_w(W) = alpha_c * code(W) = ``quantized_weight()``, and K XNOR's
optional activation scale. The binary-input form sums +-1 products exactly (see ``forward``), the
8-bit form sums integer products exactly (``_IntegerInputOp``). A float layer's ``state_dict``
loads as is.

Saved for backward (``act_compression``, set by ``qat.set_act_compression``, never from a config):
``"none"`` keeps today's float tensors; ``"exact"`` makes binary-input layers save sign(x) as packed
bits (``_PackedSignInputOp``), with identical values and gradients. The layer also tells compressors
of saved tensors (``qat.act_compression``) two facts: which tensors come from the weights alone
(``is_weight_side``: left alone, they are not activations) and which outputs are an exact integer
times a per-channel scale (``integer_form``: storable exactly in int16).
"""
from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

import estimators
from estimators.base import Estimator, sign

from .bitpack import pack_compare, pack_flags, unpack_flags, unpack_signs, zero_where_
from .methods import ESTIMATOR_OPTIONS, Method, quantizer_kwargs

ACT_COMPRESSION_MODES = ("none", "exact")
#: Attribute on tensors computed from the weights alone (quantized weights, codes).
WEIGHT_SIDE_ATTR = "_qat_weight_side"
#: Attribute on a binary layer's output y = S * s_c, S integer, |S| <= K: (s_c shaped for
#: broadcasting, K, y._version when it was set). See ``integer_form``.
INTEGER_FORM_ATTR = "_qat_integer_form"
INT16_MAX = 2 ** 15 - 1
_weight_scope = threading.local()


@contextmanager
def computing_weights():
    """Marks the tensors saved for backward meanwhile as weight-side (``is_weight_side``)."""
    depth = getattr(_weight_scope, "depth", 0)
    _weight_scope.depth = depth + 1
    try:
        yield
    finally:
        _weight_scope.depth = depth


def mark_weight_side(t: torch.Tensor) -> torch.Tensor:
    setattr(t, WEIGHT_SIDE_ATTR, True)
    return t


def is_weight_side(t: torch.Tensor) -> bool:
    """Whether ``t`` (being saved for backward now) is computed from weights only, not from the input."""
    return getattr(_weight_scope, "depth", 0) > 0 or getattr(t, WEIGHT_SIDE_ATTR, False)


def integer_form(t: torch.Tensor):
    """(scale, K) when ``t`` is still the binary layer output S * scale with integer |S| <= K
    (unchanged since: in-place ops bump its version), else None."""
    form = getattr(t, INTEGER_FORM_ATTR, None)
    if form is None or form[2] != t._version:
        return None
    return form[0], form[1]




def conv_input_scale(x, kernel_size, stride, padding, dilation):
    """XNOR-Net's K = A * k: A = mean_c |x| (an h x w map), k a kh x kw box filter of 1/(kh kw),
    convolved with the layer's stride, padding and dilation: one beta per output position."""
    a = x.abs().mean(dim=1, keepdim=True)
    box = a.new_full((1, 1, *kernel_size), 1.0 / (kernel_size[0] * kernel_size[1]))
    return F.conv2d(a, box, stride=stride, padding=padding, dilation=dilation)


def linear_input_scale(x):
    """XNOR-Net's activation scale for a dense layer: beta = mean |x| over the features."""
    return x.abs().mean(dim=-1, keepdim=True)


def op_backward(layer, g, x, weight, need_x):
    """``layer.op_backward``, also after an autocast forward (AMP): there the op ran in ``g``'s
    dtype on autocast's lower-precision copies of x and W, so backward makes the same casts and
    casts the gradients back to x's and W's dtypes, as autograd does through autocast's cast nodes."""
    if g.dtype == x.dtype == weight.dtype:
        return layer.op_backward(g, x, weight, need_x)
    grad_x, grad_w = layer.op_backward(g, x.to(g.dtype), weight.to(g.dtype), need_x)
    return (None if grad_x is None else grad_x.to(x.dtype)), grad_w.to(weight.dtype)


class _ScaledAfterOp(torch.autograd.Function):
    """y = op(x, code) * s_c + b_c, with the gradients of op(x, W~) + b for W~ = s_c * code:

        dL/dx = op_x^T(g; W~),   dL/dcode = s_c * G,   dL/ds_c = sum_{i in c} G_i code_i,
        dL/db_c = sum g,          with G = op_W^T(g; x) the weight gradient of op at W~.

    The value is the exact-integer form of ``QuantizedLayer.forward``; the backward is what
    autograd gives for ``op(x, code) * s + b`` (the same function), computed without the two
    extra passes over activation-sized tensors that autograd's mul would take: scale and bias
    act on weight-sized tensors and one in-place pass over the output.
    """

    @staticmethod
    def forward(ctx, x, code, scale, bias, layer):
        with torch.no_grad():
            y = layer.float_op(x, code, None).mul_(layer.channel_view(scale))
            if bias is not None:
                y.add_(layer.channel_view(bias))
        ctx.save_for_backward(x, code, scale)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x, code, scale = ctx.saved_tensors
        layer = ctx.layer
        per_channel = scale.view(-1, *([1] * (code.dim() - 1)))
        grad_x, grad_w = op_backward(layer, g, x, code * per_channel, ctx.needs_input_grad[0])
        grad_scale = (grad_w * code).flatten(1).sum(1) if ctx.needs_input_grad[2] else None
        grad_bias = layer.output_channel_sum(g) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, grad_w * per_channel, grad_scale, grad_bias, None


class _PackedSignInputOp(torch.autograd.Function):
    """``estimator(x)`` followed by ``_ScaledAfterOp`` in one node, saving less for backward:

        y = op(sign(x), code) * s_c + b,
        dL/dx = est.backward(x, op_x^T(g; s_c code)),  the other gradients as ``_ScaledAfterOp``'s,

    the same values and gradients bit for bit (the same ops on the same operands), but saved:
    sign(x) as packed bits (``kernels.pack_bits``' format, ``layers.bitpack``: 1 bit per element, not a
    float copy); of x, only what the estimator's derivative needs (``Estimator.needs``): nothing (identity), where
    it is zero as packed bits (clipped_ste: 1 bit), or x itself for smooth derivatives (approx_sign,
    swish_sign, ede, fourier: no compression of x, only the float sign(x) copy goes); and, when the
    code is sign(W) (``is_plain_sign``), the latent weight instead of the float code, recomputed in
    backward. Everything saved is the layer's input at 1-2 bits per element.
    """

    @staticmethod
    def forward(ctx, x, code, scale, bias, weight, layer, estimator, code_is_sign):
        with torch.no_grad():
            x_q = sign(x)
            y = layer.float_op(x_q, code, None).mul_(layer.channel_view(scale))
            if bias is not None:
                y.add_(layer.channel_view(bias))
        saved = [pack_compare(x_q, "lt", 0.0), scale, weight if code_is_sign else code]
        if estimator.needs == "zeros":
            rule = estimator.zeros_comparison(x.dtype)  # one compare-and-pack pass where Z is a comparison
            zeros = pack_compare(x, *rule[:2], absolute=rule[2]) if rule else pack_flags(estimator.zeros(x))
            saved.append(zeros)
        elif estimator.needs == "value":
            saved.append(x)
        ctx.save_for_backward(*saved)
        ctx.layer, ctx.estimator, ctx.code_is_sign = layer, estimator, code_is_sign
        ctx.has_bias, ctx.shape, ctx.dtype = bias is not None, x_q.shape, x_q.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        bits, scale, w_or_code, *rest = ctx.saved_tensors
        layer, estimator = ctx.layer, ctx.estimator
        x_q = unpack_signs(bits, ctx.shape, ctx.dtype)
        code = sign(w_or_code) if ctx.code_is_sign else w_or_code
        per_channel = scale.view(-1, *([1] * (code.dim() - 1)))
        need_x = ctx.needs_input_grad[0]
        grad_xq, grad_w = op_backward(layer, g, x_q, code * per_channel, need_x)
        grad_scale = (grad_w * code).flatten(1).sum(1) if ctx.needs_input_grad[2] else None
        grad_bias = layer.output_channel_sum(g) if ctx.has_bias and ctx.needs_input_grad[3] else None
        grad_x = None
        if need_x:
            if estimator.needs == "value":
                grad_x = estimator.backward(rest[0], grad_xq)
            elif estimator.needs == "zeros" and type(estimator).backward_from_zeros is Estimator.backward_from_zeros:
                grad_x = zero_where_(grad_xq, rest[0])  # the base's masked_fill_(Z, 0.0), from the packed Z
            elif estimator.needs == "zeros":
                grad_x = estimator.backward_from_zeros(unpack_flags(rest[0], ctx.shape), grad_xq)
            else:
                grad_x = estimator.backward_from_zeros(None, grad_xq)
        return grad_x, grad_w * per_channel, grad_scale, grad_bias, None, None, None, None


def op_gradients(layer, g, x, weight, need_x):
    """(dL/dx, dL/dW) of ``layer.float_op(x, weight)`` for the output gradient ``g``: ``op_backward``
    where the layer has it, else autograd on a recomputed op (convolutions with a non-zero padding mode)."""
    if layer.has_fast_backward():
        return op_backward(layer, g, x, weight, need_x)
    with torch.enable_grad():
        x_, w_ = x.detach().requires_grad_(need_x), weight.detach().requires_grad_()
        y = layer.float_op(x_, w_, None)
        grads = torch.autograd.grad(y, [x_, w_] if need_x else [w_], g.to(y.dtype))
    return (grads[0], grads[1]) if need_x else (None, grads[0])


class _IntegerInputOp(torch.autograd.Function):
    """A layer whose input quantizer gives integer codes times a step (BitNet's 8-bit inputs,
    ``layers.bitnet``), computed from the integers:

        forward:   (codes, step) = Q_in.factors(n),  n the normalized input,  s the weight scale,
                   y = op(codes, code) * (step * s) + b      where step is one number per output's
                                                             inputs (a linear layer's token, or
                                                             per-tensor steps),
                   y = op(codes * step, code) * s + b        otherwise (a conv with per-pixel steps:
                                                             its window mixes steps);
        backward:  the STE of ``y = op(Q_in(n), W_q) + b``:
                   dL/dn = est'(n) * op_x^T(g; W_q),   dL/dW_q = op_W^T(g; codes * step),   dL/db = sum g.

    op sums integer products, exact in float32 while |sum| < 2^24, so an int8 kernel with an int32
    accumulator and the same float epilogue gives the same bits. ``W_q`` (``quantized_weight()``,
    carrying the weight quantizer's estimator back to the latent W) is used in backward only. Saved:
    the codes as int8 (1 byte per input element) and the steps; n itself only when the estimator's
    derivative reads it (``Estimator.needs``; identity, the default, does not).
    """

    @staticmethod
    def forward(ctx, x, w_q, code, scale, bias, layer, quantizer):
        with torch.no_grad():
            codes, step = quantizer.factors(x)
            y = layer.integer_input_output(codes, step, code, scale, bias)
        estimator = quantizer.estimator
        saved = [codes.to(torch.int8), step, w_q]
        if estimator.needs != "none":
            saved.append(x)
        ctx.save_for_backward(*saved)
        ctx.layer, ctx.estimator, ctx.has_bias, ctx.dtype = layer, estimator, bias is not None, x.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        codes, step, w_q, *rest = ctx.saved_tensors
        layer, estimator = ctx.layer, ctx.estimator
        need_x = ctx.needs_input_grad[0]
        grad_xq, grad_wq = op_gradients(layer, g, codes.to(ctx.dtype) * step, w_q, need_x)
        grad_x = None
        if need_x:
            grad_x = estimator.backward(rest[0], grad_xq) if rest else estimator.backward_from_zeros(None, grad_xq)
        grad_bias = layer.output_channel_sum(g) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return grad_x, grad_wq, None, None, grad_bias, None, None


class QuantizedLayer:
    """Mixin over a float layer class; subclasses set ``method`` and ``float_type``."""

    method_spec: Method
    float_type: type[nn.Module]
    #: What binary-input layers save for backward: "none" (float tensors) or "exact" (packed
    #: bits, ``_PackedSignInputOp``). Set through ``qat.set_act_compression``.
    act_compression: str = "none"
    #: XNOR-Net's K map (a layer option of xnor; False for every other method)
    activation_scale: bool = False

    def __init__(self, *args, **kwargs):
        base_parameters = inspect.signature(self.float_type.__init__).parameters
        base_kwargs = {k: v for k, v in kwargs.items() if k in base_parameters}
        options = {k: v for k, v in kwargs.items() if k not in base_parameters}
        self.float_type.__init__(self, *args, **base_kwargs)
        self._build_quantizers(options, {"device": base_kwargs.get("device"), "dtype": base_kwargs.get("dtype")})

    @property
    def method(self) -> str:
        return self.method_spec.name

    def _build_quantizers(self, options: dict, factory: dict) -> None:
        spec = self.method_spec
        choice = {name: options.pop(name) for name in ESTIMATOR_OPTIONS if name in options}
        values = spec.validate_options(options)
        for option in spec.layer_options:
            setattr(self, option.name, values[option.name])
        default = choice.get("estimator") or spec.default_estimator
        input_default = choice.get("estimator") or spec.default_input_estimator or spec.default_estimator
        self.weight_quantizer = self._quantizer(spec.weight_quantizer, choice.get("weight_estimator") or default,
                                                values, self.weight[0].numel(), factory)
        self.input_quantizer = None
        if spec.input_quantizer is not None:
            self.input_quantizer = self._quantizer(spec.input_quantizer, choice.get("input_estimator") or input_default,
                                                   values, self.input_features, factory)

    @staticmethod
    def _quantizer(cls, estimator, values: dict, features: int, factory: dict):
        """``cls`` with its options; quantizers with a learned module (FDA's NAM, RSign's thresholds)
        also get their feature width and the factory kwargs."""
        sized = {"features": features, **factory} if cls.needs_features else {}
        return cls(estimators.get(estimator), **sized, **quantizer_kwargs(cls, values))

    def diagnostics(self) -> dict[str, float]:
        """The quantizers' own figures for the training logs (HQ: sparsity, cosine_similarity;
        FDA: terms, noise_weight; RSign: threshold_mean_abs); the weight quantizer's win a tie."""
        found = {}
        for quantizer in (self.input_quantizer, self.weight_quantizer):
            if quantizer is not None:
                found.update(quantizer.diagnostics(self.weight))
        return found

    @property
    def weight_bits(self) -> int:
        """The stored bits of the weight the forward uses now: the method's, or a multi-bit
        quantizer's active width (``layers.multibit``)."""
        return self.weight_quantizer.bits

    @property
    def input_bits(self) -> int:
        return self.method_spec.input_bits

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses (differentiable w.r.t. the latent ``self.weight``)."""
        with computing_weights():
            return mark_weight_side(self.weight_quantizer(self.weight))

    def weight_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight quantizer's (code, scale), marked weight-side."""
        with computing_weights():
            code, scale = self.weight_quantizer.factors(self.weight)
        return mark_weight_side(code), mark_weight_side(scale)

    def packs_input(self) -> bool:
        """Whether forward now runs ``_PackedSignInputOp`` (exact mode, sign codes, zero padding)."""
        return (self.act_compression == "exact" and self.input_bits == 1
                and self.input_quantizer.is_plain_sign and self.has_fast_backward())

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is None:
            return self.float_op(x, self.quantized_weight(), self.bias)
        if self.input_bits > 1:  # integer codes times a step (BitNet's int8): normalize, then the exact op
            code, scale = self.weight_factors()
            return _IntegerInputOp.apply(self.input_quantizer.normalize(x), self.quantized_weight(), code, scale,
                                         self.bias, self, self.input_quantizer)
        # Binary inputs: y = alpha_c * op(sign(x), code) + b. With +-1 codes op() sums integers,
        # exact in float (|sum| < 2^24), so the result equals the packed kernels' integer
        # accumulator times alpha_c bit for bit, ties (sum == 0) included; op(x, alpha_c code)
        # would round each product and could turn an exact 0 into +-eps, flipping a later sign.
        code, scale = self.weight_factors()
        if self.packs_input():
            code_is_sign = self.weight_quantizer.is_plain_sign
            y = _PackedSignInputOp.apply(x, code, scale.reshape(-1), self.bias, self.weight, self,
                                         self.input_quantizer.estimator, code_is_sign)
            if self.activation_scale:
                return y * self.input_scale(x)
            terms = self.weight[0].numel()  # |S| <= C_in/groups * kh * kw (in_features)
            if (code_is_sign and self.bias is None and y.dtype == torch.float32 and terms <= INT16_MAX
                    and not torch.is_autocast_enabled(y.device.type)):
                setattr(y, INTEGER_FORM_ATTR, (self.channel_view(scale.detach().reshape(-1)), terms, y._version))
            return y
        x_q = self.quantize_input(x)
        if self.has_fast_backward():
            y = _ScaledAfterOp.apply(x_q, code, scale.reshape(-1), self.bias, self)
        else:
            y = self.float_op(x_q, code, None) * self.channel_view(scale.reshape(-1))
            if self.bias is not None:
                y = y + self.channel_view(self.bias)
        return y * self.input_scale(x) if self.activation_scale else y

    def integer_input_output(self, codes, step, code, scale, bias):
        """``_IntegerInputOp``'s value from the input codes and steps and the weight code and scale:
        op(codes, code) * (step * s) + b when ``step`` is one number per output's inputs, else
        op(codes * step, code) * s + b. Packed layers (``qat.export``) run the same ops."""
        scale = self.channel_view(scale.reshape(-1))
        if self.integer_accumulator(step):
            y = self.float_op(codes, code, None).mul_(step * scale)
        else:
            y = self.float_op(codes * step, code, None).mul_(scale)
        return y if bias is None else y.add_(self.channel_view(bias))

    def set_progress(self, progress: float) -> None:
        """Hand training progress to the quantizers (and their estimators); let a quantizer rewrite
        the latent weight at a schedule boundary (HQ's reinitialisation)."""
        for quantizer in (self.weight_quantizer, self.input_quantizer):
            if quantizer is not None:
                quantizer.set_progress(progress)
        self.weight_quantizer.update_latent_(self.weight)

    def extra_repr(self) -> str:
        extra = ", activation_scale=True" if self.activation_scale else ""
        return f"{self.float_type.extra_repr(self)}, method={self.method}{extra}"


class QuantizedConv2d(QuantizedLayer, nn.Conv2d):
    float_type = nn.Conv2d

    @property
    def input_features(self) -> int:
        return self.in_channels

    def float_op(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)

    @staticmethod
    def channel_view(v):
        return v.view(1, -1, 1, 1)

    def has_fast_backward(self) -> bool:
        return self.padding_mode == "zeros" and not isinstance(self.padding, str)

    def op_backward(self, g, x, weight, need_x):
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            g, x, weight, None, self.stride, self.padding, self.dilation, False, [0, 0], self.groups,
            [need_x, True, False])
        return grad_x, grad_w

    @staticmethod
    def output_channel_sum(g):
        return g.sum(dim=(0, 2, 3))

    def input_scale(self, x):
        return conv_input_scale(x, self.kernel_size, self.stride, self.padding, self.dilation)

    @staticmethod
    def integer_accumulator(step) -> bool:
        """Whether the conv of integer codes can be scaled after the sum: one step for the whole input."""
        return step.numel() == 1


class QuantizedLinear(QuantizedLayer, nn.Linear):
    float_type = nn.Linear

    @property
    def input_features(self) -> int:
        return self.in_features

    def float_op(self, x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def channel_view(v):
        return v

    @staticmethod
    def has_fast_backward() -> bool:
        return True

    @staticmethod
    def op_backward(g, x, weight, need_x):
        rows_g, rows_x = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = (rows_g @ weight).view_as(x) if need_x else None
        return grad_x, rows_g.T @ rows_x

    @staticmethod
    def output_channel_sum(g):
        return g.reshape(-1, g.shape[-1]).sum(0)

    def input_scale(self, x):
        return linear_input_scale(x)

    @staticmethod
    def integer_accumulator(step) -> bool:
        """Always: each output row's inputs are one token, with one step."""
        return True
