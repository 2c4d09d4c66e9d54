"""Vertical-layered multi-bit weights (layers.multibit, qat.multibit): the cascade against a direct
bit-level transcription, code ranges, the nesting property, STE gradients, width selection and the
packed export at every width."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import qat
import qat.export
import qat.multibit as mb
from estimators import get as get_estimator
from layers import MultiBitConv2d, MultiBitLinear
from layers.multibit import TERNARY, MultiBitWeight, cascade_codes, parse_width
from qat.export.intcodes import pack_int_codes, unpack_int_codes
from tests.conftest import trained_like

BITS = (8, 4, 2, 1)


def quantizer(**options) -> MultiBitWeight:
    return MultiBitWeight(get_estimator("identity"), **options)


def direct_weights(w: torch.Tensor, ternary_from: int = 2) -> dict:
    """The module docstring's formulas, element by element with Python integers: u_8 rounded
    (half to even, as torch.round), the b-bit code its top b bits (u_8 >> (8 - b)); ternary: the
    2-bit code's outer levels (ternary_from=2) or the 4-bit code's levels from 5 on (ternary_from=4),
    the grid's outer level S as its scale."""
    s = float(w.abs().max())
    out = {}
    for b in BITS:
        values = []
        for x in w.flatten().tolist():
            u8 = min(max(round((x / s + 1.0) * 127.5), 0), 255)
            u = u8 >> (8 - b)
            values.append(s / (2 ** b - 1) * (2 * u - (2 ** b - 1)))
        out[b] = torch.tensor(values, dtype=torch.float64).view_as(w)
    source = torch.round(out[ternary_from] * (2 ** ternary_from - 1) / s)
    out[TERNARY] = s * torch.sign(source) * (source.abs() >= {2: 3, 4: 5}[ternary_from])
    return out


@pytest.mark.parametrize("ternary_from", [2, 4])
@pytest.mark.parametrize("width", mb.WIDTHS)
def test_cascade_matches_a_direct_bit_level_transcription(width, ternary_from):
    torch.manual_seed(0)
    w = torch.randn(6, 20)
    q = quantizer(scale="range", ternary_from=ternary_from)
    q.set_width(width)
    expected = direct_weights(w, ternary_from)[width]
    assert torch.allclose(q(w).double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("width", mb.WIDTHS)
def test_fitted_scale_is_the_least_squares_scale_of_the_same_code(width, per_channel):
    torch.manual_seed(5)
    w = torch.randn(5, 30)
    fit, grid = quantizer(per_channel=per_channel), quantizer(per_channel=per_channel, scale="range")
    code, scale = fit.codes(w, width)
    assert torch.equal(code, grid.codes(w, width)[0])  # the scale changes, the vertical layers do not
    rows = [(w[i], code[i]) for i in range(5)] if per_channel else [(w.flatten(), code.flatten())]
    for (target, c), a in zip(rows, scale.tolist(), strict=True):
        solution = torch.linalg.lstsq(c.double().view(-1, 1), target.double().view(-1, 1)).solution
        assert a == pytest.approx(float(solution), rel=1e-5)
    fit.set_width(width)
    assert torch.equal(fit(w), code * scale.view(-1, 1))


def test_every_width_uses_exactly_its_code_range():
    w = torch.linspace(-1, 1, 4001).view(1, -1)  # every 8-bit level is reached
    codes = cascade_codes(w, w.abs().amax())
    for b in BITS:
        levels = torch.arange(-(2 ** b - 1), 2 ** b, 2, dtype=w.dtype)  # odd integers, no zero
        assert torch.equal(codes[b].unique(), levels)
    assert torch.equal(codes[TERNARY].unique(), torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(codes[1].unique(), torch.tensor([-1.0, 1.0]))


def test_lower_codes_are_the_higher_codes_with_bits_dropped():
    """The nesting the paper's vertical layering rests on: each width's unsigned code is the top bits
    of the wider one's (u_b = u_8 >> (8 - b)), so c_b = 2 c_{b'} + (2 e - 1) with e in {0, 1} the
    enhance bit, down to the binary basic layer; ternary zeroes the 2-bit code's inner levels and
    keeps the binary code's sign."""
    torch.manual_seed(1)
    w = torch.randn(8, 50) * 3
    codes = cascade_codes(w, w.abs().amax())
    unsigned = {b: ((codes[b] + 2 ** b - 1) / 2).long() for b in BITS}
    for wide, narrow in zip(BITS, BITS[1:], strict=False):
        assert torch.equal(unsigned[wide] >> (wide - narrow), unsigned[narrow])
        enhance = codes[wide] - 2 ** (wide - narrow) * codes[narrow]  # the dropped bits' contribution
        assert enhance.abs().max() <= 2 ** (wide - narrow) - 1
    ternary = codes[TERNARY]
    assert torch.equal(ternary != 0, codes[2].abs() == 3)
    assert torch.equal(ternary[ternary != 0], codes[1][ternary != 0])
    from_four = cascade_codes(w, w.abs().amax(), ternary_from=4)
    assert all(torch.equal(from_four[b], codes[b]) for b in BITS)  # only the ternary code changes
    kept = from_four[TERNARY] != 0
    assert torch.equal(kept, codes[4].abs() >= 5) and torch.equal(from_four[TERNARY][kept], codes[1][kept])
    assert bool((kept >= (ternary != 0)).all()) and kept.sum() > (ternary != 0).sum()  # a superset: denser
    # and the weights on the grid's own scale: ternary is the 2-bit weight where it is nonzero
    q = quantizer(scale="range")
    weights = {}
    for width in mb.WIDTHS:
        q.set_width(width)
        weights[width] = q(w)
    kept = weights[TERNARY] != 0
    assert torch.equal(weights[TERNARY][kept], weights[2][kept]) and 0 < kept.float().mean() < 1


def test_higher_widths_approximate_the_latent_weight_better():
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    for scale in ("fit", "range"):
        q = quantizer(scale=scale)
        errors = []
        for width in BITS:
            q.set_width(width)
            errors.append(float((q(w) - w).square().mean()))
        assert errors == sorted(errors) and errors[0] < 1e-4 * float(w.square().mean())


@pytest.mark.parametrize("width", mb.WIDTHS)
def test_gradient_is_straight_through_at_every_width(width):
    torch.manual_seed(3)
    w = torch.randn(4, 9, requires_grad=True)
    q = quantizer()
    q.set_width(width)
    upstream = torch.randn(4, 9)
    (q(w) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_per_channel_scale_is_each_rows_max():
    w = torch.tensor([[0.5, -0.25, 0.1], [4.0, 1.0, -2.0]])
    q = quantizer(per_channel=True, scale="range")
    q.set_width(1)
    assert torch.equal(q(w), torch.tensor([[0.5, -0.5, 0.5], [4.0, 4.0, -4.0]]))
    code, scale = q.codes(w, 4)
    assert torch.equal(scale, torch.tensor([0.5, 4.0]) / 15) and code.shape == w.shape
    assert q.scale_count(w) == 2 and quantizer().scale_count(w) == 1
    fitted = quantizer(per_channel=True)
    fitted.set_width(1)  # BWN's mean |W_c| where the binary code is sign(W)
    assert torch.allclose(fitted(w), torch.tensor([[0.85, -0.85, 0.85], [7.0, 7.0, -7.0]]) / 3)


def test_width_parsing_and_errors():
    assert [parse_width(v) for v in (8, "4", 2, "ternary", "Ternary", 1)] == [8, 4, 2, TERNARY, TERNARY, 1]
    for bad in (1.58, 3, "two", True, 16):
        with pytest.raises(ValueError, match="valid widths: 8, 4, 2, ternary, 1"):
            parse_width(bad)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4))


def test_set_bits_and_the_context_reach_every_layer_and_restore():
    model = qat.quantize_model(small_model(), {"method": "multibit", "keep_fp": []})
    layers_ = [m for m in model.modules() if isinstance(m, (MultiBitConv2d, MultiBitLinear))]
    assert len(layers_) == 4 and mb.active_width(model) == 8 and all(m.weight_bits == 8 for m in layers_)
    mb.set_bits(model, 4)
    with mb.bits(model, "ternary"):
        assert mb.active_width(model) == TERNARY and all(m.weight_bits == 2 for m in layers_)
        assert all(m.quantized_weight().unique().numel() == 3 for m in layers_)
    assert mb.active_width(model) == 4
    with pytest.raises(ValueError, match="no multi-bit layers"):
        mb.set_bits(small_model(), 2)


def test_summary_counts_the_active_widths_bits():
    model = qat.quantize_model(small_model(), {"method": "multibit", "keep_fp": []})
    sizes = {}
    for width in mb.WIDTHS:
        with mb.bits(model, width):
            sizes[width] = qat.summary(model, (3, 6, 6)).quantized_bytes
    assert sizes[8] > sizes[4] > sizes[2] == sizes[TERNARY] > sizes[1]


@pytest.mark.parametrize("per_channel, scale, ternary_from", [(False, "fit", 2), (True, "fit", 2), (False, "range", 2),
                                                               (True, "range", 2), (False, "fit", 4), (True, "fit", 4)])
@pytest.mark.parametrize("width", mb.WIDTHS)
def test_packed_export_at_a_width_reproduces_the_model_at_that_width(width, per_channel, scale, ternary_from,
                                                                      tmp_path):
    model = qat.quantize_model(small_model(), {"method": "multibit", "keep_fp": [], "per_channel": per_channel,
                                               "scale": scale, "ternary_from": ternary_from})
    trained_like(model, (3, 6, 6))
    mb.set_bits(model, width)
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
        packed = qat.export.pack_model(model)
        codes = {m.spec.code for m in packed.modules() if hasattr(m, "spec")}
        assert codes == {{1: "binary", TERNARY: "ternary"}.get(width, f"int{width}")}
        assert torch.equal(packed(x), expected)
        path = qat.export.save_packed(packed, tmp_path / "m.safetensors", architecture=False)
        loaded = qat.export.load_packed(path, model=small_model()).eval()
        assert torch.equal(loaded(x), expected)
    with mb.bits(model, 8 if width != 8 else 1), torch.no_grad():  # another width gives another model
        assert not torch.equal(model(x), expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_codes_pack_to_b_bits_and_back(bits):
    torch.manual_seed(4)
    levels = 2 ** bits - 1
    code = (2 * torch.randint(0, levels + 1, (5, 37)) - levels).float()
    packed = pack_int_codes(code, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-37 * bits // 8))
    assert torch.equal(unpack_int_codes(packed, bits, 37), code)
    with pytest.raises(ValueError, match="odd integers"):
        pack_int_codes(code + 1, bits)


def test_a_quant_block_without_ternary_from_keeps_the_rule_it_was_trained_with():
    """Checkpoints carry their config; one written before ``ternary_from`` existed has no such key and
    must rebuild the 2-bit rule it was trained and calibrated with, while the experiment's quant
    config asks for the 4-bit one."""
    old = qat.quantize_model(small_model(), {"method": "multibit", "keep_fp": []})
    assert {q.ternary_from for q in mb.multibit_quantizers(old)} == {2}
    block = yaml.safe_load((Path(__file__).parents[2] / "configs" / "quant" / "multibit.yaml").read_text())
    new = qat.quantize_model(small_model(), {**block, "keep_fp": []})
    assert {q.ternary_from for q in mb.multibit_quantizers(new)} == {4}
