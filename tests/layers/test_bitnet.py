"""BitNet b1.58 and BitNet (layers.bitnet) against direct float64 transcriptions of their formulas:
the BitNet FAQ code's weight_quant / activation_quant / RMSNorm for b1.58, the paper's centred sign,
mean-|W| scale and LayerNorm for BitNet; the STE gradients; the input normalization; the per-token
int8 codes; the float-Linear state_dict contract; and the packed export's exactness."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layers
import qat
import qat.export
from layers.bitnet import AbsMaxActivation, absmax_codes

DIRECT_NORMS = {
    "rms": lambda x, d: x / torch.sqrt(x.pow(2).mean(d, keepdim=True) + 1e-5),
    "layer": lambda x, d: (x - x.mean(d, keepdim=True)) / torch.sqrt(x.var(d, unbiased=False, keepdim=True) + 1e-5),
}


def faq_activation_quant(x, dim=-1):
    """The FAQ's activation_quant: scale = 127 / max|x|.clamp(1e-5); round(x * scale).clamp(-128, 127) / scale."""
    scale = 127.0 / x.abs().amax(dim=dim, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


def faq_weight_quant(w):
    """The FAQ's weight_quant: scale = 1 / mean|W|.clamp(1e-5); round(W * scale).clamp(-1, 1) / scale."""
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1) / scale


def bitnet_weight_quant(w):
    """BitNet (2023): sign(W - mean W) (0 -> -1, as the paper's Sign) times ||W||_1 / (n m)."""
    return torch.where(w - w.mean() > 0, 1.0, -1.0).to(w.dtype) * w.abs().mean()


WEIGHT_QUANT = {"bitnet158": faq_weight_quant, "bitnet": bitnet_weight_quant}
NORM_OF = {"bitnet158": "rms", "bitnet": "layer"}


def direct_linear(method, layer, x, input_norm=True, ste=False):
    """BitLinear in float64: x_q = Q_8(norm(x)), W_q = Q_w(W), y = x_q W_q^T + b; with ``ste`` the
    reference code's x + (Q(x) - x).detach() on both, for gradients."""
    w = layer.weight.detach().double().requires_grad_(ste)
    b = layer.bias.detach().double().requires_grad_(ste) if layer.bias is not None else None
    n = DIRECT_NORMS[NORM_OF[method]](x, -1) if input_norm else x
    x_q, w_q = faq_activation_quant(n), WEIGHT_QUANT[method](w)
    if ste:
        x_q, w_q = n + (x_q - n).detach(), w + (w_q - w).detach()
    return F.linear(x_q, w_q, b), w, b


def tokens(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    x[..., 3] *= 8.0  # an outlier feature, as transformer activations have
    return x


@pytest.mark.parametrize("method", ["bitnet158", "bitnet"])
@pytest.mark.parametrize("input_norm", [True, False])
def test_forward_is_the_direct_formula(method, input_norm):
    torch.manual_seed(1)
    layer = layers.LAYER_CLASSES[(method, nn.Linear)](48, 24, input_norm=input_norm)
    x = tokens(3, 5, 48)
    expected, _, _ = direct_linear(method, layer, x.double(), input_norm)
    # float32 against float64: a code could flip only at a .5 tie; none lies within 1e-4 here
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    if method == "bitnet158":  # the weight itself: what the FAQ code's weight_quant gives, in float32
        torch.testing.assert_close(layer.quantized_weight(), faq_weight_quant(layer.weight.detach()),
                                   rtol=1e-6, atol=0)


def test_quantized_weights_are_the_methods_sets_with_one_scale_per_layer():
    torch.manual_seed(0)
    ternary = layers.BitNet158Linear(64, 32)
    q = ternary.quantized_weight().detach()
    gamma = ternary.weight.detach().abs().mean()
    assert set((q / gamma).unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(q.abs().unique(), torch.stack([torch.tensor(0.0), gamma]))
    # RoundClip: |W| < gamma / 2 -> 0, else sign(W)
    w = ternary.weight.detach()
    assert torch.equal(q == 0, w.abs() < gamma / 2)
    binary = layers.BitNetLinear(64, 32)
    with torch.no_grad():
        binary.weight.add_(0.3)  # a matrix with a mean far from 0: centring matters
    w = binary.weight.detach()
    q = binary.quantized_weight().detach()
    assert torch.equal(q, torch.where(w > w.mean(), 1.0, -1.0) * w.abs().mean())
    assert 0.4 < float((q > 0).float().mean()) < 0.6  # sign(W) alone would be almost all +1
    for layer in (ternary, binary):
        assert layer.weight_quantizer.scale_count(layer.weight) == 1


@pytest.mark.parametrize("method", ["bitnet158", "bitnet"])
def test_ste_gradients_are_the_reference_codes(method):
    torch.manual_seed(2)
    layer = layers.LAYER_CLASSES[(method, nn.Linear)](32, 16)
    x = tokens(2, 7, 32).requires_grad_()
    g = torch.randn(2, 7, 16)
    layer(x).backward(g)
    x64 = x.detach().double().requires_grad_()
    y, w, b = direct_linear(method, layer, x64, ste=True)
    y.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad.double(), w.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad.double(), b.grad, rtol=1e-6, atol=1e-6)


def test_without_norm_the_input_gradient_is_the_quantized_weights_transpose():
    torch.manual_seed(3)
    layer = layers.BitNet158Linear(20, 6, bias=False, input_norm=False)
    x = torch.randn(4, 20, requires_grad=True)
    g = torch.randn(4, 6)
    layer(x).backward(g)
    assert torch.allclose(x.grad, g @ layer.quantized_weight().detach(), rtol=1e-5, atol=1e-6)
    x_q = layer.quantize_input(x).detach()
    assert torch.allclose(layer.weight.grad, g.T @ x_q, rtol=1e-5, atol=1e-6)


def test_a_non_identity_input_estimator_masks_the_gradient():
    torch.manual_seed(9)
    identity = layers.BitNet158Linear(8, 3, input_norm=False)
    clipped = layers.BitNet158Linear(8, 3, input_norm=False, input_estimator="clipped_ste")
    clipped.load_state_dict(identity.state_dict())
    grads = []
    for layer in (identity, clipped):
        x = torch.linspace(-2, 2, 16).view(2, 8).requires_grad_()
        layer(x).sum().backward()
        grads.append(x.grad)
    inside = x.detach().abs() <= 1
    assert torch.equal(grads[1], grads[0] * inside) and bool((grads[0][~inside] != 0).any())


@pytest.mark.parametrize("method, centred", [("bitnet158", False), ("bitnet", True)])
def test_input_norm_makes_the_layer_scale_invariant_and_can_be_turned_off(method, centred):
    torch.manual_seed(4)
    normed = layers.LAYER_CLASSES[(method, nn.Linear)](32, 8, bias=False)
    plain = layers.LAYER_CLASSES[(method, nn.Linear)](32, 8, bias=False, input_norm=False)
    plain.load_state_dict(normed.state_dict())
    x = tokens(4, 32)
    n = normed.quantize_input(x).detach()
    assert torch.allclose(n.square().mean(-1), torch.ones(4), atol=0.05)  # RMS 1 after norm (and 8 bits)
    if centred:
        assert n.mean(-1).abs().max() < 0.05
    torch.testing.assert_close(normed(x * 5.0), normed(x), rtol=1e-5, atol=1e-6)
    # without the norm: absmax quantization is scale-equivariant, not invariant
    torch.testing.assert_close(plain(x * 5.0), plain(x) * 5.0, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain(x), normed(x), atol=1e-2)


def test_per_token_codes_steps_and_the_clamp_range():
    x = tokens(6, 40)
    x[2] *= 1000.0  # one loud token
    x[4] = 0.0      # a silent one: eps keeps it finite
    codes, step = absmax_codes(x)
    assert step.shape == (6, 1)
    assert torch.equal(codes, codes.round()) and codes.min() >= -128 and codes.max() <= 127
    peak = x.abs().amax(-1)
    assert torch.equal(step.squeeze(1), peak.clamp(min=1e-5) / 127)
    assert torch.equal(codes[[0, 1, 2, 3, 5]].abs().amax(-1), torch.full((5,), 127.0))  # each token's max -> 127
    assert torch.equal(codes[4], torch.zeros(40))
    # tokens are independent: the loud token changes no other token's codes
    quiet = x.clone()
    quiet[2] /= 1000.0
    assert torch.equal(absmax_codes(quiet)[0][[0, 1, 3, 4, 5]], codes[[0, 1, 3, 4, 5]])
    # per tensor: one step, and the loud token crushes the others towards 0
    codes_t, step_t = absmax_codes(x, "tensor")
    assert step_t.shape == (1, 1) and float(step_t) == float(peak.max() / 127)
    assert codes_t[0].abs().max() <= 1


def test_conv_tokens_are_pixels():
    torch.manual_seed(5)
    conv = layers.BitNet158Conv2d(6, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 6, 5, 5)
    quantizer = conv.input_quantizer
    n = quantizer.normalize(x)
    assert torch.allclose(n.square().mean(1), torch.ones(2, 5, 5), atol=1e-4)  # RMSNorm over channels per pixel
    codes, step = quantizer.factors(n)
    assert step.shape == (2, 1, 5, 5)
    x_q = (codes * step).double()
    expected = F.conv2d(x_q, conv.quantized_weight().detach().double(), padding=1)
    torch.testing.assert_close(conv(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["bitnet158", "bitnet"])
@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(padding=1, padding_mode="reflect"),
                                    dict(padding=1, input_granularity="tensor")])
def test_conv_gradients_are_the_ste_of_the_forward(method, kwargs):
    torch.manual_seed(6)
    conv = layers.LAYER_CLASSES[(method, nn.Conv2d)](4, 5, 3, **kwargs)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    g = torch.randn(2, 5, 6, 6)
    conv(x).backward(g)
    # the same function written with autograd: norm, STE quantizers, float conv
    x2 = x.detach().clone().requires_grad_()
    w = conv.weight.detach().clone().requires_grad_()
    n = conv.input_quantizer.normalize(x2)
    x_q = n + (conv.input_quantizer.dequantize(n) - n).detach()
    w_q = w + (conv.weight_quantizer.project(w) - w).detach()
    padded = F.pad(x_q, (1, 1, 1, 1), mode=kwargs.get("padding_mode", "constant"))
    F.conv2d(padded, w_q, conv.bias).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, w.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("float_type, args", [(nn.Linear, (12, 5)), (nn.Conv2d, (3, 4, 3))])
@pytest.mark.parametrize("method", ["bitnet158", "bitnet"])
def test_a_float_layers_state_dict_loads_as_is(method, float_type, args):
    float_layer = float_type(*args)
    layer = layers.LAYER_CLASSES[(method, float_type)](*args)
    layer.load_state_dict(float_layer.state_dict())  # strict
    assert set(layer.state_dict()) == set(float_layer.state_dict())  # the norms add no parameters
    assert torch.equal(layer.weight, float_layer.weight)


def test_the_binary_input_table_meaning():
    for name in ("bitnet158", "bitnet"):
        method = layers.METHODS[name]
        assert method.input_bits == 8 and method.quantized_inputs and not method.binary_inputs
        assert layers.weights_only_method(name) == "fp"
        assert not layers.binary_inputs(name)
    assert layers.method_bits("bitnet158") == (2, 8) and layers.method_bits("bitnet") == (1, 8)


class TokenModel(nn.Module):
    """A transformer-shaped stack of linears on [batch, tokens, features]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(10, 32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32, bias=False)
        self.head = nn.Linear(32, 7)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.down(F.relu(self.up(h)).square())
        return self.head(h)


@pytest.mark.parametrize("method", ["bitnet158", "bitnet"])
def test_packed_export_is_bit_identical_and_its_int8_inputs_feed_an_integer_kernel(method, tmp_path):
    torch.manual_seed(7)
    model = qat.quantize_model(TokenModel(), {"method": method}).eval()
    x = tokens(3, 9, 10)
    with torch.no_grad():
        expected = model(x)
        packed = qat.export.pack_model(model)
        assert torch.equal(packed(x), expected)
    up = packed.up
    assert (up.spec.input_bits, up.spec.input_norm, up.spec.shared_scale, up.spec.binary_input) == \
        (8, NORM_OF[method], True, False)
    assert up.spec.code == ("ternary" if method == "bitnet158" else "binary")
    assert not hasattr(up, "weight") and up.scale.shape == (1,)
    # what a native int8 x ternary/binary kernel computes: the int32 accumulator, then the float epilogue
    h = model.embed(x).detach()
    codes, step = up.int8_input(h)
    assert codes.dtype == torch.int8 and step.shape == (3, 9, 1)
    acc = (codes.long() @ up.codes().long().T).to(torch.int32)
    kernel = acc.float().mul_(step * up.scale).add_(up.bias)
    assert torch.equal(kernel, model.up(h).detach())
    path = qat.export.save_packed(packed, tmp_path / "tokens.safetensors", architecture=False)
    loaded = qat.export.load_packed(path, model=TokenModel())
    assert loaded.up.spec == up.spec
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_packed_export_with_per_tensor_steps_and_no_norm():
    torch.manual_seed(8)
    spec = {"method": "bitnet158", "input_granularity": "tensor", "input_norm": False}
    model = qat.quantize_model(TokenModel(), spec).eval()
    x = tokens(2, 4, 10)
    with torch.no_grad():
        packed = qat.export.pack_model(model)
        assert torch.equal(packed(x), model(x))
    assert (packed.up.spec.input_norm, packed.up.spec.input_granularity) == ("", "tensor")


def test_int8_input_is_refused_on_other_layers():
    model = qat.quantize_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)), {"method": "ternary"})
    packed = qat.export.pack_model(model.eval())
    with pytest.raises(ValueError, match="32-bit inputs, not 8"):
        packed[1].int8_input(torch.randn(2, 4))


def test_the_activation_quantizer_is_the_methods():
    assert isinstance(layers.BitNet158Linear(4, 4).input_quantizer, AbsMaxActivation)
    with pytest.raises(ValueError, match="input_granularity must be one of token, tensor"):
        layers.BitNetLinear(4, 4, input_granularity="channel")
