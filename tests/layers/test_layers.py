"""The ten drop-in classes and their quantizers: value sets, scales, equality with the functional
ops, the float state_dict contract, schedules and errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import estimators
import layers
from layers import quantizers

CONV = ["XNORConv2d", "BWNConv2d", "TernaryConv2d", "HQConv2d", "FDAConv2d"]
LINEAR = ["XNORLinear", "BWNLinear", "TernaryLinear", "HQLinear", "FDALinear"]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def signs(t):
    return torch.where(t >= 0, 1.0, -1.0).to(t.dtype)


def hq_unit_ternary(w, sparsity):
    """HQ written from its definition: w^_c = W_c / ||W_c||, delta = the floor(s N)-th smallest |w^|
    of the layer, t_c = sign(w^_c) 1[|w^_c| > delta], t^_c = t_c / sqrt(||t_c||_0)."""
    unit = w / w.flatten(1).norm(dim=1).view(-1, *([1] * (w.dim() - 1)))
    pruned = math.floor(sparsity * unit.numel())
    kept = unit.abs() > (unit.abs().flatten().sort().values[pruned - 1] if pruned else -1.0)
    t = signs(unit) * kept
    return unit, t / t.flatten(1).abs().sum(dim=1).sqrt().view(-1, *([1] * (w.dim() - 1)))


def hq_cosine(w, sparsity):
    """mean over filters of cos(w^_c, t^_c) (both unit vectors)."""
    unit, t_hat = hq_unit_ternary(w, sparsity)
    return (unit * t_hat).flatten(1).sum(dim=1).mean().item()


def fda_noise(t, w1, w2, shortcut=0.1):
    """FDA's e(t) = ReLU(t W1^T) W2^T + a sin(t) along the last axis (Eq. 13)."""
    return F.relu(t @ w1.T) @ w2.T + shortcut * torch.sin(t)


def fourier_derivative(x, n, omega=0.1, clip=1.0):
    """(4w/pi) sum_{i<=n} cos((2i+1) w x), zeroed for |x| > clip (Eq. 10)."""
    return (4 * omega / math.pi) * sum(torch.cos((2 * i + 1) * omega * x) for i in range(n + 1)) * (x.abs() <= clip)


@pytest.mark.parametrize("name", CONV)
@pytest.mark.parametrize("kwargs", [
    dict(stride=1, padding=1, bias=True),
    dict(stride=2, padding=0, dilation=2, bias=False),
    dict(stride=1, padding=1, groups=2, bias=True, padding_mode="reflect"),
])
def test_conv_equals_functional_with_quantized_weight(name, kwargs):
    float_conv = nn.Conv2d(4, 6, 3, **kwargs)
    conv = getattr(layers, name)(4, 6, 3, **kwargs)
    assert isinstance(conv, nn.Conv2d)
    conv.load_state_dict(float_conv.state_dict())
    assert torch.equal(conv.weight, float_conv.weight)
    x = torch.randn(2, 4, 9, 9)
    padding_mode = kwargs.get("padding_mode", "zeros")
    padded = F.pad(conv.quantize_input(x), conv._reversed_padding_repeated_twice, mode=padding_mode) \
        if padding_mode != "zeros" else conv.quantize_input(x)
    padding = 0 if padding_mode != "zeros" else conv.padding
    expected = F.conv2d(padded, conv.quantized_weight(), conv.bias, conv.stride, padding, conv.dilation, conv.groups)
    exact = conv.input_quantizer is None  # binary-input layers scale after the +-1 sum
    torch.testing.assert_close(conv(x), expected, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


@pytest.mark.parametrize("name", LINEAR)
def test_linear_equals_functional_with_quantized_weight(name):
    float_linear = nn.Linear(10, 5)
    linear = getattr(layers, name)(10, 5, bias=True)
    assert isinstance(linear, nn.Linear)
    linear.load_state_dict(float_linear.state_dict())
    x = torch.randn(3, 10)
    expected = F.linear(linear.quantize_input(x), linear.quantized_weight(), linear.bias)
    exact = linear.input_quantizer is None
    torch.testing.assert_close(linear(x), expected, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


@pytest.mark.parametrize("name", ["XNORConv2d", "FDAConv2d"])
def test_binary_input_layers_sum_plus_minus_one_exactly(name):
    """y / alpha_c is the exact integer sum, ties (0) included: what the packed kernels compute."""
    conv = getattr(layers, name)(32, 8, 3, padding=1, bias=False)
    conv.set_progress(1.0)
    x = torch.randn(4, 32, 6, 6)
    alpha = conv.weight.detach().abs().mean(dim=(1, 2, 3)).view(1, -1, 1, 1)
    integer = F.conv2d(signs(x).double(), signs(conv.weight.detach()).double(), padding=1)
    assert (integer == 0).any()  # K = 288 is even: exact ties occur
    assert torch.equal(conv(x).double(), (integer.float() * alpha).double())


@pytest.mark.parametrize("name", ["BWNConv2d", "XNORConv2d"])
def test_scaled_sign_weights(name):
    conv = getattr(layers, name)(5, 7, 3)
    w = conv.weight.detach()
    q = conv.quantized_weight().detach()
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(q, signs(w) * alpha)
    for c in range(7):
        assert set(q[c].abs().unique().tolist()) == pytest.approx([alpha[c].item()])


def test_xnor_input_is_binary_and_sign_of_zero_is_plus_one():
    conv = layers.XNORConv2d(2, 2, 1)
    x = torch.tensor([[[[0.0, -0.0], [-2.0, 3.0]], [[0.5, -0.5], [0.0, 1.0]]]])
    assert torch.equal(conv.quantize_input(x), torch.tensor([[[[1.0, 1.0], [-1.0, 1.0]], [[1.0, -1.0], [1.0, 1.0]]]]))
    assert conv.input_bits == 1 and conv.weight_bits == 1
    assert layers.BWNConv2d(2, 2, 1).input_bits == 32


def test_bwn_weight_gradient_is_the_exact_chain_rule():
    """dC/dW_i = (1/n) sign(W_i) sum_j g_j sign(W_j) + alpha 1[|W_i| <= 1] g_i (jiecaoyu's notes)."""
    layer = layers.BWNLinear(6, 3, bias=False).double()
    with torch.no_grad():
        layer.weight.mul_(4)  # put some latent weights outside the clip range
    g = torch.randn(3, 6, dtype=torch.float64)
    layer.quantized_weight().backward(g)
    w = layer.weight.detach()
    s, n = signs(w), w.shape[1]
    alpha = w.abs().mean(dim=1, keepdim=True)
    expected = s / n * (g * s).sum(dim=1, keepdim=True) + alpha * (w.abs() <= 1) * g
    torch.testing.assert_close(layer.weight.grad, expected)


def test_bwn_detached_scale_option():
    layer = layers.BWNLinear(6, 3, bias=False, detach_scale=True).double()
    g = torch.randn(3, 6, dtype=torch.float64)
    layer.quantized_weight().backward(g)
    w = layer.weight.detach()
    torch.testing.assert_close(layer.weight.grad, w.abs().mean(dim=1, keepdim=True) * (w.abs() <= 1) * g)


def test_ternary_twn_threshold_and_scale():
    conv = layers.TernaryConv2d(8, 4, 3)
    w = conv.weight.detach()
    delta = 0.7 * w.abs().mean()
    kept = w.abs() > delta
    alpha = w.abs()[kept].mean()
    q = conv.quantized_weight().detach()
    torch.testing.assert_close(q, alpha * signs(w) * kept)
    assert set(q.unique().tolist()) == pytest.approx(sorted({-alpha.item(), 0.0, alpha.item()}))
    assert conv.weight_bits == 2


def test_ternary_per_channel_option():
    conv = layers.TernaryConv2d(8, 4, 3, per_channel=True)
    w = conv.weight.detach()
    q = conv.quantized_weight().detach()
    for c in range(4):
        delta = 0.7 * w[c].abs().mean()
        kept = w[c].abs() > delta
        torch.testing.assert_close(q[c], w[c].abs()[kept].mean() * signs(w[c]) * kept)


def test_ternary_backward_is_straight_through():
    layer = layers.TernaryLinear(5, 3, bias=False)
    g = torch.randn(3, 5)
    layer.quantized_weight().backward(g)
    torch.testing.assert_close(layer.weight.grad, g)


def test_hq_unit_ternary_filters_and_schedule():
    conv = layers.HQConv2d(16, 8, 3, target_sparsity=0.8, prune_end=0.5)
    assert conv.diagnostics()["sparsity"] == 0.0  # p = 0: no pruning yet, t = sign(w^)
    conv.set_progress(0.25)
    expected = 0.8 * (1 - 0.5 ** 3)
    assert conv.weight_quantizer.sparsity == pytest.approx(expected)
    assert conv.diagnostics()["sparsity"] == pytest.approx(expected, abs=1 / conv.weight.numel())
    q = conv.quantized_weight().detach()
    for c in range(8):
        k = (q[c] != 0).sum().item()
        nonzero = q[c][q[c] != 0].abs()
        torch.testing.assert_close(nonzero, torch.full_like(nonzero, 1 / math.sqrt(k)))
        assert torch.linalg.vector_norm(q[c]).item() == pytest.approx(1.0)
    cos_before = conv.diagnostics()["cosine_similarity"]
    assert 0 < cos_before < 1
    assert cos_before == pytest.approx(hq_cosine(conv.weight.detach(), expected), rel=1e-6)
    torch.testing.assert_close(q, hq_unit_ternary(conv.weight.detach(), expected)[1])


def test_hq_reaches_target_sparsity_and_reinitialises():
    conv = layers.HQConv2d(16, 8, 3, target_sparsity=0.9)
    w_norm = torch.linalg.vector_norm(conv.weight.detach().flatten(1), dim=1)
    conv.set_progress(0.6)  # past prune_end = 0.5
    assert conv.diagnostics()["sparsity"] == pytest.approx(0.9, abs=1 / conv.weight.numel())
    # reinitialisation: latent weights moved to the ternary point, same norms, cosine 1
    assert conv.diagnostics()["cosine_similarity"] == pytest.approx(1.0)
    torch.testing.assert_close(torch.linalg.vector_norm(conv.weight.detach().flatten(1), dim=1), w_norm)
    assert (conv.weight == 0).float().mean().item() == pytest.approx(0.9, abs=1 / conv.weight.numel())
    snapshot = conv.weight.detach().clone()
    conv.set_progress(0.8)  # only once
    assert torch.equal(conv.weight, snapshot)


def test_hq_keeps_target_sparsity_while_training():
    torch.manual_seed(1)
    model = nn.Sequential(layers.HQLinear(32, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    for step in range(40):
        model[0].set_progress(step / 39)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model[0].diagnostics()["sparsity"] == pytest.approx(0.7, abs=1 / 512)
    assert 0.5 < model[0].diagnostics()["cosine_similarity"] <= 1.0
    assert model[0].diagnostics()["cosine_similarity"] == pytest.approx(hq_cosine(model[0].weight.detach(), 0.7),
                                                                        rel=1e-6)


def test_fda_builds_noise_modules_eagerly_with_nonzero_width():
    conv = layers.FDAConv2d(3, 8, 3)  # d = 3 < 64 for the activation NAM
    names = {n for n, _ in conv.named_parameters()}
    assert {"input_quantizer.nam.w1", "weight_quantizer.nam.w1"} <= names
    assert conv.input_quantizer.nam.hidden == 1 and conv.weight_quantizer.nam.hidden == 1
    x = torch.randn(2, 3, 6, 6)
    conv(x).square().sum().backward()
    for name in ("input_quantizer.nam.w1", "input_quantizer.nam.w2",
                 "weight_quantizer.nam.w1", "weight_quantizer.nam.w2"):
        assert conv.get_parameter(name).grad.abs().sum() > 0, name


def test_fda_schedule_ends_purely_binary():
    conv = layers.FDAConv2d(8, 4, 3, padding=1)
    assert conv.diagnostics()["noise_weight"] == pytest.approx(0.1) and conv.diagnostics()["terms"] == 9
    conv.set_progress(0.5)
    assert conv.diagnostics()["noise_weight"] == pytest.approx(0.05)
    conv.set_progress(1.0)
    assert conv.diagnostics()["noise_weight"] == 0.0 and conv.diagnostics()["terms"] == 18
    binary = layers.XNORConv2d(8, 4, 3, padding=1)
    binary.load_state_dict({k: v for k, v in conv.state_dict().items() if "nam" not in k})
    x = torch.randn(2, 8, 7, 7)
    w = conv.weight.detach()
    torch.testing.assert_close(conv.quantized_weight(), signs(w) * w.abs().mean(dim=(1, 2, 3), keepdim=True))
    torch.testing.assert_close(conv(x), binary(x))
    assert set(conv.quantize_input(x).unique().tolist()) == {-1.0, 1.0}


def test_fda_noise_term_is_in_forward_before_the_end():
    conv = layers.FDALinear(8, 4)
    x = torch.randn(3, 8)
    assert not set(conv.quantize_input(x).unique().tolist()) <= {-1.0, 1.0}
    # exactly z = sign(x) + alpha(p) e(x), alpha(0) = 0.1, and likewise for the weights
    nam = conv.input_quantizer.nam
    torch.testing.assert_close(conv.quantize_input(x), signs(x) + 0.1 * fda_noise(x, nam.w1, nam.w2))
    w, wnam = conv.weight.detach(), conv.weight_quantizer.nam
    torch.testing.assert_close(conv.quantized_weight(),
                               (signs(w) + 0.1 * fda_noise(w, wnam.w1, wnam.w2)) * w.abs().mean(1, keepdim=True))


def test_fda_eval_runs_the_binary_network():
    """At p = 0.5 (alpha = 0.05) eval() computes exactly the binary network (= the layer at p = 1):
    inputs sign(x), weights mean|W_c| sign(W); train() still adds the noise term."""
    import copy
    torch.manual_seed(4)
    conv = layers.FDAConv2d(8, 6, 3, padding=1, bias=True)
    conv.set_progress(0.5)
    at_end = copy.deepcopy(conv)
    at_end.set_progress(1.0)
    x = torch.randn(2, 8, 7, 7)
    w = conv.weight.detach()
    alpha = w.abs().mean(dim=(1, 2, 3)).view(1, -1, 1, 1)
    binary = F.conv2d(signs(x), signs(w), padding=1) * alpha + conv.bias.detach().view(1, -1, 1, 1)
    seen = []
    conv.float_op = lambda x_q, code, bias: seen.append((x_q, code)) or type(conv).float_op(conv, x_q, code, bias)
    conv.eval()
    y = conv(x)
    x_q, code = seen[-1]
    assert set(x_q.unique().tolist()) == {-1.0, 1.0} and torch.equal(x_q, signs(x))
    assert torch.equal(code, signs(w))
    assert torch.equal(y, at_end.eval()(x)) and torch.equal(y, at_end.train()(x))
    torch.testing.assert_close(y, binary, rtol=0, atol=0)
    torch.testing.assert_close(conv.quantized_weight(), signs(w) * alpha.view(-1, 1, 1, 1), rtol=0, atol=0)
    # train(): the noise term is applied to both paths (Fig. 2a)
    conv.train()
    y_train = conv(x)
    x_q, code = seen[-1]
    nam, wnam = conv.input_quantizer.nam, conv.weight_quantizer.nam
    noisy_x = signs(x) + 0.05 * fda_noise(x.movedim(1, -1), nam.w1, nam.w2).movedim(-1, 1)
    noisy_w = (signs(w.flatten(1)) + 0.05 * fda_noise(w.flatten(1), wnam.w1, wnam.w2)).view_as(w)
    torch.testing.assert_close(x_q, noisy_x)
    torch.testing.assert_close(code, noisy_w)
    torch.testing.assert_close(y_train,
                               F.conv2d(noisy_x, noisy_w, padding=1) * alpha + conv.bias.detach().view(1, -1, 1, 1))
    assert not torch.equal(y_train, y)


def test_fda_model_eval_equals_the_model_at_the_end_of_training():
    import copy

    import qat
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 16),
                          nn.Linear(16, 4))
    model = qat.quantize_model(model, {"method": "fda"})
    assert sum(isinstance(m, (layers.FDAConv2d, layers.FDALinear)) for m in model.modules()) == 3
    qat.set_progress(model, 0.5)
    at_end = copy.deepcopy(model)
    qat.set_progress(at_end, 1.0)
    x = torch.randn(4, 3, 6, 6)
    model.eval(), at_end.eval()
    assert torch.equal(model(x), at_end(x))
    model.train(), at_end.train()
    assert not torch.allclose(model(x), at_end(x))


def test_xnor_activation_scale_k():
    conv = layers.XNORConv2d(3, 4, 3, padding=1, stride=2, activation_scale=True, bias=False)
    x = torch.randn(2, 3, 8, 8)
    a = x.abs().mean(dim=1, keepdim=True)
    k = F.avg_pool2d(F.pad(a, (1, 1, 1, 1)), 3, stride=2)  # box filter of 1/9, zero padded
    plain = F.conv2d(signs(x), conv.quantized_weight(), None, 2, 1)
    torch.testing.assert_close(conv(x), plain * k)
    lin = layers.XNORLinear(6, 2, activation_scale=True)
    z = torch.randn(4, 6)
    torch.testing.assert_close(lin(z),
                               F.linear(signs(z), lin.quantized_weight(), lin.bias) * z.abs().mean(-1, keepdim=True))


@pytest.mark.parametrize("name", ["BWNConv2d", "TernaryConv2d", "HQConv2d"])
def test_gradcheck_float_input_layers(name):
    conv = getattr(layers, name)(2, 3, 3, padding=1).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (x,))


def per_filter(reduce_sum):
    return reduce_sum.flatten(1).sum(dim=1).view(-1, *([1] * (reduce_sum.dim() - 1)))


def bwn_weight_grad(w, grad_w_tilde):
    """XNOR-Net's exact chain rule through alpha_c sign(W_c) with the clipped STE:
    (1/n) sign(W_i) sum_j G_j sign(W_j) + alpha 1[|W_i| <= 1] G_i."""
    s, n = signs(w), w[0].numel()
    alpha = per_filter(w.abs()) / n
    return s / n * per_filter(grad_w_tilde * s) + alpha * (w.abs() <= 1) * grad_w_tilde


@pytest.mark.parametrize("name", ["BWNConv2d", "TernaryConv2d", "HQConv2d"])
def test_float_input_layers_weight_gradient_is_the_formula(name):
    """dL/dW from G = dL/dW~ (the conv's own weight gradient at W~ = Q(W)) and each method's
    backward, written from its definition: the input gradcheck cannot see the weight path."""
    torch.manual_seed(6)
    conv = getattr(layers, name)(3, 4, 3, padding=1, bias=True).double()
    with torch.no_grad():
        conv.weight.mul_(8)  # latent weights on both sides of BWN's clip at |W| = 1
    conv.set_progress(0.3)  # HQ: some pruning (no reinitialisation before p = 0.5)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    y = conv(x)
    g = torch.randn_like(y)
    y.backward(g)
    w = conv.weight.detach()
    G = torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1)
    if name == "BWNConv2d":
        assert (w.abs() > 1).any() and (w.abs() <= 1).any()
        expected = bwn_weight_grad(w, G)
    elif name == "TernaryConv2d":
        expected = G  # straight through (identity estimator), delta and alpha constant
    else:  # straight through from t^ to w^, then through w^ = W / ||W_c||
        norm = per_filter(w.square()).sqrt()
        unit = w / norm
        expected = (G - unit * per_filter(unit * G)) / norm
    assert expected.abs().sum() > 0
    torch.testing.assert_close(conv.weight.grad, expected)
    torch.testing.assert_close(conv.bias.grad, g.sum(dim=(0, 2, 3)))


@pytest.mark.parametrize("name,progress", [
    ("XNORConv2d", 0.0), ("XNORLinear", 0.0), ("FDAConv2d", 1.0), ("FDAConv2d", 0.4), ("FDALinear", 0.4),
])
def test_binary_input_layers_weight_gradient_is_the_formula(name, progress):
    """The weight (and weight-NAM) gradients of XNOR and FDA from independent formulas."""
    torch.manual_seed(7)
    is_conv = name.endswith("Conv2d")
    layer = (getattr(layers, name)(4, 6, 3, padding=1) if is_conv else getattr(layers, name)(12, 5)).double()
    with torch.no_grad():
        layer.weight.mul_(6)
    layer.set_progress(progress)
    x = torch.randn(*((2, 4, 6, 6) if is_conv else (7, 12)), dtype=torch.float64)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    x_q = layer.quantize_input(x).detach()  # sign(x), plus FDA's noise while training
    w = layer.weight.detach()
    G = torch.nn.grad.conv2d_weight(x_q, w.shape, g, padding=1) if is_conv else g.T @ x_q
    if name.startswith("XNOR"):
        torch.testing.assert_close(layer.weight.grad, bwn_weight_grad(w, G))
        return
    # FDA: W~ = (sign(W_c) + a e(W_c)) * mean|W_c| (scale detached), Fourier backward for sign
    a = 0.1 * (1 + math.cos(math.pi * progress)) / 2
    n = min(18, 9 + math.floor(10 * progress))
    rows = w.flatten(1)
    v = (G * (per_filter(w.abs()) / w[0].numel())).flatten(1)  # dL/dcode
    nam = layer.weight_quantizer.nam
    w1, w2 = nam.w1.detach().clone().requires_grad_(True), nam.w2.detach().clone().requires_grad_(True)
    t = rows.clone().requires_grad_(True)
    (a * fda_noise(t, w1, w2) * v).sum().backward()
    expected = fourier_derivative(rows, n) * v + t.grad
    torch.testing.assert_close(layer.weight.grad, expected.view_as(w))
    if a == 0.0:
        assert nam.w1.grad is None or nam.w1.grad.abs().sum() == 0
    else:
        torch.testing.assert_close(nam.w1.grad, w1.grad)
        torch.testing.assert_close(nam.w2.grad, w2.grad)


def test_gradcheck_noise_adaptation_and_activation_scale():
    nam = layers.NoiseAdaptation(5, reduction=2).double()
    t = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(nam, (t,))
    conv = layers.XNORConv2d(2, 2, 3, padding=1, stride=2, activation_scale=True).double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    # sign(x) has a surrogate derivative, so gradcheck only the smooth K map
    assert torch.autograd.gradcheck(conv.input_scale, (x,))


@pytest.mark.parametrize("name", CONV)
def test_quantized_state_dict_round_trip(name):
    a = getattr(layers, name)(4, 4, 3)
    b = getattr(layers, name)(4, 4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(a(x), b(x))


def test_partial_noise_module_state_is_an_error():
    a = layers.FDAConv2d(4, 4, 3)
    state = a.state_dict()
    del state["weight_quantizer.nam.w2"]
    with pytest.raises(RuntimeError, match="w2"):
        layers.FDAConv2d(4, 4, 3).load_state_dict(state)


def test_estimator_options():
    conv = layers.XNORConv2d(2, 2, 3, weight_estimator="identity", input_estimator={"name": "swish_sign", "beta": 2})
    assert conv.weight_quantizer.estimator.name == "identity"
    assert conv.input_quantizer.estimator.beta == 2
    assert layers.BWNConv2d(2, 2, 3, estimator="ede").weight_quantizer.estimator.name == "ede"


@pytest.mark.parametrize("kwargs,needle", [
    (dict(foo=1), "foo"),
    (dict(estimator="nope"), "nope"),
    (dict(target_sparsity=0.5), "target_sparsity"),
])
def test_bad_options_raise(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        layers.XNORConv2d(2, 2, 3, **kwargs)


def test_bad_method_hyperparameters_raise():
    with pytest.raises(ValueError, match="target_sparsity"):
        layers.HQConv2d(2, 2, 3, target_sparsity=1.5)
    with pytest.raises(ValueError, match="threshold_factor"):
        layers.TernaryLinear(2, 2, threshold_factor=-1)


def test_device_and_dtype_arguments():
    conv = layers.FDAConv2d(2, 3, 3, dtype=torch.float64)
    assert conv.weight.dtype == torch.float64 and conv.weight_quantizer.nam.w1.dtype == torch.float64


def test_hq_reinitialisation_state_survives_a_checkpoint():
    conv = layers.HQConv2d(8, 4, 3, target_sparsity=0.5)
    conv.set_progress(0.7)
    with torch.no_grad():
        conv.weight.add_(0.01 * torch.randn_like(conv.weight))  # training moves on after the reset
    resumed = layers.HQConv2d(8, 4, 3, target_sparsity=0.5)
    resumed.load_state_dict(conv.state_dict())
    resumed.set_progress(0.8)
    assert torch.equal(resumed.weight, conv.weight)
    fresh = layers.HQConv2d(8, 4, 3, target_sparsity=0.5)
    fresh.load_state_dict(layers.HQConv2d(8, 4, 3).state_dict()
                          | {"weight_quantizer.reinitialized": torch.tensor(False)})
    before = fresh.weight.detach().clone()
    fresh.set_progress(0.8)
    assert not torch.equal(fresh.weight, before)
    # the reinitialisation: W_c <- ||W_c|| t^_c
    norms = before.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(fresh.weight.detach(), norms * hq_unit_ternary(before, 0.5)[1])


@pytest.mark.parametrize("shape,channels_last", [((2, 5, 4, 3), False), ((2, 5, 4, 3), True), ((6, 5), False)])
def test_fused_fda_activation_matches_autograd_of_the_formula(shape, channels_last):
    torch.manual_seed(3)
    act = quantizers.FourierActivation(estimators.get("fourier"), features=5, nam_reduction=2).double()
    act.set_progress(0.3)
    x = torch.randn(*shape, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    g = torch.randn(*shape, dtype=torch.float64)
    fused = act(x)
    fused.backward(g)
    grads_fused = [x.grad.clone(), act.nam.w1.grad.clone(), act.nam.w2.grad.clone()]
    x.grad = act.nam.w1.grad = act.nam.w2.grad = None
    reference = act.binarize(x, feature_dim=1 if len(shape) == 4 else -1)  # estimator + NAM via autograd
    reference.backward(g)
    torch.testing.assert_close(fused, reference)
    for got, want in zip(grads_fused, [x.grad, act.nam.w1.grad, act.nam.w2.grad], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name,kwargs", [
    ("XNORConv2d", dict(stride=2, padding=1, dilation=1, groups=2, bias=True)),
    ("XNORConv2d", dict(padding=2, dilation=2, bias=False)),
    ("FDAConv2d", dict(padding=1, bias=True)),
    ("XNORLinear", dict(bias=True)),
    ("FDALinear", dict(bias=False)),
])
def test_binary_input_backward_matches_autograd(name, kwargs):
    """The fused scale-after-op node gives autograd's gradients of op(x, code) * alpha + b."""
    torch.manual_seed(2)
    is_conv = name.endswith("Conv2d")
    layer = (getattr(layers, name)(4, 6, 3, **kwargs) if is_conv else getattr(layers, name)(5, 3, **kwargs)).double()
    layer.set_progress(0.4)
    x = torch.randn(*((2, 4, 7, 7) if is_conv else (4, 5)), dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    fast = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    code, scale = layer.weight_quantizer.factors(layer.weight)
    ref = layer.float_op(layer.quantize_input(x), code, None) * layer.channel_view(scale.reshape(-1))
    if layer.bias is not None:
        ref = ref + layer.channel_view(layer.bias)
    torch.testing.assert_close(y, ref)
    ref.backward(g)
    for got, want in zip(fast, [x.grad] + [p.grad for p in layer.parameters()], strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("make,shape", [
    (lambda: layers.XNORConv2d(8, 16, 3, padding=1, bias=True), (2, 8, 6, 6)),
    (lambda: layers.XNORLinear(24, 10, bias=True), (5, 24)),
    (lambda: layers.BWNConv2d(8, 16, 3, padding=1), (2, 8, 6, 6)),
])
def test_backward_after_an_autocast_forward(make, shape):
    """AMP: the forward runs in bf16 on autocast's copies; the gradients come back in the
    parameters' and input's float32, close to the float32 step's (bf16 rounding only)."""
    torch.manual_seed(0)
    layer, x = make(), torch.randn(*shape)
    grads = []
    for amp in (False, True):
        layer.zero_grad()
        inp = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = layer(inp)
        (out.float() ** 2).sum().backward()
        grads.append([inp.grad] + [p.grad for p in layer.parameters()])
    for exact, mixed in zip(*grads, strict=True):
        assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
        assert torch.allclose(mixed, exact, rtol=0.05, atol=0.05 * float(exact.abs().max()))
