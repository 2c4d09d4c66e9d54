"""ReActNet's RPReLU (qat/models/activations.py) against its formula, and in every model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qat import models
from qat.models.activations import RPReLU, make_activation


def rprelu_by_hand(x, gamma, beta, zeta):
    """f(x) = x - gamma + zeta where x > gamma, beta (x - gamma) + zeta elsewhere, channel by channel."""
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        t = x[:, c] - gamma[c]
        out[:, c] = torch.where(t > 0, t, beta[c] * t) + zeta[c]
    return out


@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (7, 5)])
def test_rprelu_is_the_shifted_prelu(shape):
    gen = torch.Generator().manual_seed(0)
    act = RPReLU(5)
    x = torch.randn(*shape, generator=gen)
    # init (official code): gamma = zeta = 0, beta = 0.25 per channel, i.e. nn.PReLU(init=0.25)
    assert torch.equal(act(x), nn.PReLU(5, init=0.25)(x))
    with torch.no_grad():
        for p in (act.shift, act.bias):
            p.copy_(torch.randn(5, generator=gen))
        act.prelu.weight.copy_(torch.rand(5, generator=gen))
    gamma, beta, zeta = act.shift.detach(), act.prelu.weight.detach(), act.bias.detach()
    out = act(x)
    torch.testing.assert_close(out, rprelu_by_hand(x, gamma, beta, zeta))
    assert not torch.allclose(out, nn.functional.prelu(x, beta))  # the shifts do something
    # gradients of sum f: d/dzeta_c = #elements of channel c, d/dgamma_c = -sum(1 or beta_c)
    out.sum().backward()
    per_channel = x.numel() // 5
    assert torch.equal(act.bias.grad, torch.full((5,), float(per_channel)))
    dims = [d for d in range(x.dim()) if d != 1]
    slope = torch.where(x.movedim(1, -1) > gamma, 1.0, beta).movedim(-1, 1)
    torch.testing.assert_close(act.shift.grad, -slope.sum(dims))


def test_make_activation_passes_the_channels():
    assert make_activation("rprelu", 7).shift.shape == (7,)
    assert isinstance(make_activation("hardtanh", 7), nn.Hardtanh)
    with pytest.raises(ValueError, match="unknown activation 'rrelu'; valid: hardtanh, none, prelu, relu, rprelu"):
        make_activation("rrelu", 7)
    with pytest.raises(ValueError, match="positive channel count, got 0"):
        RPReLU(0)


@pytest.mark.parametrize("name, in_channels, size", [("mnist_cnn", 1, 28), ("vgg_small", 3, 32),
                                                    ("resnet18_imagenet", 3, 32), ("resnet20", 3, 32)])
def test_rprelu_in_every_model(name, in_channels, size):
    model = models.build(name, num_classes=10, in_channels=in_channels, activation="rprelu")
    assert any(isinstance(m, RPReLU) for m in model.modules())
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 10)
