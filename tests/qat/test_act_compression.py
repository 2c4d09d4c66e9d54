"""Compressed activations for backward (layers._PackedSignInputOp, qat.act_compression).

The exactness claim is tested for every method and estimator the registries list: a step in
`exact` mode gives the same loss, input gradient and parameter gradients as `none`, compared with
torch.equal (bit for bit), at two training progresses for FDA (noise active, then off: the packed path)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import estimators
import kernels
import layers
import qat
from layers.bitpack import pack_compare, pack_flags, unpack_flags, unpack_signs, unpack_values
from qat.act_compression import (
    MODES,
    ActCompression,
    _pack_codes,
    _round_groups,
    _round_groups_numpy,
    _unpack_codes,
    quantize_groups,
    rounding_noise,
)
from qat.train.allocator import malloc_huge_pages
from qat.train.config import ConfigError
from qat.train.trainer import Trainer, act_compression_settings

METHODS = layers.METHOD_NAMES  # fp + every row of the method table
ESTIMATORS = estimators.NAMES


def small_cnn():
    """float conv -> BN -> hardtanh -> conv -> maxpool -> BN -> ReLU -> conv -> BN -> hardtanh ->
    flatten -> linear -> BN1d -> linear: every kind of save the compressor handles."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh(inplace=True),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardtanh(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.BatchNorm1d(32), nn.Hardtanh(), nn.Linear(32, 10))


def quantized_cnn(method, estimator, **options):
    torch.manual_seed(0)
    spec = {"method": method, "keep_fp": ["first", "last"], **options}
    if method != "fp":
        spec["estimator"] = estimator
    return qat.quantize_model(small_cnn(), spec)


def step(model, mode, images, labels, min_numel=64):
    """One forward/backward under `mode`; (loss, input grad, parameter grads, saved-bytes stats)."""
    compression = ActCompression(model, mode, min_numel=min_numel)
    model.zero_grad(set_to_none=True)
    x = images.clone().requires_grad_()
    with compression.record() as stats, compression.saving():
        loss = F.cross_entropy(model(x), labels)
    loss.backward()
    compression.remove()
    return loss.detach(), x.grad, [p.grad for p in model.parameters()], stats


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(5, 3, 8, 8, generator=generator)  # 5: no weight has a dim of 5
    images[0, 0, :4, :4] = 0.0  # sign(0) = +1 and the mask boundary at exact values
    images[0, 1, :4, :4] = 1.0
    return images, torch.randint(0, 10, (5,), generator=generator)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("method", METHODS)
def test_exact_mode_gradients_are_bit_identical(method, estimator, data):
    if method == "fp" and estimator != ESTIMATORS[0]:
        pytest.skip("fp has no estimator")
    model = quantized_cnn(method, estimator)
    for progress in ((0.3, 1.0) if method == "fda" else (0.5,)):  # FDA: noise on, then off (packed)
        qat.set_progress(model, progress)
        loss0, gx0, grads0, stats0 = step(model, "none", *data)
        loss1, gx1, grads1, stats1 = step(model, "exact", *data)
        assert torch.equal(loss0, loss1)
        assert torch.equal(gx0, gx1)
        for name_param, g0, g1 in zip(model.named_parameters(), grads0, grads1, strict=True):
            assert (g0 is None) == (g1 is None), name_param[0]
            if g0 is not None:
                assert torch.equal(g0, g1), f"{method}/{estimator} p={progress}: grad of {name_param[0]} differs"
        assert stats1.held < stats0.held


BINARY_INPUT = [name for name, m in layers.METHODS.items() if m.input_bits == 1]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("method", BINARY_INPUT)
@pytest.mark.parametrize("float_type", [nn.Conv2d, nn.Linear])
def test_packed_layer_gradients_are_bit_identical_at_the_boundaries(float_type, method, estimator):
    """The layer alone, its input holding 0, -0, +-1 (clipped_ste's boundary), NaN-free extremes."""
    cls = layers.LAYER_CLASSES[(method, float_type)]
    torch.manual_seed(0)
    layer = cls(6, 5, 3, padding=1, bias=True, estimator=estimator) if float_type is nn.Conv2d \
        else cls(6, 5, estimator=estimator)
    qat.set_progress(layer, 1.0)
    if not layer.input_quantizer.is_plain_sign:
        pytest.skip(f"{method}'s inputs are not sign(x) (RSign: sign(x - alpha)): exact mode has no bits to save")
    shape = (3, 6, 4, 4) if float_type is nn.Conv2d else (3, 6)
    x = torch.randn(shape) * 1.5
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, 1.0, -1.0, 3e38, -1e-30])
    g = torch.randn(layer(x).shape)
    results = []
    for mode in ("none", "exact"):
        layer.act_compression = mode
        assert layer.packs_input() == (mode == "exact")
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.backward(g)
        results.append([y.detach(), xx.grad] + [p.grad for p in layer.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("estimator", ["clipped_ste", "identity"])
def test_exact_mode_is_bit_identical_on_both_cpu_paths(estimator, data, cpu_path):
    """The int16 forms and masks made by the native engine or by torch/NumPy: the same gradients."""
    model = quantized_cnn("xnor", estimator)
    _, gx0, grads0, none = step(model, "none", *data)
    _, gx1, grads1, exact = step(model, "exact", *data)
    assert torch.equal(gx0, gx1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1, strict=True))
    assert exact.held < none.held / 2


def test_native_int16_form_only_for_scales_along_dim_1():
    """A [B, T, C] linear output with one scale per C must not take the [N, C, ...] path, even
    when T == C (the scale would be applied along the wrong axis)."""
    from qat.act_compression import _native_per_channel

    t = torch.zeros(2, 6, 6)
    assert not _native_per_channel(t, torch.ones(6))
    assert _native_per_channel(t, torch.ones(1, 6, 1)) == kernels.native.available()
    assert _native_per_channel(torch.zeros(4, 6), torch.ones(6)) == kernels.native.available()
    assert not _native_per_channel(torch.zeros(4, 6).t(), torch.ones(4))  # not contiguous


def test_xnor_activation_scale_is_exact_too(data):
    model = quantized_cnn("xnor", "clipped_ste", activation_scale=True)
    _, gx0, grads0, _ = step(model, "none", *data)
    _, gx1, grads1, _ = step(model, "exact", *data)
    assert torch.equal(gx0, gx1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1, strict=True))


@pytest.mark.parametrize("mode", ["exact", "int2"])
@pytest.mark.parametrize("pool, shape", [(nn.MaxPool1d(3, 2, 1), (2, 4, 600)),
                                         (nn.MaxPool2d(3, 2, 1, ceil_mode=True), (2, 4, 25, 25)),
                                         (nn.MaxPool3d(2), (2, 4, 8, 9, 10))])
def test_max_pool_keeps_only_its_inputs_shape_with_identical_gradients(pool, shape, mode):
    """Max-pool's backward reads its indices and the input's shape: the input costs no bytes, and
    the gradient (input values with ties, so the indices matter) is the same bit for bit."""
    x = torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(0)).float().requires_grad_()
    class Doubled(nn.Module):  # the pool's input is then not the model's input (which is kept as it is)
        def forward(self, t):
            return t * 2.0

    model = nn.Sequential(Doubled(), pool)
    grad = torch.randn(pool(x).shape, generator=torch.Generator().manual_seed(1))
    expected, = torch.autograd.grad(model(x), x, grad)
    compression = ActCompression(model, mode, min_numel=64)
    with compression.record() as stats, compression.saving():
        y = model(x)
    got, = torch.autograd.grad(y, x, grad)
    assert torch.equal(got, expected)
    assert stats.saved <= 2 * y.numel()  # the int16 indices only, not the float32 input


@pytest.mark.parametrize("estimator, at_least", [("identity", 30), ("clipped_ste", 14), ("approx_sign", 1.9)])
def test_binary_layers_save_bits_not_floats(estimator, at_least, data):
    """none: x and sign(x) as float (64 bits); exact: 1 bit (identity), 2 bits (clipped_ste), or
    x kept as float for a smooth derivative (32 bits)."""
    model = quantized_cnn("xnor", estimator)
    none = step(model, "none", *data)[3].binary_inputs
    exact = step(model, "exact", *data)[3].binary_inputs
    assert none / exact >= at_least


def test_packed_flags_are_the_kernels_format():
    generator = torch.Generator().manual_seed(0)
    for n in (1, 63, 64, 65, 1000):
        flags = torch.rand(n, generator=generator) < 0.5
        words = pack_flags(flags)
        assert torch.equal(words, kernels.pack_bits(torch.where(flags, -1.0, 1.0)))
        assert torch.equal(unpack_flags(words, (n,)), flags)



@pytest.fixture(params=["native", "numpy"])
def cpu_path(request, monkeypatch):
    """Each test runs on the native engine's one-pass forms (where it is built) and without them."""
    if request.param == "native" and not kernels.native.available():
        pytest.skip("native kernels unavailable")
    if request.param == "numpy":
        monkeypatch.setattr(kernels.native, "available", lambda: False)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_numpy_comparisons_and_table_unpacking_match_torch(dtype, cpu_path):
    """The CPU fast paths of layers.bitpack (native or NumPy comparisons, the 256 x 8 byte table) give
    the words and values of the plain PyTorch expressions, NaN, +-0 and values at the threshold included."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(1003, generator=generator) * 2).to(dtype)
    x[:6] = torch.tensor([float("nan"), 0.0, -0.0, 1.0, -1.0, 1.5], dtype=dtype)
    for op, threshold, absolute, expected in [("lt", 0.0, False, x < 0), ("le", 0.0, False, x <= 0),
                                              ("ge", 1.0, True, x.abs() >= 1.0), ("ge", 0.3, False, x >= 0.3)]:
        assert torch.equal(pack_compare(x, op, threshold, absolute=absolute), pack_flags(expected)), op
    words = pack_flags(x < 0)
    for n in (1, 7, 8, 1003):
        flags = unpack_flags(words, (n,))
        values = unpack_values(words, (n,), (0.5, -3.0), dtype)
        assert values.dtype == dtype and torch.equal(values, torch.tensor([0.5, -3.0], dtype=dtype)[flags.long()])
    assert torch.equal(unpack_signs(words, (1003,), dtype), kernels.unpack_bits(words, 1003, dtype))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_numpy_rounding_gives_the_torch_codes(bits):
    """quantize_groups' CPU rounding (NumPy) and the PyTorch one (other devices) give the same codes."""
    generator = torch.Generator().manual_seed(0)
    groups = torch.randn(300, 64, generator=generator) * 5
    groups[3] = 1.25  # a constant group: step 0, inverse 0
    groups[4, 7] = float("nan")
    low, high = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    step = (high - low).div_(2 ** bits - 1)
    inverse = torch.where(step > 0, step.reciprocal(), torch.zeros(()))
    noise = torch.randint(0, 256, groups.shape, dtype=torch.uint8, generator=generator)
    fast = _round_groups_numpy(groups, low, inverse, noise, 2 ** bits - 1)
    plain = _round_groups(groups, low, inverse, noise, 2 ** bits - 1)
    assert torch.equal(fast[5:], plain[5:]) and torch.equal(fast[:4], plain[:4])
    assert int(fast.max()) == 2 ** bits - 1 and int(fast[3].max()) == 0


def test_rounding_noise_is_splitmix64_on_numpy_and_torch():
    """The stochastic rounding's bytes: SplitMix64's published first output for seed 0, and the same
    bytes from the NumPy (CPU) and the torch (other devices) forms for seeds near 0 and +-2^63."""
    first = rounding_noise(0, 8).numpy().view(np.uint64)[0]
    assert first == 0xE220A8397B1DCDAF
    for seed in (0, 12345, -2 ** 63, 2 ** 63 - 1):
        assert torch.equal(rounding_noise(seed, 4096), rounding_noise(torch.tensor([seed]), 4096)), seed
    counts = torch.bincount(rounding_noise(7, 256 * 1024).long(), minlength=256).float()
    assert counts.min() > 800 and counts.max() < 1250  # 1024 expected per byte value
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 8"):
        quantize_groups(torch.randn(100), 2, group_size=12)


@pytest.mark.skipif(not kernels.native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("group_size", [24, 64, 256])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_native_group_quantization_gives_the_numpy_codes_and_values(bits, group_size, monkeypatch):
    """The one-pass native quantize_groups / unpack and the NumPy path: the same codes, ranges and
    restored values bit for bit (a padded last group, a constant group, NaN and inf groups)."""
    x = torch.randn(7, 3, 61, generator=torch.Generator().manual_seed(bits)) * 4
    flat = x.view(-1)
    flat[group_size: 2 * group_size] = 1.25
    flat[2 * group_size + 5], flat[3 * group_size + 1] = float("nan"), float("inf")
    native = quantize_groups(x, bits, group_size, torch.Generator().manual_seed(0))
    native_values = native.unpack()
    monkeypatch.setattr(kernels.native, "available", lambda: False)
    with np.errstate(invalid="ignore"):
        numpy = quantize_groups(x, bits, group_size, torch.Generator().manual_seed(0))
        numpy_values = numpy.unpack()
    assert torch.equal(native.codes, numpy.codes)
    for a, b in ((native.low, numpy.low), (native.step, numpy.step), (native_values, numpy_values)):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_group_quantization_error_is_below_one_step_and_unbiased(bits):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 11, generator=generator)  # 1155: a padded last group
    packed = quantize_groups(x, bits, 64, generator)
    restored = packed.unpack()
    assert restored.shape == x.shape and restored.dtype == x.dtype
    step_per_element = packed.step.expand(-1, 64).reshape(-1)[: x.numel()].view_as(x)
    assert bool(((restored - x).abs() <= step_per_element * (1 + 1e-5)).all())
    mean = sum(quantize_groups(x, bits, 64, generator).unpack() for _ in range(400)) / 400
    assert float((mean - x).abs().max() / packed.step.max()) < 0.15
    assert packed.codes.numel() == -(-x.numel() // 64) * 64 * bits // 8


@pytest.mark.parametrize("bits", [2, 4])
def test_sub_byte_packing_round_trips(bits):
    codes = torch.randint(0, 2 ** bits, (4096,), dtype=torch.uint8)
    packed = _pack_codes(codes, bits)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    assert torch.equal(packed, (codes.view(-1, 8 // bits) << shifts).sum(-1, dtype=torch.uint8))
    assert torch.equal(_unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("method", METHODS)
def test_int_modes_train_every_method_and_leave_weights_alone(method, data):
    model = quantized_cnn(method, None)
    weight_shapes = {tuple(p.shape) for p in model.parameters()}
    _, gx0, grads0, stats0 = step(model, "none", *data)
    for mode in ("int8", "int2"):
        compression = ActCompression(model, mode, min_numel=64)
        quantized_shapes, norm_bits = [], set()
        pack = compression._pack

        def spy(t):
            packed = pack(t)
            if type(packed).__name__ == "_Quantized":
                quantized_shapes.append(tuple(t.shape))
                stack = compression._stack()
                if stack and stack[-1].kind == "norm":
                    norm_bits.add(packed.bits)
            return packed
        compression._pack = spy
        model.zero_grad(set_to_none=True)
        with compression.record() as stats, compression.saving():
            loss = F.cross_entropy(model(data[0]), data[1])
        loss.backward()
        compression.remove()
        assert quantized_shapes and not set(quantized_shapes) & weight_shapes
        assert tuple(data[0].shape) not in quantized_shapes  # the input batch is held anyway
        assert norm_bits == {8}  # BatchNorm inputs: at least 8 bits
        assert all(p.grad is None or bool(p.grad.isfinite().all()) for p in model.parameters())
        assert stats.held < stats0.held
        # close to the float gradient where activations stay float (with binary inputs a perturbed
        # activation flips signs downstream, so there is no small-error bound to test)
        if mode == "int8" and layers.method_bits(method)[1] == 32:
            pairs = [(p.grad, g0) for p, g0 in zip(model.parameters(), grads0, strict=True) if g0 is not None]
            difference = torch.cat([(g - g0).flatten() for g, g0 in pairs]).norm()
            assert float(difference) <= 0.25 * float(torch.cat([g0.flatten() for _, g0 in pairs]).norm())


def test_overrides_set_modes_per_module_and_name_bad_globs():
    model = quantized_cnn("xnor", "clipped_ste")
    compression = qat.set_act_compression(model, "exact", {"3": "none"})
    assert model[3].act_compression == "none" and model[7].act_compression == "exact"
    compression.remove()
    assert model[7].act_compression == "none"
    with pytest.raises(ValueError, match="'nothing.*' matches no module"):
        qat.set_act_compression(model, "int4", {"nothing.*": "exact"})
    with pytest.raises(ValueError, match="valid: none, exact, int8, int4, int2"):
        qat.set_act_compression(model, "int3")


@pytest.mark.parametrize("release", [False, True])
def test_trainer_setting_is_checked_and_logged(compose, smoke_overrides, tmp_path, monkeypatch, caplog, release):
    import qat.train.trainer as trainer_module

    with pytest.raises(ConfigError, match="trainer.act_compression must be one of"):
        act_compression_settings(compose(["trainer.act_compression=int3"]))
    with pytest.raises(ConfigError, match="trainer.act_compression_overrides.layers"):
        act_compression_settings(compose(["+trainer.act_compression_overrides={layers: exact2}"]))
    with pytest.raises(ConfigError, match="trainer.return_freed_memory"):
        Trainer(compose(["trainer.return_freed_memory=sometimes"]), tmp_path)
    calls = []  # glibc's setting is process-wide: record the call instead of slowing every later test
    monkeypatch.setattr(trainer_module, "return_freed_memory", lambda: calls.append(1) or True)
    cfg = compose(["+experiment=resnet20_xnor", "trainer.act_compression=int2",
                   f"trainer.return_freed_memory={str(release).lower()}", *smoke_overrides])
    Trainer(cfg, tmp_path).fit()
    facts = json.loads((tmp_path / "summary.json").read_text())["act_compression"]
    assert facts["mode"] == "int2" and facts["saved_bytes_first_step"]["held"] > 0
    assert facts["return_freed_memory"] is release and len(calls) == int(release)  # only on request
    assert facts["malloc_huge_pages"] is malloc_huge_pages()
    warned = "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in caplog.text  # returning memory without huge pages is slow
    assert warned is (release and not malloc_huge_pages())
    assert set(MODES) == {"none", "exact", "int8", "int4", "int2"}


def test_memory_tool_prints_the_table(capsys, monkeypatch):
    import qat.train.memory as memory

    assert memory.main(["+experiment=mnist_bnn", "--batch", "4", "--steps", "1", "--no-peak",
                        "--modes", "none,exact,int2"]) == 0
    out = capsys.readouterr().out
    assert "| none |" in out and "| int2 |" in out and "CPU: " in out and "freed memory" not in out
    monkeypatch.setattr(memory, "return_freed_memory", lambda: True)  # process-wide: not in the test process
    assert memory.main(["+experiment=mnist_bnn", "--no-peak", "--steps", "0", "--modes", "none",
                        "trainer.return_freed_memory=true", "--batch", "2"]) == 0  # overrides after options too
    assert "freed memory returned to the system" in capsys.readouterr().out


def test_integer_form_is_checked_not_assumed():
    from layers.quantized import INTEGER_FORM_ATTR

    compression = ActCompression(nn.Sequential(nn.Identity()), "exact", min_numel=1)
    scale = torch.tensor([0.3, 0.7]).view(1, 2, 1, 1)
    y = torch.randint(-9, 10, (3, 2, 4, 4)).float() * scale
    setattr(y, INTEGER_FORM_ATTR, (scale, 9, y._version))
    packed = compression._compress(y, "exact", None)
    assert type(packed).__name__ == "_Integer" and torch.equal(packed.unpack(), y)
    inexact = y + 0.01
    setattr(inexact, INTEGER_FORM_ATTR, (scale, 9, inexact._version))
    assert compression._compress(inexact, "exact", None) is inexact
    y.add_(0.01)  # changed in place after the layer: the recorded form no longer applies
    assert compression._compress(y, "exact", None) is y
