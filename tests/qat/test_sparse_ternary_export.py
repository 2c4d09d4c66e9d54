"""2:4 ternary layers in the packed export and the model summary: the file holds kernels.sparse24's
format (4/3 bits per weight, measured), loads back to what the quantized model computes bit for bit,
and the summary counts the same bytes."""
import math
import os

import pytest
import torch
from torch import nn

import kernels
import qat
from conftest import trained_like
from kernels.sparse24 import tap_major
from layers import Ternary24Conv2d, Ternary24Linear
from qat import models
from qat.export import PackedLayer, load_packed, pack_model, read_packed, save_packed

MNIST = {"name": "mnist_cnn", "num_classes": 10, "in_channels": 1}


def sparsify(model, **options):
    """Every Conv2d / Linear of ``model`` as a 2:4 ternary layer with its weights."""
    return qat.quantize_model(model, {"method": "ternary24", "keep_fp": [], **options})


@pytest.fixture(scope="module")
def mnist24():
    torch.manual_seed(0)
    model = sparsify(models.build("mnist_cnn", **{k: v for k, v in MNIST.items() if k != "name"}), mask="fixed",
                     prune_at=0.5)
    qat.set_progress(model, 1.0)
    return trained_like(model, (1, 28, 28))


def test_packed_model_and_its_file_reproduce_the_quantized_model(mnist24, tmp_path):
    packed = pack_model(mnist24)
    layers = [m for m in packed.modules() if isinstance(m, PackedLayer)]
    assert len(layers) == 5 and {m.spec.code for m in layers} == {"ternary24"}
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = mnist24(x)
        assert torch.equal(packed(x), ref)
        loaded = load_packed(save_packed(packed, tmp_path / "m24.safetensors", architecture=MNIST))
        assert torch.equal(loaded(x), ref)
    for name, layer in mnist24.named_modules():
        if isinstance(layer, (Ternary24Conv2d, Ternary24Linear)):  # the unpacked weight is the quantized one
            assert torch.equal(loaded.get_submodule(name).float_weight(), layer.quantized_weight())


def test_file_holds_four_thirds_of_a_bit_per_weight_and_matches_the_summary(mnist24, tmp_path):
    path = save_packed(pack_model(mnist24), tmp_path / "m24.safetensors", architecture=MNIST)
    tensors, _ = read_packed(path)
    summary = {layer.name: layer for layer in qat.summary(mnist24, (1, 28, 28)).layers}
    codes = {k[: -len(".weight_codes")]: t for k, t in tensors.items() if k.endswith("weight_codes")}
    assert len(codes) == 5 and all(t.dtype == torch.uint8 for t in codes.values())
    for name, t in codes.items():
        assert t.numel() == summary[name].packed_weight_bytes
    # a real layer: conv 32 -> 64, 3x3 (K = 288 = 24 units of 12 weights)
    name = next(n for n in codes if summary[n].quantized_weights == 64 * 32 * 9)
    assert codes[name].numel() * 8 / summary[name].quantized_weights == pytest.approx(4 / 3)
    assert summary[name].bits_per_weight == pytest.approx(4 / 3)
    first = next(n for n in codes if summary[n].quantized_weights == 32 * 9)  # K = 9: one unit per row
    assert summary[first].bits_per_weight == pytest.approx(16 / 9)


def test_the_2_4_file_is_smaller_than_the_dense_ternary_one(mnist24, tmp_path):
    dense = qat.quantize_model(models.build("mnist_cnn", num_classes=10, in_channels=1),
                               {"method": "ternary", "keep_fp": []})
    dense = trained_like(dense, (1, 28, 28))
    sizes = {}
    for label, model in (("dense", dense), ("2:4", mnist24)):
        tensors, _ = read_packed(save_packed(pack_model(model), tmp_path / f"{label}.safetensors", architecture=MNIST))
        sizes[label] = sum(t.numel() * t.element_size() for k, t in tensors.items()
                           if k.endswith(("weight_codes", "weight_sign", "weight_nonzero")))
    # rows of K = 288 and 576: 2 planes of ceil(K/64) words against 2 K / 12 bytes -> 1.5x; the first
    # conv (K = 9): 16 bytes against 2
    assert sizes["dense"] / sizes["2:4"] > 1.5
    assert os.path.getsize(tmp_path / "2:4.safetensors") < os.path.getsize(tmp_path / "dense.safetensors")


def test_grouped_conv_and_tails_pack_exactly():
    torch.manual_seed(1)
    model = sparsify(nn.Sequential(nn.Conv2d(6, 12, 3, padding=1, groups=2, bias=True), nn.Flatten(),
                                   nn.Linear(12 * 25, 7)))  # K = 27 (3 % 4 tail) and 300
    qat.set_progress(model, 1.0)
    model.eval()
    packed = pack_model(model)
    x = torch.randn(3, 6, 5, 5)
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


def test_summary_counts_the_format_bytes():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Conv2d(8, 16, 3, bias=False), nn.Flatten(), nn.Linear(16 * 16, 10)))
    s = qat.summary(model, (8, 6, 6))
    conv, linear = (layer for layer in s.layers if layer.weight_bits == 2)
    # K = 72: 18 groups, 6 units of 2 bytes per output channel; one per-layer scale
    assert conv.packed_weight_bytes == 16 * 12 == kernels.ternary24_nbytes(16, 72)
    assert conv.packed_bytes == 192 + 4 and conv.bits_per_weight == pytest.approx(4 / 3)
    # K = 256 is not a multiple of 12: 22 units (264 weights) per row
    assert linear.packed_weight_bytes == 10 * 44 and linear.packed_bytes == 440 + 4 * (10 + 1)
    assert s.quantized_bytes == 196 + 484
    # entropy over the 33 group codes, per weight: a weight-level entropy would ignore the 2:4 structure
    codes = kernels.sparse24.group_codes(tap_major(torch.sign(model[0].quantized_weight().detach())))
    p = torch.bincount(codes.flatten()).double() / codes.numel()
    p = p[p > 0]
    assert conv.entropy_bits_per_weight == pytest.approx(float(-(p * p.log2()).sum()) / 4)
    assert conv.entropy_bits_per_weight <= math.log2(33) / 4 < conv.bits_per_weight
    assert s.entropy_coded_bytes < s.quantized_bytes
    assert "1.33" in str(s) and s.to_dict()["layers"][0]["bits_per_weight"] == pytest.approx(4 / 3)


def test_packing_before_prune_at_is_refused():
    model = sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), prune_at=0.5)
    qat.set_progress(model, 0.25)
    with pytest.raises(ValueError, match=r"prune_at=0.5.*set_progress\(model, 1.0\)"):
        pack_model(model)
