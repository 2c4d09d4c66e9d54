"""The 2:4-sparse ternary quantizer (layers/sparse_ternary.py): the mask keeps the 2 largest of every
4 along the tap-major rows (ties, tails), the output set and TWN's delta/alpha after the mask, the
prune_at schedule, fixed versus dynamic masks across progress, gradients, state dicts, errors."""
import pytest
import torch

import estimators
from kernels.sparse24 import tap_major
from layers import Ternary24Conv2d, Ternary24Linear
from layers.quantizers import TernaryWeight
from layers.sparse_ternary import SparseTernary24Weight, mask24


def quantizer(**options):
    return SparseTernary24Weight(estimators.get("identity"), **options)


def groups_of(t):
    """[O, G, 4] groups of tap_major(t), the tail zero-padded."""
    rows = tap_major(t)
    return torch.nn.functional.pad(rows, (0, -rows.shape[1] % 4)).reshape(rows.shape[0], -1, 4)


@pytest.mark.parametrize("shape", [(6, 8, 3, 3), (5, 3, 3, 3), (7, 13), (4, 4), (3, 1, 5, 5)])
def test_mask_keeps_the_two_largest_of_every_group(shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    m = mask24(w)
    assert m.shape == w.shape and m.dtype == torch.bool
    kept, magnitude = groups_of(m), groups_of(w.abs())
    real = groups_of(torch.ones_like(w)).bool()  # False on the tail's padding
    assert torch.equal(kept.sum(-1), real.sum(-1).clamp(max=2))  # 2 per group, all of a tail of <= 2
    smallest_kept = torch.where(kept, magnitude, torch.inf).amin(-1)
    largest_dropped = torch.where(real & ~kept, magnitude, -1.0).amax(-1)
    assert bool((smallest_kept > largest_dropped).all())


def test_mask_ties_go_to_the_lower_index_and_groups_follow_the_taps():
    assert mask24(torch.ones(2, 10)).tolist() == [[True, True, False, False] * 2 + [True, True]] * 2
    assert mask24(torch.zeros(1, 7)).tolist() == [[True, True, False, False, True, True, False]]
    assert mask24(torch.tensor([[1.0, -3.0, 3.0, 2.0]])).tolist() == [[False, True, True, False]]
    # a conv's groups are 4 input channels of one tap (channels innermost), not 4 taps of a channel
    w = torch.zeros(1, 4, 2, 2)
    w[0, :, 0, 0] = torch.tensor([1.0, 4.0, 3.0, 2.0])
    w[0, 0, :, :] = torch.tensor([[1.0, 9.0], [9.0, 9.0]])
    m = mask24(w)
    assert m[0, :, 0, 0].tolist() == [False, True, True, False]
    assert m[0, :, 1, 1].tolist() == [True, True, False, False]  # the 9 and a tie among zeros


@pytest.mark.parametrize("per_channel", [False, True])
def test_values_and_twns_delta_and_alpha_after_the_mask(per_channel):
    torch.manual_seed(1)
    w = torch.randn(8, 16, 3, 3)
    out = quantizer(per_channel=per_channel)(w)
    m = mask24(w)
    dims = (1, 2, 3) if per_channel else (0, 1, 2, 3)
    kept = (w.abs() * m)
    delta = 0.7 * kept.sum(dims, keepdim=True) / m.sum(dims, keepdim=True)
    t = torch.where(w >= 0, 1.0, -1.0) * (kept > delta)
    alpha = (w.abs() * t.abs()).sum(dims, keepdim=True) / t.abs().sum(dims, keepdim=True)
    torch.testing.assert_close(out, alpha * t, rtol=0, atol=0)
    scales = out.abs().flatten(1).amax(1)
    assert bool((out.abs() == scales.view(-1, 1, 1, 1)).logical_or(out == 0).all())  # {-alpha, 0, alpha}
    assert scales.unique().numel() == (8 if per_channel else 1)
    nonzero = groups_of(out != 0)
    assert int(nonzero.sum(-1).max()) == 2
    assert bool((groups_of(m) | ~nonzero).all())  # the nonzeros are among the 2 largest
    assert 0.25 < float((out == 0).float().mean()) < 0.75


def test_hand_computed_group():
    # one row, two groups: masks keep (4, -3) and (2, 1); delta = 0.7 * 10 / 4 = 1.75 drops the 1
    w = torch.tensor([[0.5, 4.0, -3.0, 0.25, 2.0, 0.0, 1.0, -0.5]])
    out = quantizer()(w)
    alpha = (4.0 + 3.0 + 2.0) / 3
    assert torch.equal(out, torch.tensor([[0.0, alpha, -alpha, 0.0, alpha, 0.0, 0.0, 0.0]]))
    assert torch.equal(quantizer()(torch.zeros(2, 6)), torch.zeros(2, 6))  # no survivors: alpha = 0


def test_before_prune_at_it_is_twn():
    torch.manual_seed(2)
    w = torch.randn(6, 12)
    q = quantizer(prune_at=0.5)
    twn = TernaryWeight(estimators.get("identity"))
    for p in (0.0, 0.49):
        q.set_progress(p)
        assert torch.equal(q(w), twn(w))
        assert int(groups_of(q(w) != 0).sum(-1).max()) > 2  # dense: some group has 3 or 4
    q.set_progress(0.5)
    assert int(groups_of(q(w) != 0).sum(-1).max()) == 2


@pytest.mark.parametrize("mode", ["dynamic", "fixed"])
def test_fixed_mask_freezes_at_prune_at_and_dynamic_follows_the_weights(mode):
    torch.manual_seed(3)
    layer = Ternary24Linear(16, 4, bias=False, mask=mode, prune_at=0.5)
    q = layer.weight_quantizer
    layer.set_progress(0.25)
    assert q.frozen_mask.numel() == 0 and not q.pruned
    layer.set_progress(0.5)
    mask_at_prune = mask24(layer.weight)
    assert torch.equal(q.current_mask(layer.weight), mask_at_prune)
    assert (q.frozen_mask.numel() > 0) == (mode == "fixed")
    with torch.no_grad():  # training moves the weights: reversed rows reorder the magnitudes
        layer.weight.copy_(-layer.weight.flip(-1))
    layer.set_progress(0.75)
    moved = mask24(layer.weight)
    assert not torch.equal(moved, mask_at_prune)
    expected = mask_at_prune if mode == "fixed" else moved
    assert torch.equal(q.current_mask(layer.weight), expected)
    agreement = float(layer.diagnostics()["mask_agreement"])
    assert agreement == (1.0 if mode == "dynamic" else pytest.approx(float((expected & moved).sum() / expected.sum())))
    assert agreement < 1.0 or mode == "dynamic"
    assert bool(((layer.quantized_weight() != 0) <= expected).all())
    # gradient: fixed masks the pruned weights out, dynamic passes it straight through to all
    layer.weight.grad = None
    layer.quantized_weight().sum().backward()
    grad_nonzero = layer.weight.grad != 0
    assert torch.equal(grad_nonzero, expected if mode == "fixed" else torch.ones_like(expected))


def test_frozen_mask_survives_a_state_dict_round_trip_and_float_weights_load():
    from qat.train.checkpoint import load_model_state

    torch.manual_seed(4)
    conv = Ternary24Conv2d(8, 4, 3, bias=False, mask="fixed", prune_at=0.0)
    conv.set_progress(0.1)
    frozen = conv.weight_quantizer.frozen_mask.clone()
    assert frozen.shape == conv.weight.shape
    fresh = Ternary24Conv2d(8, 4, 3, bias=False, mask="fixed", prune_at=0.0)
    # what a resumed run does: the checkpoint's keys and tensor shapes are the fresh model's
    load_model_state(fresh, conv.state_dict(), "a checkpoint saved after the freeze")
    with torch.no_grad():
        fresh.weight.mul_(torch.rand_like(fresh.weight))  # new magnitudes: a recomputed mask differs
    assert not torch.equal(mask24(fresh.weight), frozen)
    fresh.set_progress(0.9)  # a resumed run does not freeze again
    assert torch.equal(fresh.weight_quantizer.current_mask(fresh.weight), frozen)
    # a float conv's state_dict (what quantize_model copies, or a dense run's weights) loads and
    # leaves the mask to be frozen at the next set_progress
    dense = Ternary24Conv2d(8, 4, 3, bias=False, mask="fixed", prune_at=0.0)
    dense.load_state_dict(torch.nn.Conv2d(8, 4, 3, bias=False).state_dict())
    assert dense.weight_quantizer.frozen_mask.numel() == 0
    dense.set_progress(0.9)
    assert torch.equal(dense.weight_quantizer.frozen_mask, mask24(dense.weight))


def test_layer_forward_uses_the_quantized_weight():
    torch.manual_seed(5)
    conv = Ternary24Conv2d(8, 6, 3, padding=1, bias=True)
    x = torch.randn(2, 8, 5, 5)
    ref = torch.nn.functional.conv2d(x, quantizer()(conv.weight), conv.bias, padding=1)
    assert torch.equal(conv(x), ref)
    assert conv.weight_bits == 2 and conv.weight_quantizer.packed_format == "ternary24"
    assert "mask=dynamic, prune_at=0" in repr(conv)


def test_errors_name_the_valid_values():
    with pytest.raises(ValueError, match="option mask must be one of dynamic, fixed, got 'static'"):
        quantizer(mask="static")
    with pytest.raises(ValueError, match=r"option prune_at must be in \[0, 1\], got 1.5"):
        quantizer(prune_at=1.5)
    with pytest.raises(ValueError, match="unknown option"):
        Ternary24Linear(4, 4, sparsity=0.5)
    with pytest.raises(ValueError, match="training progress must be in"):
        quantizer().set_progress(2.0)
