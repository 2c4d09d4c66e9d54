"""The CIFAR ResNets' block options (qat/models/resnet_cifar.py): Bi-Real per-conv shortcuts, the
downsample kinds, ReActNet's block and its RPReLU; their errors, parameter counts, architecture
records, and the packed export of the quantized networks."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from torch import nn

import qat
from conftest import compose_config
from qat import models
from qat.models.activations import RPReLU, make_activation
from qat.models.resnet_cifar import BasicBlock

count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731

VARIANTS = [  # (model, options)
    ("resnet20", {"shortcut": "per_conv"}), ("resnet20", {"block": "reactnet"}),
    ("resnet20", {"shortcut": "per_conv", "downsample": "avgpool"}),
    ("resnet20", {"block": "reactnet", "downsample": "A"}),
    ("resnet18", {"shortcut": "per_conv"}), ("resnet18", {"block": "reactnet"}),
    ("resnet18", {"shortcut": "per_conv", "downsample": "B"}),
]


def randomize(model: nn.Module, seed: int = 1) -> nn.Module:
    """BatchNorm statistics and RPReLU parameters away from their identity-like init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(n, generator=gen) - 0.5)
            if isinstance(module, RPReLU):
                for p in (module.shift, module.bias, module.slope):
                    p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
    return model


@pytest.mark.parametrize("name, options", VARIANTS, ids=[f"{n}-{o}" for n, o in VARIANTS])
def test_every_variant_maps_images_to_class_logits(name, options):
    model = models.build(name, num_classes=10, activation="hardtanh", **options)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_avgpool_downsample_matches_the_strided_conv_on_odd_sides():
    # 28 -> 14 -> 7 -> 4: AvgPool2d(2) without ceil_mode would give 3 beside the conv's 4
    model = models.build("resnet18", num_classes=10, in_channels=1, shortcut="per_conv")
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def residual_adds_and_convs(model: nn.Module) -> tuple[int, int]:
    """(residual adds: a conv's BatchNorm output + something, 3x3 convs) in the blocks of a traced model."""
    traced = torch.fx.symbolic_trace(model)
    modules = dict(traced.named_modules())

    def batchnorm(node):
        return node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d)

    adds = sum(n.op == "call_function" and n.target is operator.add and any(map(batchnorm, n.args))
               for n in traced.graph.nodes)
    convs = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.layers.modules())
    return adds, convs


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_per_conv_puts_a_shortcut_add_after_every_3x3_conv(name):
    adds, convs = residual_adds_and_convs(models.build(name, num_classes=10, shortcut="per_conv"))
    assert adds == convs == {"resnet20": 18, "resnet18": 16}[name]
    adds, convs = residual_adds_and_convs(models.build(name, num_classes=10))
    assert 2 * adds == convs  # per_block: one add per two convs
    adds, convs = residual_adds_and_convs(models.build(name, num_classes=10, block="reactnet"))
    assert adds == convs


@pytest.mark.parametrize("activation", ["hardtanh", "rprelu"])
def test_per_conv_carries_the_input_past_each_conv(activation):
    """Zero conv2: per_conv keeps conv1's path through conv2's shortcut, per_block loses it."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    blocks = {}
    for shortcut in ("per_conv", "per_block"):
        torch.manual_seed(1)
        block = randomize(BasicBlock(16, 32, 2, activation, shortcut, downsample="avgpool")).eval()
        nn.init.zeros_(block.conv2.weight)
        blocks[shortcut] = block
    with torch.no_grad():
        b = blocks["per_conv"]
        h = b.act1(b.bn1(b.conv1(x)) + b.downsample(x))
        assert torch.allclose(b(x), b.act2(b.bn2(torch.zeros_like(h)) + h))
        b = blocks["per_block"]
        assert torch.allclose(b(x), b.act2(b.bn2(torch.zeros_like(h)) + b.downsample(x)))
        assert not torch.allclose(blocks["per_conv"](x), blocks["per_block"](x))
        # with conv1 zeroed too, the block is activation(shortcut) twice over (the two adds)
        b = blocks["per_conv"]
        nn.init.zeros_(b.conv1.weight)
        zeros = torch.zeros(2, 32, 4, 4)
        assert torch.allclose(b(x), b.act2(b.bn2(zeros) + b.act1(b.bn1(zeros) + b.downsample(x))))


def test_downsample_kinds():
    def downsample(**options):
        return models.build("resnet18", num_classes=10, **options).layers[1][0].downsample

    pooled = downsample(shortcut="per_conv")
    assert [type(m) for m in pooled] == [nn.AvgPool2d, nn.Conv2d, nn.BatchNorm2d]
    assert pooled[1].stride == (1, 1) and pooled[0].kernel_size == 2
    strided = downsample()
    assert [type(m) for m in strided] == [nn.Conv2d, nn.BatchNorm2d] and strided[0].stride == (2, 2)
    x = torch.randn(2, 64, 8, 8)
    expected = pooled[2](pooled[1](nn.functional.avg_pool2d(x, 2)))
    assert torch.allclose(pooled(x), expected)
    # ResNet-20 keeps option A per conv (IR-Net's 1w1a code): no shortcut parameters at all
    per_conv = models.build("resnet20", num_classes=10, shortcut="per_conv")
    assert not any(m.kernel_size == (1, 1) for m in per_conv.modules() if isinstance(m, nn.Conv2d))
    # `keep_fp: [downsample]` still finds the 1x1 convs behind the pool
    quantized = qat.quantize_model(models.build("resnet18", num_classes=10, block="reactnet"),
                                   {"method": "xnor", "keep_fp": ["first", "last", "downsample"]})
    assert all(type(m) is nn.Conv2d for n, m in quantized.named_modules() if n.endswith("downsample.1"))


def test_parameter_counts_against_the_plain_blocks():
    plain20, plain18 = 269_722, 11_173_962  # tests/qat/test_models.py
    # per_conv changes the wiring only; resnet18's avgpool downsample has B's 1x1 convs (no stride)
    assert count(models.build("resnet20", num_classes=10, shortcut="per_conv")) == plain20
    assert count(models.build("resnet18", num_classes=10, shortcut="per_conv")) == plain18
    # reactnet adds 3 RPReLU vectors (gamma, beta, zeta) after each of the 2 convs of every block:
    # resnet20 3 * 2 * 3 * (16 + 32 + 64) = 2,016 and the avgpool downsample's two 1x1 convs + BN in
    # place of option A: 16*32 + 32*64 + 2*(32 + 64) = 2,752;  resnet18 3 * 2 * 2 * (64+128+256+512) = 11,520
    assert count(models.build("resnet20", num_classes=10, block="reactnet")) == plain20 + 2_016 + 2_752
    assert count(models.build("resnet18", num_classes=10, block="reactnet")) == plain18 + 11_520
    reactnet20 = models.build("resnet20", num_classes=10, block="reactnet")
    assert sum(isinstance(m, RPReLU) for m in reactnet20.modules()) == 18


def test_reactnet_blocks_use_rprelu_and_the_stem_keeps_the_activation():
    model = models.build("resnet20", num_classes=10, activation="hardtanh", block="reactnet")
    assert isinstance(model.act1, nn.Hardtanh)
    assert all(isinstance(b.act1, RPReLU) and isinstance(b.act2, RPReLU) and b.per_conv
               for stage in model.layers for b in stage)
    assert model.layers[2][0].act2.shift.shape == (64,)


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
        act.slope.copy_(torch.rand(5, generator=gen))
    gamma, beta, zeta = act.shift.detach(), act.slope.detach(), act.bias.detach()
    out = act(x)
    torch.testing.assert_close(out, rprelu_by_hand(x, gamma, beta, zeta))
    assert not torch.allclose(out, nn.functional.prelu(x, beta))  # the shifts do something
    # gradients of sum f: d/dzeta_c = #elements of channel c, d/dgamma_c = -sum(1 or beta_c),
    # d/dbeta_c = sum of (x - gamma_c) where x <= gamma_c
    out.sum().backward()
    per_channel = x.numel() // 5
    assert torch.equal(act.bias.grad, torch.full((5,), float(per_channel)))
    dims = [d for d in range(x.dim()) if d != 1]
    t = (x.movedim(1, -1) - gamma).movedim(-1, 1)
    beta_c = beta.view(-1, *[1] * (x.dim() - 2))
    torch.testing.assert_close(act.shift.grad, -torch.where(t > 0, 1.0, beta_c).sum(dims))
    torch.testing.assert_close(act.slope.grad, torch.where(t > 0, 0.0, t).sum(dims))


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


@pytest.mark.parametrize("options, message", [
    ({"block": "bireal"}, "unknown block 'bireal'; valid: basic, reactnet"),
    ({"shortcut": "per_layer"}, "unknown shortcut 'per_layer'; valid: per_block, per_conv"),
    ({"downsample": "C"}, "unknown downsample 'C'; valid: A, B, avgpool"),
    ({"block": "reactnet", "shortcut": "per_block"},
     r"block='reactnet' has a shortcut around every conv: shortcut must be 'per_conv' \(or null\), got 'per_block'"),
    ({"shortcut": "A", "downsample": "B"}, "shortcut='A' is the old spelling of downsample='A'"),
    ({"bireal": True, "shortcut": "per_conv"}, "bireal is the old spelling of shortcut=per_conv"),
    ({"bireal": "yes"}, "bireal must be true or false, got 'yes'"),
])
@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_bad_block_options_name_the_valid_values(name, options, message):
    with pytest.raises(ValueError, match=message):
        models.build(name, num_classes=10, **options)


def test_old_spellings_build_the_networks_they_built():
    torch.manual_seed(0)
    pairs = [
        ({"name": "resnet20", "shortcut": "A", "bireal": True}, {"name": "resnet20", "shortcut": "per_conv"}),
        ({"name": "resnet20", "shortcut": "B", "bireal": False}, {"name": "resnet20", "downsample": "B"}),
        # resnet18 with bireal had the strided 1x1 projection, not Bi-Real's avgpool
        ({"name": "resnet18", "bireal": True}, {"name": "resnet18", "shortcut": "per_conv", "downsample": "B"}),
    ]
    x = torch.randn(2, 3, 16, 16)
    for old, new in pairs:
        old_model = randomize(models.build(num_classes=10, **old)).eval()
        new_model = models.build(num_classes=10, **new).eval()
        new_model.load_state_dict(old_model.state_dict())
        with torch.no_grad():
            assert torch.equal(old_model(x), new_model(x)), old


@pytest.mark.parametrize("name, options", VARIANTS[:2] + VARIANTS[5:6],
                         ids=["r20-per_conv", "r20-reactnet", "r18-reactnet"])
def test_architecture_record_rebuilds_the_variant(name, options):
    model = randomize(models.build(name, num_classes=10, activation="hardtanh", **options)).eval()
    record = models.architecture_of(model)
    assert record == {"name": name, "num_classes": 10, "in_channels": 3, "activation": "hardtanh", **options}
    rebuilt = models.build_architecture(record).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: the same modules
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


@pytest.mark.parametrize("override, expected", [
    (["model.shortcut=per_conv"], {"shortcut": "per_conv", "block": "basic"}),
    (["model.block=reactnet"], {"shortcut": None, "block": "reactnet"}),
    (["model=resnet18", "model.shortcut=per_conv", "model.downsample=B"], {"downsample": "B"}),
])
def test_options_are_set_from_the_command_line(override, expected):
    cfg = compose_config(["+experiment=resnet20_xnor", *override])
    arch = models.architecture(cfg.model, num_classes=10, in_channels=3)
    assert {k: arch[k] for k in expected} == expected
    assert models.build_architecture(arch)(torch.randn(1, 3, 16, 16)).shape == (1, 10)


# ---------------------------------------------------------------------------------- packed export
EXPORT_CASES = [("resnet20", {"shortcut": "per_conv"}, 18, 18), ("resnet20", {"block": "reactnet"}, 20, 20),
                ("resnet18", {"block": "reactnet"}, 19, 19)]


@pytest.mark.parametrize("name, options, binary_layers, folded", EXPORT_CASES,
                         ids=[f"{n}-{o}" for n, o, _, _ in EXPORT_CASES])
def test_packed_and_fused_variants_reproduce_the_quantized_model(name, options, binary_layers, folded):
    """xnor (first/last float; resnet20 reactnet's and resnet18's 1x1 downsamples binary too):
    packing is bit-exact, BatchNorm folding rounds only, and fuse_binary_chains changes nothing
    beyond that (per-conv nets fuse no chain today: each activation feeds a binary conv and the
    next shortcut add, and the residual-add fusion applies only to layers already in a chain)."""
    from kernels import native
    from qat.export import PackedLayer, fuse_binary_chains, pack_model

    torch.manual_seed(0)
    model = randomize(models.build(name, num_classes=10, activation="hardtanh", **options))
    quantized = qat.quantize_model(model, {"method": "xnor"}).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        reference = quantized(x)
        exact = pack_model(quantized, fold_batchnorm=False)
        assert sum(isinstance(m, PackedLayer) and m.spec.binary_input for m in exact.modules()) == binary_layers
        assert torch.equal(exact(x), reference)
        packed = pack_model(quantized)  # traced through RPReLU: the BatchNorms after binary convs fold
        assert sum(type(m).__name__ == "FoldedBatchNorm" for m in packed.modules()) == folded
        out = packed(x)
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
        assert torch.equal(out.argmax(1), reference.argmax(1))
        if native.available():
            fused = fuse_binary_chains(packed)
            got = fused(x.contiguous(memory_format=torch.channels_last))
            assert float((got - out).abs().max()) <= 1e-4 * float(out.abs().max())
            assert torch.equal(got.argmax(1), reference.argmax(1))


def test_saved_packed_reactnet_loads_from_its_recorded_architecture(tmp_path):
    from qat.export import load_packed, pack_model, save_packed

    torch.manual_seed(0)
    model = randomize(models.build("resnet20", num_classes=10, activation="hardtanh", block="reactnet"))
    packed = pack_model(qat.quantize_model(model, {"method": "xnor"}).eval())
    path = save_packed(packed, tmp_path / "reactnet.safetensors")
    loaded = load_packed(path)
    assert isinstance(loaded.layers[0][0].act1, RPReLU)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(loaded(x), packed(x))
