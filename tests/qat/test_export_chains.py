"""Binary chains that pass bits (qat.export.fuse_binary_chains) against the packed model they come from."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
import qat
from kernels import cpu_native, native
from qat import models
from qat.export import fuse_binary_chains, pack_model
from qat.export.chains import FusedBinaryLayer, PackedMaxPool2d, SignPacker
from qat.export.packed import PackedConv2d

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")


def randomize_batchnorms(model: nn.Module, negative_gamma: bool = False) -> nn.Module:
    """BatchNorm statistics and scales that are not the identity (half the gammas negative if asked)."""
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            if module.affine:
                gamma = torch.rand(n, generator=gen) + 0.5
                if negative_gamma:
                    gamma[::2] *= -1
                module.weight.data.copy_(gamma)
                module.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


class PoolThenBatchNorm(nn.Module):
    """binary conv -> max-pool -> BN (negative gammas: OR pooling) -> binary conv -> flatten -> binary linear."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 70, 3, padding=1, bias=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(70)
        self.conv2 = nn.Conv2d(70, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.act = nn.Hardtanh()
        self.fc = nn.Linear(32 * 5 * 5, 10)

    def forward(self, x):
        x = self.conv1(self.first(x))
        x = self.bn1(self.pool(x))
        x = self.act(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


#: Larq's BNN (experiment mnist_bnn): every layer binary, the first on float pixels (its weights-only method)
BNN_SPEC = {"method": "xnor", "keep_fp": [], "overrides": {"first": {"method": "bwn"}}}


def fused_and_packed(model, keep_fp=("first",), negative_gamma=False, spec=None):
    model = randomize_batchnorms(model, negative_gamma)
    quantized = qat.quantize_model(model, spec or {"method": "xnor", "keep_fp": list(keep_fp)}).eval()
    packed = pack_model(quantized)
    return fuse_binary_chains(packed), packed


CASES = [
    # name, builder, input shape, binary layers fused, sign packers (a float layer feeding bits)
    ("mnist_cnn", lambda: models.build("mnist_cnn", num_classes=10, in_channels=1), (1, 28, 28), 4, 1),
    ("resnet20", lambda: models.build("resnet20", num_classes=10, activation="hardtanh"), (3, 32, 32), 18, 0),
    ("vgg_small", lambda: models.build("vgg_small", num_classes=10, activation="hardtanh"), (3, 32, 32), 6, 1),
    ("pool_then_bn", PoolThenBatchNorm, (3, 10, 10), 3, 0),
]


@pytest.mark.parametrize("name,build,shape,fused_layers,sign_packers", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("negative_gamma", [False, True])
def test_fused_chains_agree_with_the_packed_model(name, build, shape, fused_layers, sign_packers, negative_gamma):
    torch.manual_seed(0)
    fused, packed = fused_and_packed(build(), negative_gamma=negative_gamma)
    assert sum(isinstance(m, FusedBinaryLayer) for m in fused.modules()) == fused_layers, name
    assert sum(isinstance(m, SignPacker) for m in fused.modules()) == sign_packers, name
    x = torch.randn(16, *shape)
    with torch.inference_mode():
        expected, got = packed(x), fused(x)
    # Only the rounding of the composed affine map differs (as BatchNorm folding): a value within a
    # rounding of zero may change sign, nothing more.
    scale = expected.abs().max()
    assert float((got - expected).abs().max()) <= 1e-4 * float(scale), name
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_a_wrong_pooling_direction_would_be_seen():
    """With negative BN scales after the pool, AND in place of OR changes the outputs a lot."""
    torch.manual_seed(0)
    fused, packed = fused_and_packed(PoolThenBatchNorm(), negative_gamma=True)
    pool = next(m for m in fused.modules() if isinstance(m, PackedMaxPool2d))
    x = torch.randn(16, 3, 10, 10)
    with torch.inference_mode():
        expected = packed(x)
        pool.and_mask.fill_(-1)  # AND everywhere
        wrong = fused(x)
    assert float((wrong - expected).abs().max()) > 1e-2


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)])
def test_bit_max_pool_equals_max_and_min_pool_of_signs(kernel, stride, padding):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 70, 7, 6, generator=gen)
    signs = torch.where(x < 0, -1.0, 1.0)
    decreasing = torch.rand(70, generator=gen) < 0.5  # OR channels
    max_pool = F.max_pool2d(signs, kernel, stride, padding)
    min_pool = -F.max_pool2d(-signs, kernel, stride, padding)
    expected = torch.where(decreasing[None, :, None, None], min_pool, max_pool)
    and_mask = kernels.pack_bits(torch.where(decreasing, 1.0, -1.0).unsqueeze(0))[0]
    got = cpu_native.maxpool_bits(kernels.pack_activations(x), and_mask, (kernel, kernel), (stride, stride),
                                  (padding, padding), (1, 1))
    assert torch.equal(got, kernels.pack_activations(expected))


def test_models_without_binary_chains_come_back_unchanged():
    model = qat.quantize_model(models.build("mnist_cnn", num_classes=10, in_channels=1),
                               {"method": "bwn", "keep_fp": ["first"]}).eval()
    fused = fuse_binary_chains(pack_model(model))
    assert not any(isinstance(m, FusedBinaryLayer) for m in fused.modules())


def test_residual_adds_fuse_bit_identically(monkeypatch):
    """ResNet blocks: conv2 + identity + Hardtanh written by the kernel equals the separate ops."""
    import operator

    from qat.export import chains

    torch.manual_seed(0)
    fused, packed = fused_and_packed(models.build("resnet20", num_classes=10, activation="hardtanh",
                                                  shortcut="B"))
    adds = [n for n in fused.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert not adds
    monkeypatch.setattr(chains, "_residual_tails", lambda *args: [])
    unfused_adds = fuse_binary_chains(packed)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.equal(fused(x), unfused_adds(x))


def test_a_small_first_conv_is_computed_by_its_sign_packer():
    """mnist_cnn: float conv (1 -> 32) -> max-pool -> BN -> binary conv becomes one sign packer
    that runs the conv itself; the result equals the separate float conv's within rounding."""
    from qat.export import chains

    torch.manual_seed(0)
    fused, packed = fused_and_packed(models.build("mnist_cnn", num_classes=10, in_channels=1))
    packer = next(m for m in fused.modules() if isinstance(m, SignPacker))
    assert isinstance(packer.conv, nn.Conv2d)
    assert not any(n.op == "call_module" and type(fused.get_submodule(n.target)) is nn.Conv2d
                   for n in fused.graph.nodes)
    x = torch.randn(8, 1, 28, 28)
    with torch.inference_mode():
        with_conv = fused(x)
        separate = chains.SMALL_CONV_TAPS
        try:
            chains.SMALL_CONV_TAPS = 0
            without = fuse_binary_chains(packed)
        finally:
            chains.SMALL_CONV_TAPS = separate
        assert next(m for m in without.modules() if isinstance(m, SignPacker)).conv is None
        assert float((with_conv - without(x)).abs().max()) <= 1e-4 * float(with_conv.abs().max())


def test_a_float_input_binary_first_conv_is_computed_by_its_sign_packer():
    """mnist_bnn: the first layer has binary weights on float pixels; its sign packer convolves
    with scale * code itself (and pools in the same call), within rounding of the packed conv."""
    torch.manual_seed(0)
    fused, packed = fused_and_packed(models.build("mnist_cnn", num_classes=10, in_channels=1, activation="hardtanh"),
                                     spec=BNN_SPEC)
    first = packed.features[0]
    assert isinstance(first, PackedConv2d) and first.spec.input_bits == 32 and first.spec.code == "binary"
    packer = next(m for m in fused.modules() if isinstance(m, SignPacker))
    assert torch.equal(packer.conv.weight, first.float_weight())
    assert not any(n.op == "call_module" and isinstance(fused.get_submodule(n.target), PackedConv2d)
                   for n in fused.graph.nodes)  # every packed layer runs fused; the first inside the packer
    x = torch.randn(8, 1, 28, 28)
    with torch.inference_mode():
        expected, got = packed(x), fused(x)
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_fused_layers_follow_a_state_dict_load():
    """Call plans are kept per input shape; a load must not leave them on the old weights."""
    torch.manual_seed(0)
    first, _ = fused_and_packed(models.build("mnist_cnn", num_classes=10, in_channels=1))
    torch.manual_seed(1)
    second, _ = fused_and_packed(models.build("mnist_cnn", num_classes=10, in_channels=1))
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        before, target = first(x), second(x)
        assert not torch.equal(before, target)
        first.load_state_dict(second.state_dict())
        assert torch.equal(first(x), target)
