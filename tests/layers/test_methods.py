"""Every registered method, through every consumer of the method table: the drop-in classes, the
swap, the config resolvers and quant configs, the training diagnostics and latent policy, the
summary and packed export. A new row in ``layers.methods`` is tested here without listing it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import layers
import qat
import qat.export
from layers.methods import ESTIMATOR_OPTIONS
from qat.train import config as train_config
from qat.train.diagnostics import LayerDiagnostics
from qat.train.trainer import estimator_label

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
METHODS = tuple(layers.METHODS)


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardtanh(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.Hardtanh(), nn.Linear(16, 4))


def test_the_table_is_consistent():
    assert METHODS and layers.METHOD_NAMES == ("fp", *METHODS)
    for name, method in layers.METHODS.items():
        assert method.name == name
        fallback = method.weights_only
        assert method.quantized_inputs == (method.input_bits < 32)
        assert method.binary_inputs == (method.input_bits == 1)
        if method.quantized_inputs:
            # the first layer's fallback keeps the weights' bit width and has float inputs
            assert fallback is not None and layers.method_bits(fallback)[1] == 32
            assert fallback == "fp" or layers.METHODS[fallback].weight_bits == method.weight_bits
        else:
            assert fallback is None and layers.weights_only_method(name) == name
        assert method.weight_bits in (1, 2, 8, 32) and method.input_bits in (1, 8, 32)  # W8: multibit's full code
        assert method.options is not None  # raises when two quantizers declare clashing options


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("float_type", [nn.Conv2d, nn.Linear])
def test_dropin_classes_are_generated_and_documented(method, float_type):
    cls = layers.LAYER_CLASSES[(method, float_type)]
    spec = layers.METHODS[method]
    assert cls.__name__ == spec.class_prefix + float_type.__name__ and getattr(layers, cls.__name__) is cls
    assert issubclass(cls, float_type) and cls.method_spec is spec
    for option in spec.options:
        assert option in cls.__doc__
    layer = cls(6, 4, 3) if float_type is nn.Conv2d else cls(6, 4)
    assert (layer.weight_bits, layer.input_bits) == layers.method_bits(method)
    assert (layer.input_quantizer is not None) == spec.quantized_inputs
    assert layers.binary_inputs(method) == (layer.input_bits == 1)
    assert layer.weight_quantizer.estimator.name == spec.default_estimator
    if layer.input_quantizer is not None:
        assert layer.input_quantizer.estimator.name == (spec.default_input_estimator or spec.default_estimator)
    with pytest.raises(ValueError, match="unknown option"):
        cls(6, 4, 3, no_such_option=1) if float_type is nn.Conv2d else cls(6, 4, no_such_option=1)


@pytest.mark.parametrize("method", METHODS)
def test_every_option_is_validated_and_reaches_its_quantizer(method):
    spec = layers.METHODS[method]
    for option in spec.options.values():
        wrong = "text" if option.kind is not str else 3
        with pytest.raises(ValueError, match=option.name):
            spec.validate_options({option.name: wrong})
        layer = layers.LAYER_CLASSES[(method, nn.Linear)](6, 4, **{option.name: option.default})
        owners = [layer] + [q for q in (layer.weight_quantizer, layer.input_quantizer) if q is not None]
        assert any(getattr(o, option.name, object()) == option.default for o in owners)


@pytest.mark.parametrize("method", METHODS)
def test_quant_config_exists_and_names_only_the_methods_options(method):
    path = CONFIGS / "quant" / f"{method}.yaml"
    assert path.is_file(), f"{method} has no configs/quant/{method}.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert cfg["method"] == method
    extra = set(cfg) - set(qat.swap.SPEC_KEYS)
    assert extra <= layers.METHODS[method].option_names()


def test_every_quant_config_names_a_method():
    names = {p.stem for p in (CONFIGS / "quant").glob("*.yaml")}
    assert names == set(layers.METHOD_NAMES)


@pytest.mark.parametrize("method", layers.METHOD_NAMES)
def test_config_resolvers_follow_the_table(method):
    binary = method != "fp" and layers.METHODS[method].binary_inputs
    assert train_config.activation_for(method) == ("hardtanh" if binary else "relu")
    fallback = layers.weights_only_method(method)
    assert layers.method_bits(fallback)[1] == 32
    assert estimator_label(None, method) == ("none" if method == "fp" else layers.METHODS[method].default_estimator)


@pytest.mark.parametrize("method", METHODS)
def test_swap_train_step_diagnostics_and_latent_policy(method):
    model = qat.quantize_model(small_model(), {"method": method, "keep_fp": []})
    quantized = [m for m in model.modules() if isinstance(m, layers.QuantizedLayer)]
    assert len(quantized) == 4 and all(m.method == method for m in quantized)
    x = torch.randn(4, 3, 6, 6)
    qat.set_progress(model, 0.3)
    model(x).square().mean().backward()
    assert all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all() for m in quantized)
    diagnostics = LayerDiagnostics(model)
    first = diagnostics.collect()
    with torch.no_grad():
        for m in quantized:
            m.weight.neg_()
    second = diagnostics.collect()
    spec = layers.METHODS[method]
    for name, m in model.named_modules():
        if not isinstance(m, layers.QuantizedLayer):
            continue
        keys = {k.rsplit("/", 1)[1] for k in second if k.startswith(f"diag/{name}/")}
        assert "clip_fraction" in keys and set(m.diagnostics()) <= keys
        assert ("flip_ratio" in keys) == (spec.weight_bits == 1)
        assert ("zero_fraction" in keys) == (spec.weight_bits == 2)
        assert f"diag/{name}/flip_ratio" not in first
    decayed = {id(p) for group in qat.latent.param_groups(model, 1e-4) if group["weight_decay"] > 0
               for p in group["params"]}
    assert all((id(m.weight) in decayed) == spec.latent_weight_decay for m in quantized)
    with torch.no_grad():
        for m in quantized:
            m.weight.mul_(100.0)
    qat.latent.clip_latent_weights(model)
    limit = spec.clip_latent
    assert all((m.weight.abs().max() <= limit) if limit is not None else (m.weight.abs().max() > 1.0)
               for m in quantized)


@pytest.mark.parametrize("method", METHODS)
def test_summary_counts_the_methods_bits(method):
    model = qat.quantize_model(small_model(), {"method": method, "keep_fp": []})
    text = str(qat.summary(model, (3, 6, 6)))
    assert method in text or layers.METHODS[method].class_prefix in text


@pytest.mark.parametrize("method", [m for m in METHODS if layers.METHODS[m].weight_bits <= 2])
def test_packed_export_reproduces_the_quantized_model(method):
    model = qat.quantize_model(small_model(), {"method": method, "keep_fp": []})
    qat.set_progress(model, 1.0)
    with torch.no_grad():  # train BN statistics and any learned thresholds away from their init
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            if hasattr(m, "threshold"):
                m.threshold.uniform_(-0.3, 0.3)
    model.eval()
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
        packed = qat.export.pack_model(model)
        fused = qat.export.fuse_binary_chains(packed)
        assert torch.equal(packed(x), expected)
        assert torch.equal(fused(x), expected)


def test_estimator_options_are_common_to_every_method():
    for method in layers.METHODS.values():
        assert set(ESTIMATOR_OPTIONS) <= method.option_names()
