"""IR-Net's Libra-PB weights and ReActNet's RSign against their formulas (float64), written out
here the way the official code computes them."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import estimators
import layers
from layers.irnet import LibraWeight
from layers.reactnet import RSign


class _EDE(torch.autograd.Function):
    """IR-Net's official BinaryQuantize: forward sign, backward k t (1 - tanh^2(t x)) g."""

    @staticmethod
    def forward(ctx, x, k, t):
        ctx.save_for_backward(x)
        ctx.k, ctx.t = k, t
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return ctx.k * ctx.t * (1 - torch.tanh(ctx.t * x) ** 2) * g, None, None


def official_libra(w, k, t):
    c = w.shape[0]
    bw = w - w.view(c, -1).mean(-1).view(c, 1, 1, 1)
    bw = bw / bw.view(c, -1).std(-1).view(c, 1, 1, 1)
    sw = torch.pow(torch.full((c,), 2.0, dtype=w.dtype),
                   (torch.log(bw.abs().view(c, -1).mean(-1)) / math.log(2)).round()).view(c, 1, 1, 1).detach()
    return _EDE.apply(bw, k, t) * sw


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_libra_pb_matches_the_official_code_forward_and_backward(progress):
    torch.manual_seed(0)
    w = (torch.randn(6, 4, 3, 3, dtype=torch.float64) * 0.3 + 0.05).requires_grad_()
    quantizer = LibraWeight(estimators.get("ede"))
    quantizer.set_progress(progress)
    est = quantizer.estimator
    ours = quantizer(w)
    w_ref = w.detach().clone().requires_grad_()
    reference = official_libra(w_ref, est.k, est.t)
    assert torch.equal(ours, reference)
    g = torch.randn_like(ours)
    ours.backward(g)
    reference.backward(g)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-14)


def test_libra_pb_codes_are_balanced_signs_times_powers_of_two():
    torch.manual_seed(1)
    w = torch.randn(8, 16) * 0.01 + 0.5  # far from zero mean: sign(W) alone would be all +1
    code, scale = LibraWeight(estimators.get("ede")).factors(w)
    assert set(code.unique().tolist()) == {-1.0, 1.0}
    assert (code.sum(dim=1).abs() < 16).all()  # centring balances each filter
    exponents = torch.log2(scale.flatten())
    assert torch.equal(exponents, exponents.round())
    standardized = LibraWeight.standardize(w)
    torch.testing.assert_close(standardized.mean(dim=1), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardized.std(dim=1), torch.ones(8))


@pytest.mark.parametrize("w", [torch.ones(2, 9), torch.randn(3, 1)], ids=["constant", "one-weight"])
def test_libra_pb_survives_degenerate_filters(w):
    w = w.clone().requires_grad_()
    code, scale = LibraWeight(estimators.get("ede")).factors(w)
    assert torch.isfinite(code).all() and torch.isfinite(scale).all()
    (code * scale).sum().backward()
    assert torch.isfinite(w.grad).all()


def approx_sign_grad(u):
    return torch.where(u.abs() < 1, 2 - 2 * u.abs(), torch.zeros_like(u))


@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (7, 5)])
def test_rsign_forward_and_threshold_gradient(shape):
    torch.manual_seed(2)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    quantizer = RSign(estimators.get("approx_sign"), features=5, dtype=torch.float64)
    with torch.no_grad():
        quantizer.threshold.copy_(torch.linspace(-0.5, 0.5, 5, dtype=torch.float64))
    view = (1, -1, 1, 1) if len(shape) == 4 else (-1,)
    alpha = quantizer.threshold.detach().view(view)
    y = quantizer(x)
    assert torch.equal(y, torch.where(x - alpha >= 0, 1.0, -1.0).double())
    g = torch.randn_like(y)
    y.backward(g)
    expected_x = g * approx_sign_grad(x.detach() - alpha)
    torch.testing.assert_close(x.grad, expected_x)
    reduce = (0, 2, 3) if len(shape) == 4 else (0,)
    torch.testing.assert_close(quantizer.threshold.grad, -expected_x.sum(dim=reduce))


def test_reactnet_layer_uses_detached_scales_and_learns_thresholds():
    torch.manual_seed(3)
    conv = layers.ReActNetConv2d(4, 6, 3, padding=1, bias=False)
    assert conv.weight_quantizer.detach_scale and conv.input_quantizer.estimator.name == "approx_sign"
    assert conv.weight_quantizer.estimator.name == "clipped_ste"
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        conv.input_quantizer.threshold.fill_(0.25)
        w = conv.weight
        expected = F.conv2d(torch.where(x - 0.25 >= 0, 1.0, -1.0), torch.where(w >= 0, 1.0, -1.0), padding=1)
        expected = expected * w.abs().mean(dim=(1, 2, 3)).view(1, -1, 1, 1)
    y = conv(x)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert conv.input_quantizer.threshold.grad.abs().sum() > 0


def test_reactnet_stage1_keeps_weights_float():
    torch.manual_seed(4)
    linear = layers.ReActNetStage1Linear(5, 3)
    x = torch.randn(4, 5)
    torch.testing.assert_close(linear(x), F.linear(torch.where(x >= 0, 1.0, -1.0), linear.weight, linear.bias))
    assert linear.weight_bits == 32 and linear.input_bits == 1
