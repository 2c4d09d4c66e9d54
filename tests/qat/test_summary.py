"""Summary figures on a small model computed by hand."""
import math

import pytest
import torch
from torch import nn

import qat


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),    # 216 params, out 8x6x6: 8*36*27 = 7,776 MACs
        nn.BatchNorm2d(8),                 # 16 params
        nn.Conv2d(8, 16, 3, bias=False),   # 1,152 params, out 16x4x4: 256*72 = 18,432 MACs
        nn.BatchNorm2d(16),                # 32 params
        nn.Flatten(),
        nn.Linear(256, 10),                # 2,570 params, 2,560 MACs
    )


def test_hand_computed_xnor_figures():
    model = qat.quantize_model(small_model(), {"method": "xnor"})
    s = qat.summary(model, (3, 8, 8))
    assert s.params == 3986
    assert s.fp32_bytes == 4 * 3986
    # float: conv1, two BNs and fc at 32 bits; xnor conv: 1,152 bits = 144 B + 16 scales * 4 B
    assert s.quantized_bytes == 4 * (216 + 16 + 32 + 2570) + 144 + 64
    assert s.compression == pytest.approx(15944 / 11544)
    assert s.macs == {"binary": 18432, "low_bit_weight": 0, "float": 7776 + 2560}
    assert s.binary_mac_share == pytest.approx(18432 / 28768)
    rows = {layer.name: layer for layer in s.layers}
    assert (rows["2"].weight_bits, rows["2"].input_bits, rows["2"].packed_bytes) == (1, 1, 208)
    assert rows["0"].weight_bits == 32 and rows["1"].kind == "BatchNorm2d"
    text = str(s)
    assert "XNORConv2d" in text and "18,432" in text and "compression" in text
    d = s.to_dict()
    assert d["quantized_bytes"] == 11544 and len(d["layers"]) == 5


def test_ternary_entropy_coded_size():
    model = qat.quantize_model(small_model(), {"method": "ternary"})
    s = qat.summary(model, (3, 8, 8))
    layer = model[2]
    q = layer.quantized_weight().detach()
    counts = [(q < 0).sum().item(), (q == 0).sum().item(), (q > 0).sum().item()]
    bits = -sum(c / 1152 * math.log2(c / 1152) for c in counts if c)
    assert s.macs["low_bit_weight"] == 18432 and s.binary_mac_share == 0.0
    ternary_row = next(layer for layer in s.layers if layer.name == "2")
    assert ternary_row.packed_bytes == 288 + 4  # 2 bits per weight + one per-layer scale
    assert ternary_row.entropy_coded_bytes == pytest.approx(1152 * bits / 8 + 4)
    assert s.entropy_coded_bytes == pytest.approx(s.quantized_bytes - 288 + 1152 * bits / 8)
    assert s.entropy_coded_bytes < s.quantized_bytes


def test_fda_noise_modules_are_not_counted_and_mode_is_restored():
    model = qat.quantize_model(small_model(), {"method": "fda"})
    model.train()
    s = qat.summary(model, (3, 8, 8))
    assert s.params == 3986
    assert model.training and model[1].training


def test_resnet18_size_matches_the_reference_figures():
    import torchvision
    s = qat.summary(torchvision.models.resnet18(), (3, 32, 32))
    assert s.params == 11_689_512 and s.fp32_bytes == 46_758_048 and s.compression == 1.0
