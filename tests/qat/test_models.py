"""The float model registry and the shapes / parameter counts of each definition."""
import pytest
import torch
import torch.nn as nn
import torchvision

from qat import models


@pytest.mark.parametrize("name, in_channels, size, classes", [
    ("resnet18", 3, 32, 10), ("resnet20", 3, 32, 10), ("vgg_small", 3, 32, 10),
    ("mnist_cnn", 1, 28, 10), ("resnet18_imagenet", 3, 64, 7),
])
def test_every_model_maps_images_to_class_logits(name, in_channels, size, classes):
    model = models.build(name, num_classes=classes, in_channels=in_channels)
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, classes)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*mnist_cnn.*resnet18.*vgg_small"):
        models.build("resnet19", num_classes=10)


def test_bad_option_names_the_model():
    with pytest.raises(ValueError, match="bad options for model 'resnet20'"):
        models.build("resnet20", num_classes=10, depth=56)


def test_parameter_counts_match_the_published_architectures():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # He et al.: ResNet-20 has 0.27M parameters. By hand: convs 432 + 6*2304 + 4608 + 5*9216
    # + 18432 + 5*36864 = 267,696; BN 2*(16 + 6*16 + 6*32 + 6*64) = 1,376; FC 64*10 + 10 = 650.
    assert count(models.build("resnet20", num_classes=10)) == 269_722
    assert count(models.build("resnet18_imagenet", num_classes=1000)) == count(torchvision.models.resnet18())
    # CIFAR ResNet-18: 11,173,962 with a 10-way head (the usual kuangliu/IR-Net figure).
    assert count(models.build("resnet18", num_classes=10)) == 11_173_962


def test_cifar_resnet18_has_a_3x3_stem_and_no_max_pool():
    model = models.build("resnet18", num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    downsample = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert downsample == ["layers.1.0.downsample.0", "layers.2.0.downsample.0", "layers.3.0.downsample.0"]


def test_resnet20_option_a_has_no_shortcut_parameters():
    convs = [m for m in models.build("resnet20", num_classes=10).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and all(c.kernel_size == (3, 3) for c in convs)


def test_mnist_cnn_is_larqs_network():
    model = models.build("mnist_cnn", num_classes=10, in_channels=1)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [(type(m).__name__, getattr(m, "out_channels", getattr(m, "out_features", None))) for m in layers] == [
        ("Conv2d", 32), ("Conv2d", 64), ("Conv2d", 64), ("Linear", 64), ("Linear", 10)]
    assert all(m.bias is None for m in layers)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 5 and all(not bn.weight.requires_grad for bn in norms)
    assert sum(p.numel() for p in model.parameters()) == 93_556  # Larq tutorial: 93,556 (with BN)


def test_activation_option_replaces_relu():
    model = models.build("resnet18_imagenet", num_classes=10, activation="hardtanh")
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert any(isinstance(m, nn.Hardtanh) for m in model.modules())
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        models.build("resnet20", num_classes=10, activation="tanh")


def test_build_records_the_architecture_it_built():
    import copy

    import qat
    model = models.build("resnet20", num_classes=7, in_channels=1, activation="hardtanh")
    expected = {"name": "resnet20", "num_classes": 7, "in_channels": 1, "activation": "hardtanh"}
    assert models.architecture_of(model) == expected
    # the record rebuilds the same network, and it is carried through the quantization swap and copies
    rebuilt = models.build_architecture(models.architecture_of(model))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    quantized = qat.quantize_model(model, {"method": "xnor"})
    assert models.architecture_of(copy.deepcopy(quantized)) == expected
    assert not any("architecture" in key for key in quantized.state_dict())
    models.architecture_of(model)["num_classes"] = 99  # a copy: the record itself is unchanged
    assert models.architecture_of(model) == expected
    assert models.architecture_of(torchvision.models.resnet18()) is None


def test_mnist_cnn_names_its_true_smallest_image_size():
    model = models.build("mnist_cnn", num_classes=10, in_channels=1, image_size=18)
    assert model(torch.zeros(2, 1, 18, 18)).shape == (2, 10)
    with pytest.raises(ValueError, match="image_size >= 18, got 17"):
        models.build("mnist_cnn", num_classes=10, in_channels=1, image_size=17)


def test_completed_architectures_compare_records_without_later_options():
    older = {"name": "gpt", "num_classes": 256, "in_channels": 1, "depth": 4}   # before scaled_residual_init
    newer = {**older, "scaled_residual_init": True}
    assert models.complete_architecture(older) == models.complete_architecture(newer)
    assert models.complete_architecture(older) != models.complete_architecture({**older, "scaled_residual_init": False})
    assert models.complete_architecture(older)["width"] == 256 and older == {**older}   # defaults filled, input kept
