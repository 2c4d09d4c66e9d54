"""quantize_model on torchvision's ResNet-18, set_progress, latent-weight handling."""
import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

import layers
import qat
import qat.models


@pytest.fixture(scope="module")
def float_resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.fixture
def resnet(float_resnet):
    import copy
    return copy.deepcopy(float_resnet)


def convs_and_linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_default_spec_keeps_first_and_last_float(resnet, float_resnet):
    model = qat.quantize_model(resnet, {"method": "xnor"})
    swapped = convs_and_linears(model)
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    others = [m for n, m in swapped if n not in ("conv1", "fc")]
    assert len(others) == 19 and all(type(m) is layers.XNORConv2d for m in others)
    for (name, m), (_, f) in zip(swapped, convs_and_linears(float_resnet), strict=True):
        assert torch.equal(m.weight, f.weight), name
        if isinstance(m, nn.Conv2d):
            assert m.stride == f.stride and m.padding == f.padding
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_keep_downsample_and_globs(resnet):
    model = qat.quantize_model(resnet, {"method": "bwn", "keep_fp": ["first", "last", "downsample", "layer4.1.*"]})
    assert type(model.layer2[0].downsample[0]) is nn.Conv2d
    assert type(model.layer4[1].conv1) is nn.Conv2d and type(model.layer4[1].conv2) is nn.Conv2d
    assert type(model.layer4[0].conv1) is layers.BWNConv2d


def test_overrides_and_estimator_mapping(resnet):
    spec = OmegaConf.create({
        "method": "xnor", "estimator": {"name": "ede", "t_min": 0.01},
        "overrides": {"first": {"method": "bwn"}, "layer4.*": {"method": "ternary", "threshold_factor": 0.5}},
    })
    model = qat.quantize_model(resnet, spec)
    assert type(model.conv1) is layers.BWNConv2d  # overrides win over keep_fp
    assert model.conv1.weight_quantizer.estimator.t_min == 0.01  # the estimator carries over
    assert type(model.layer4[0].conv1) is layers.TernaryConv2d
    assert model.layer4[0].conv1.weight_quantizer.threshold_factor == 0.5
    assert type(model.layer3[0].conv1) is layers.XNORConv2d
    assert model.layer3[0].conv1.input_quantizer.estimator.t_min == 0.01
    assert type(model.fc) is nn.Linear


def test_each_layer_gets_its_own_estimator(resnet):
    model = qat.quantize_model(resnet, {"method": "xnor", "estimator": "ede"})
    ests = {id(m.input_quantizer.estimator) for m in model.modules() if isinstance(m, layers.XNORConv2d)}
    assert len(ests) == 19


def test_method_hyperparameters_reach_the_layers(resnet):
    model = qat.quantize_model(resnet, {"method": "hq", "target_sparsity": 0.9})
    assert model.layer1[0].conv1.weight_quantizer.target_sparsity == 0.9


def test_fp_method_changes_nothing(resnet, float_resnet):
    model = qat.quantize_model(resnet, {"method": "fp"})
    assert [type(m) for _, m in convs_and_linears(model)] == [type(m) for _, m in convs_and_linears(float_resnet)]


@pytest.mark.parametrize("spec,needle", [
    ({"method": "xnr"}, "xnr"),
    ({"method": "xnor", "estimator": "fourrier"}, "fourrier"),
    ({"method": "xnor", "overrides": {"layer9.*": {"method": "bwn"}}}, "layer9"),
    ({"method": "xnor", "keep_fp": ["first", "head.*"]}, "head"),
    ({"method": "xnor", "overrides": {"layer1.*": {"method": "tern"}}}, "tern"),
    ({"method": "bwn", "target_sparsity": 0.5}, "target_sparsity"),
    ({"estimator": "identity"}, "method"),
])
def test_errors_name_the_bad_value(resnet, spec, needle):
    with pytest.raises(ValueError, match=needle):
        qat.quantize_model(resnet, spec)


def test_set_progress_reaches_every_scheduled_part(resnet):
    model = qat.quantize_model(resnet, {"method": "fda"})
    qat.set_progress(model, 1.0)
    fda = [m for m in model.modules() if isinstance(m, layers.FDAConv2d)]
    assert fda and all(m.diagnostics()["noise_weight"] == 0.0 and m.diagnostics()["terms"] == 18 for m in fda)
    assert all(m.input_quantizer.noise_weight == 0.0 and m.input_quantizer.estimator.terms == 18 for m in fda)
    model = qat.quantize_model(torchvision.models.resnet18(), {"method": "xnor", "estimator": "ede"})
    qat.set_progress(model, 1.0)
    assert all(m.input_quantizer.estimator.t == pytest.approx(10.0)
               for m in model.modules() if isinstance(m, layers.XNORConv2d))
    with pytest.raises(ValueError):
        qat.set_progress(model, 2.0)


def test_set_progress_on_a_bare_layer():
    conv = layers.FDAConv2d(4, 4, 3)
    qat.set_progress(conv, 1.0)
    assert conv.diagnostics()["noise_weight"] == 0.0


def test_latent_param_groups_and_clipping():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(),
                          nn.LazyLinear(2))
    model(torch.randn(1, 3, 9, 9))
    model = qat.quantize_model(model, {"method": "xnor", "overrides": {"3": {"method": "ternary"}}})
    groups = qat.latent.param_groups(model, weight_decay=1e-4)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert id(model[2].weight) not in decayed  # xnor latent weight
    assert id(model[3].weight) in decayed  # ternary keeps weight decay
    assert id(model[0].weight) in decayed and id(model[1].weight) not in decayed
    with torch.no_grad():
        model[2].weight.mul_(10)
        model[3].weight.mul_(10)
    qat.latent.clip_latent_weights(model)
    assert model[2].weight.abs().max() <= 1.0
    assert model[3].weight.abs().max() > 1.0


def test_method_bits():
    assert qat.method_bits("xnor") == (1, 1) and qat.method_bits("ternary") == (2, 32)
    assert qat.method_bits("fp") == (32, 32) and qat.method_bits("fda") == (1, 1)


def test_param_groups_honour_the_models_no_weight_decay_names():
    vit = qat.models.build("vit", num_classes=10, depth=1, width=32, heads=2)
    groups = qat.latent.param_groups(vit, weight_decay=0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(vit.pos_embed) not in decayed                      # named by ViT.no_weight_decay()
    assert id(vit.patch_embed.weight) in decayed and id(vit.head.weight) in decayed
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in vit.parameters())

    class Misnamed(nn.Linear):
        def no_weight_decay(self):
            return {"pos_embedding"}

    with pytest.raises(ValueError, match=r"names no parameter \['pos_embedding'\]"):
        qat.latent.param_groups(Misnamed(2, 2), weight_decay=0.05)
