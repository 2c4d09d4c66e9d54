"""BitNet b1.58 and BitNet (layers.bitnet) against direct float64 transcriptions of their formulas:
the BitNet FAQ code's weight_quant / activation_quant / RMSNorm for b1.58, the paper's centred sign,
mean-|W| scale and LayerNorm for BitNet; the STE gradients; the input normalization; the per-token
int8 codes; the float-Linear state_dict contract; and the packed export's exactness."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layers
import qat
import qat.export
from kernels import cpu_native, native
from layers.bitnet import AbsMaxActivation, absmax_codes, rms_norm
from qat.export.packed import PackedLinear

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


def test_fitted_weight_scale_keeps_the_codes_and_takes_their_least_squares_scale(tmp_path):
    """weight_scale=fitted: absmean's codes T, scale <W, T> / <T, T> (mean |W| over T != 0), which no
    other scale beats in ||W - s T||; a packed model reproduces it; an all-zero W gets eps."""
    torch.manual_seed(3)
    plain = layers.BitNet158Linear(64, 32)
    fitted = layers.BitNet158Linear(64, 32, weight_scale="fitted")
    fitted.load_state_dict(plain.state_dict())
    w = plain.weight.detach()
    code, gamma = plain.weight_quantizer.factors(w)
    fitted_code, scale = fitted.weight_quantizer.factors(w)
    assert torch.equal(code, fitted_code) and float(gamma) == pytest.approx(float(w.abs().mean()))
    assert float(scale) == pytest.approx(float(w.abs()[code != 0].mean()), rel=1e-6)
    assert float(scale) > 1.2 * float(gamma)  # absmean's gamma sits well below it
    error = [float((w - s * code).norm()) for s in (scale * 0.99, scale, scale * 1.01, gamma)]
    assert error[1] < min(error[0], error[2], error[3])
    assert torch.equal(fitted.quantized_weight().detach(), scale * code)
    with torch.no_grad():
        fitted.weight.zero_()
    assert float(fitted.weight_quantizer.factors(fitted.weight)[1]) == pytest.approx(1e-5)
    model = qat.quantize_model(TokenModel(), {"method": "bitnet158", "weight_scale": "fitted"}).eval()
    x = tokens(2, 5, 10)
    with torch.no_grad():
        assert torch.equal(qat.export.pack_model(model)(x), model(x))
    with pytest.raises(ValueError, match="weight_scale must be one of absmean, fitted"):
        layers.BitNet158Linear(4, 4, weight_scale="mean")


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


# ---------------------------------------------------------------------------------------------
# The packed BitLinear on the native engine: bit-identical to the training layer
# ---------------------------------------------------------------------------------------------


class TinyGPT(nn.Module):
    """Two pre-norm causal transformer blocks (float softmax and norms, as BitNet keeps them) whose
    linears have K = 72 and 288, neither a multiple of the kernel's 128-wide blocks."""

    def __init__(self, vocab=11, width=72, heads=3, depth=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.heads = heads
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(width), "qkv": nn.Linear(width, 3 * width), "proj": nn.Linear(width, width),
            "norm2": nn.LayerNorm(width), "up": nn.Linear(width, 4 * width, bias=False),
            "down": nn.Linear(4 * width, width)}) for _ in range(depth))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](h)).unflatten(-1, (3, self.heads, -1)).unbind(-3)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            h = h + block["proj"](a.transpose(1, 2).flatten(-2))
            h = h + block["down"](F.relu(block["up"](block["norm2"](h))).square())
        return self.head(h)


def trained_gpt(spec: dict, seed: int = 3) -> nn.Module:
    """A TinyGPT quantized by ``spec`` after a few AdamW steps of next-token training on a random
    sequence (so the latent weights are not their initialization)."""
    torch.manual_seed(seed)
    model = qat.quantize_model(TinyGPT(), spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 11, (4, 17))
    for _ in range(4):
        loss = F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def hard_inputs(*lead: int, k: int, seed: int = 0) -> torch.Tensor:
    """[*lead, k] activations: token magnitudes from 1e-30 to 1e25 (squares that underflow and that
    overflow float32), an outlier feature, a zero token and a token below the 1e-5 clamp."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen)
    rows = x.view(-1, k)
    rows *= torch.logspace(-30, 25, rows.shape[0]).unsqueeze(1) if rows.shape[0] > 1 else 1.0
    rows[:, 5] *= 30.0
    if rows.shape[0] > 3:
        rows[1] = 0.0
        rows[2] = rows[2].sign() * 1e-7
    return x


needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")


def linear_inputs(k: int) -> list[torch.Tensor]:
    """M = 1 (one token, with and without a batch dim) and M > 1 ([B, T, K], and a strided view)."""
    wide = hard_inputs(3, k=2 * k, seed=k + 1)
    return [hard_inputs(k=k), hard_inputs(1, 1, k=k, seed=1), hard_inputs(2, 9, k=k, seed=2),
            hard_inputs(40, k=k, seed=3), wide[:, ::2]]


@needs_native
@pytest.mark.parametrize("spec,code,norm", [
    ({"method": "bitnet158"}, "ternary", "rms"),
    ({"method": "bitnet158", "input_norm": False}, "ternary", ""),
    ({"method": "bitnet", "input_norm": False}, "binary", ""),
])
def test_packed_linears_run_the_native_bitlinear_bit_identical_to_training(isa, spec, code, norm, monkeypatch):
    model = trained_gpt(spec)
    packed = qat.export.pack_model(model)
    names = [name for name, module in packed.named_modules() if isinstance(module, PackedLinear)]
    assert len(names) == 7  # every block linear but the first, which quantize_model keeps float
    for name in names:
        layer, trained = packed.get_submodule(name), model.get_submodule(name)
        assert (layer.spec.input_bits, layer.spec.code, layer.spec.input_norm) == (8, code, norm)
        for x in linear_inputs(layer.spec.in_features):
            with torch.no_grad():
                want = trained(x)
                torch_path = layer.int8_forward(x)
                with monkeypatch.context() as patch:  # the native layer computes it, not int8_forward
                    patch.setattr(layer, "int8_forward", None)
                    got = layer(x)
            assert isinstance(layer._native, cpu_native.TernaryI8Linear)
            assert got.shape == want.shape and got.dtype == torch.float32
            assert torch.equal(got, want), (isa, name, tuple(x.shape))
            assert torch.equal(got, torch_path), (isa, name, tuple(x.shape))
    tokens = torch.randint(0, 11, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(packed(tokens), model(tokens))
        assert torch.equal(packed(tokens[:1, :1]), model(tokens[:1, :1]))


@needs_native
def test_the_native_bitlinear_is_rebuilt_after_a_state_dict_load():
    first, second = trained_gpt({"method": "bitnet158"}, seed=3), trained_gpt({"method": "bitnet158"}, seed=4)
    packed, other = qat.export.pack_model(first), qat.export.pack_model(second)
    x = hard_inputs(3, 4, k=72)
    layer = packed.blocks[1].qkv
    with torch.no_grad():
        before = layer(x)
        packed.load_state_dict(other.state_dict())
        after = layer(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, second.blocks[1].qkv(x).detach())


@needs_native
@pytest.mark.parametrize("spec", [{"method": "bitnet"}, {"method": "bitnet158", "input_granularity": "tensor"}])
def test_layernorm_and_per_tensor_steps_keep_the_torch_path(spec, monkeypatch):
    model = trained_gpt(spec)
    packed = qat.export.pack_model(model)
    layer = packed.blocks[0].up
    x = hard_inputs(2, 5, k=72)
    assert not layer.runs_int8_natively(x)
    calls = []
    monkeypatch.setattr(layer, "int8_forward", lambda v: calls.append(v) or PackedLinear.int8_forward(layer, v))
    with torch.no_grad():
        assert torch.equal(layer(x), model.blocks[0].up(x))
    assert len(calls) == 1 and layer._native is None
    assert not layer.runs_int8_natively(x.double())  # float64 inputs: torch too


def test_rms_norm_rounds_like_the_native_kernel():
    """``rms_norm``'s roundings, written out with NumPy: float32 squares summed in float64, the
    float32 add of eps, the correctly rounded float32 root, the float32 division."""
    x = hard_inputs(64, k=300, seed=9)
    with np.errstate(over="ignore"):  # the 1e25 token: its squares overflow to inf, as in torch
        squares = (x.numpy() * x.numpy()).astype(np.float64)
    ms = (squares.sum(axis=-1, keepdims=True) / 300).astype(np.float32)
    root = np.sqrt((ms + np.float32(1e-5)).astype(np.float64)).astype(np.float32)
    assert torch.equal(rms_norm(x, -1), torch.from_numpy(x.numpy() / root))
