"""Per-width BatchNorm statistics of multi-bit models (qat.multibit.per_width_batchnorm): each width
trains and evaluates with its own running statistics, selected by set_bits; state dicts round-trip;
a packed export holds the exported width's statistics and reproduces the model at that width."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
import qat.export
import qat.multibit as mb

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
LABELS = {8: "8b", 4: "4b", 2: "2b", "ternary": "ternary", 1: "1b"}


def float_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def multibit_model(per_width: bool = True, affine: bool = False) -> nn.Module:
    model = qat.quantize_model(float_model(), {"method": "multibit", "keep_fp": []})
    if per_width:
        assert mb.per_width_batchnorm(model, affine=affine) == 3
    return model


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def train_at_every_width(model, steps: int = 2, widths=mb.WIDTHS):
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(steps):
            x = torch.randn(16, 3, 6, 6) * 2 + 0.5
            for width in widths:
                mb.set_bits(model, width)
                model(x)
    return model.eval()


def width_statistics(bn, width):
    return [getattr(bn, f"{s}_{LABELS[width]}") for s in STATISTICS]


def test_each_width_updates_only_its_own_statistics():
    model = multibit_model()
    initial = copy.deepcopy(model.state_dict())
    model.train()
    mb.set_bits(model, "ternary")
    with torch.no_grad():
        model(torch.randn(16, 3, 6, 6))
    state = model.state_dict()
    for name, tensor in state.items():
        moved = not torch.equal(tensor, initial[name])
        if "running_mean" in name or "running_var" in name or "num_batches_tracked" in name:
            assert moved == name.endswith("_ternary"), name
    for bn in batchnorms(model):
        assert bn.num_batches_tracked_ternary == 1 and bn.num_batches_tracked_8b == 0
        assert bn.running_mean is bn.running_mean_ternary  # the active width's buffers, no copies


def test_statistics_differ_per_width_after_training_at_each_width():
    model = train_at_every_width(multibit_model())
    for bn in batchnorms(model):
        means = [bn.get_buffer(f"running_mean_{label}") for label in LABELS.values()]
        variances = [bn.get_buffer(f"running_var_{label}") for label in LABELS.values()]
        for i in range(len(means)):
            for j in range(i):
                assert not torch.allclose(means[i], means[j]) or not torch.allclose(variances[i], variances[j])
        assert all(bn.get_buffer(f"num_batches_tracked_{label}") == 2 for label in LABELS.values())


@pytest.mark.parametrize("width", mb.WIDTHS)
def test_evaluation_at_a_width_uses_exactly_that_widths_statistics(width):
    model = train_at_every_width(multibit_model())
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        mb.set_bits(model, width)
        output = model(x)
        # the same computation written out with width's buffers, BatchNorm by BatchNorm
        h = x
        for layer in model:
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                mean, var, _ = width_statistics(layer, width)
                h = F.batch_norm(h, mean, var, layer.weight, layer.bias, False, 0.0, layer.eps)
            else:
                h = layer(h)
    assert torch.equal(output, h)
    other = 1 if width != 1 else 8
    with mb.bits(model, other), torch.no_grad():
        assert not torch.allclose(model(x), output)
    assert all(bn.running_var is width_statistics(bn, width)[1] for bn in batchnorms(model))  # bits() restores


def test_shared_statistics_are_exactly_the_model_without_per_width_buffers():
    shared, per_width = multibit_model(per_width=False), multibit_model()
    assert not any("_8b" in key for key in shared.state_dict())
    train_at_every_width(shared)
    train_at_every_width(per_width)
    for bn_shared, bn_width in zip(batchnorms(shared), batchnorms(per_width), strict=True):
        assert bn_shared.num_batches_tracked == 2 * len(mb.WIDTHS)  # every width's forward updates the one set
        assert not torch.allclose(bn_shared.running_mean, bn_width.running_mean_1b)
    # the one set equals a plain BatchNorm model (no multi-bit BN code at all) run the same way
    plain = qat.quantize_model(float_model(), {"method": "multibit", "keep_fp": []})
    train_at_every_width(plain)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), shared.state_dict().values(),
                                                 strict=True))


def test_state_dict_round_trip_keeps_every_widths_statistics():
    trained = train_at_every_width(multibit_model())
    mb.set_bits(trained, 2)
    state = trained.state_dict()
    assert {f"1.{s}_{label}" for s in STATISTICS for label in LABELS.values()} <= set(state)
    assert "1.running_mean" not in state  # saved once, under its width's name
    fresh = multibit_model()
    mb.set_bits(fresh, 4)  # loaded at another active width than saved
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    x = torch.randn(4, 3, 6, 6)
    for width in mb.WIDTHS:
        with mb.bits(fresh, width), mb.bits(trained, width), torch.no_grad():
            assert torch.equal(fresh(x), trained(x))
    assert mb.active_width(fresh) == 4
    assert qat.multibit.stored_batchnorm_mode(state) == "per_width"
    assert qat.multibit.stored_batchnorm_mode(multibit_model(per_width=False).state_dict()) == "shared"


def test_device_or_dtype_moves_and_copies_keep_updating_the_active_widths_buffers():
    model = multibit_model()
    mb.set_bits(model, 4)
    model = copy.deepcopy(model.double()).train()  # _apply converts the aliases apart; the pre-hook re-selects
    with torch.no_grad():
        model(torch.randn(8, 3, 6, 6, dtype=torch.float64))
    for bn in batchnorms(model):
        assert bn.num_batches_tracked_4b == 1 and bn.running_mean_4b.dtype == torch.float64
        assert bn.running_mean_4b.abs().sum() > 0 and bn.running_mean_8b.abs().sum() == 0


@pytest.mark.parametrize("width", mb.WIDTHS)
def test_packed_export_holds_the_widths_statistics_and_reproduces_the_model(width, tmp_path):
    model = train_at_every_width(multibit_model())
    mb.set_bits(model, width)
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
        packed = qat.export.pack_model(model)
        assert mb.per_width_batchnorms(model)  # the model itself keeps every width
        path = qat.export.save_packed(packed, tmp_path / "m.safetensors", architecture=False)
        tensors, _ = qat.export.read_packed(path)
        assert not any("_8b" in key or "_1b" in key for key in tensors)
        loaded = qat.export.load_packed(path, model=float_model()).eval()
        got = loaded(x)
    # multi-bit layers take float inputs, so no BatchNorm is folded: the file holds each as it is
    assert torch.equal(got, expected)
    for index in (1, 4, 8):
        for statistic, tensor in zip(STATISTICS, width_statistics(model[index], width), strict=True):
            assert torch.equal(tensors[f"{index}.{statistic}"], tensor)


def test_private_affine_parameters_are_trained_by_their_width_only():
    model = multibit_model(affine=True).train()
    initial = {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)}
    mb.set_bits(model, 2)
    F.cross_entropy(model(torch.randn(16, 3, 6, 6)), torch.randint(0, 4, (16,))).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # one step: what changes is what the 2-bit loss reaches
    for name, p in model.named_parameters(remove_duplicate=False):
        private = name.split(".")[-1].split("_")
        moved = not torch.equal(p, initial[name])
        if len(private) == 2:  # weight_<w> / bias_<w> of a BatchNorm
            assert moved == (private[1] == "2b"), name
        else:
            assert moved, name  # the shared weights and the active width's gamma / beta (named weight / bias)
    for bn in batchnorms(model):
        assert bn.weight is bn.weight_2b and bn.bias is bn.bias_2b
        with mb.bits(model, 8):
            assert bn.weight is bn.weight_8b
    assert len(list(model.parameters())) == len(set(map(id, model.parameters())))  # each once


def test_private_affine_state_dict_round_trip_and_export(tmp_path):
    model = train_at_every_width(multibit_model(affine=True))
    with torch.no_grad():
        for bn in batchnorms(model):  # every width's gamma / beta its own
            for index, label in enumerate(LABELS.values()):
                getattr(bn, f"weight_{label}").add_(0.1 * (index + 1))
                getattr(bn, f"bias_{label}").sub_(0.05 * (index + 1))
    mb.set_bits(model, "ternary")
    state = model.state_dict()
    assert {f"1.{name}_{label}" for name in ("weight", "bias") for label in LABELS.values()} <= set(state)
    assert "1.weight" not in state and "1.bias" not in state  # saved once, under the width's name
    assert mb.stored_batchnorm_mode(state) == "per_width_affine"
    fresh = multibit_model(affine=True)
    mb.set_bits(fresh, 4)
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    x = torch.randn(4, 3, 6, 6)
    outputs = {}
    for width in mb.WIDTHS:
        with mb.bits(fresh, width), mb.bits(model, width), torch.no_grad():
            outputs[width] = model(x)
            assert torch.equal(fresh(x), outputs[width])
    assert not torch.allclose(outputs[8], outputs[4])
    mb.set_bits(model, 1)
    with torch.no_grad():
        packed = qat.export.pack_model(model)
        path = qat.export.save_packed(packed, tmp_path / "m.safetensors", architecture=False)
        tensors, _ = qat.export.read_packed(path)
        assert not any(key.endswith(("_8b", "_1b")) for key in tensors)
        assert torch.equal(tensors["1.bias"], model[1].bias_1b)
        assert torch.equal(qat.export.load_packed(path, model=float_model()).eval()(x), outputs[1])


def test_per_width_batchnorm_needs_a_multibit_model():
    with pytest.raises(ValueError, match="no multi-bit layers|expected one active"):
        mb.per_width_batchnorm(float_model())


# ------------------------------------------------------------------ BatchNorm calibration

def calibration_model(per_width: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = qat.quantize_model(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                                             nn.Linear(8, 5), nn.BatchNorm1d(5)),
                               {"method": "multibit", "keep_fp": []})
    if per_width:
        mb.per_width_batchnorm(model)
    train_at_width_batches(model)
    return model


def train_at_width_batches(model):
    """Move every width's running statistics away from their initial values (as training would)."""
    model.train()
    with torch.no_grad():
        for width in mb.WIDTHS:
            mb.set_bits(model, width)
            model(torch.randn(7, 6) * 3 - 1)
    mb.set_bits(model, 8)


def calibration_batches():
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(9, 6, generator=generator) * 2 + 0.5 for _ in range(4)]


def by_hand(model, batches, width):
    """The cumulative averages of the batch means and unbiased variances at both BatchNorms, in
    float64: mu = (1/N) sum_k mean_k, sigma = (1/N) sum_k var_k (dropout off, BN on batch statistics)."""
    first, bn1, _, _, second, bn2 = model

    def weight(layer):
        code, scale = layer.weight_quantizer.codes(layer.weight.detach(), width)
        return (code.double() * scale.double().reshape(-1, 1)) if scale.numel() > 1 else code.double() * scale.double()

    sums = {1: [0, 0], 2: [0, 0]}
    for x in batches:
        z1 = x.double() @ weight(first).T + first.bias.detach().double()
        sums[1][0] = sums[1][0] + z1.mean(0)
        sums[1][1] = sums[1][1] + z1.var(0, unbiased=True)
        h = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + bn1.eps)
        h = torch.relu(h * bn1.weight.detach().double() + bn1.bias.detach().double())
        z2 = h @ weight(second).T + second.bias.detach().double()
        sums[2][0] = sums[2][0] + z2.mean(0)
        sums[2][1] = sums[2][1] + z2.var(0, unbiased=True)
    return {k: (mean / len(batches), var / len(batches)) for k, (mean, var) in sums.items()}


def test_calibration_is_the_float64_cumulative_average_per_width_and_changes_nothing_else():
    model = calibration_model()
    before = copy.deepcopy(model.state_dict())
    model.train()  # its flags must come back as they were
    widths = [8, "ternary", 1]
    batches = calibration_batches()
    assert mb.calibrate_batchnorm(model, batches, widths) == len(batches)
    after = model.state_dict()
    statistics = [key for key in after if key.rsplit(".", 1)[1].startswith(STATISTICS)]
    assert all(torch.equal(before[key], after[key]) for key in after if key not in statistics)  # weights, gamma, beta
    for width in widths:
        expected = by_hand(model, batches, width)
        for index, bn in ((1, model[1]), (2, model[5])):
            mean, var, count = width_statistics(bn, width)
            assert torch.allclose(mean.double(), expected[index][0], rtol=1e-5, atol=1e-6)
            assert torch.allclose(var.double(), expected[index][1], rtol=1e-5, atol=1e-6)
            assert int(count) == len(batches)
    for width in (4, 2):  # not calibrated: kept as trained
        assert all(torch.equal(before[f"1.{s}_{LABELS[width]}"], after[f"1.{s}_{LABELS[width]}"]) for s in STATISTICS)
    assert not torch.allclose(width_statistics(model[5], 8)[1], width_statistics(model[5], 1)[1], rtol=1e-2)
    assert not torch.allclose(width_statistics(model[5], "ternary")[0], width_statistics(model[5], 1)[0], rtol=1e-2)
    assert all(m.training for m in model.modules()) and model[1].momentum == 0.1 and mb.active_width(model) == 8


def test_calibrating_twice_gives_the_same_statistics_whatever_they_were_before():
    model = calibration_model()
    mb.calibrate_batchnorm(model, calibration_batches(), [4, 1])
    once = copy.deepcopy(model.state_dict())
    train_at_width_batches(model)
    model.eval()
    mb.calibrate_batchnorm(model, calibration_batches(), [4, 1])
    again = model.state_dict()
    calibrated = [key for key in again if key.endswith(("_4b", "_1b"))]
    assert len(calibrated) == 2 * 3 * 2 and all(torch.equal(once[key], again[key]) for key in calibrated)
    assert not any(m.training for m in model.modules())


def test_calibrating_shared_statistics_averages_over_every_width_and_batch():
    model = calibration_model(per_width=False)
    batches = calibration_batches()
    assert mb.calibrate_batchnorm(model, batches, [2, 1]) == len(batches)
    at = {width: by_hand(model, batches, width) for width in (2, 1)}
    assert torch.allclose(model[5].running_mean.double(), (at[2][2][0] + at[1][2][0]) / 2, rtol=1e-5, atol=1e-6)
    assert torch.allclose(model[5].running_var.double(), (at[2][2][1] + at[1][2][1]) / 2, rtol=1e-5, atol=1e-6)
    assert int(model[5].num_batches_tracked) == 2 * len(batches)


def test_calibration_without_batches_is_an_error():
    with pytest.raises(ValueError, match="no batch"):
        mb.calibrate_batchnorm(calibration_model(), [], [8])
