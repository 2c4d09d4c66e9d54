"""The packed 2:4 ternary format (kernels/sparse24.py): the code table, exact round trips on random,
exhaustive and adversarial tensors (tails, all zeros, every unit value), its size, the two planes
it hands the ternary matmul, and its errors."""
import itertools
import math

import pytest
import torch

import kernels
from kernels import native
from kernels.sparse24 import GROUP_VALUES, from_tap_major, tap_major

TAIL_KS = [1, 2, 3, 4, 5, 7, 11, 12, 13, 63, 64, 65, 100, 129]


def random_24(rows, k, generator, density=0.75):
    """A ternary [rows, k] tensor with at most 2 nonzeros in every group of 4 (tail included):
    2 random positions of each group kept, each nonzero with probability ``density``."""
    groups = math.ceil(k / 4)
    scores = torch.rand(rows, groups, 4, generator=generator)
    kept = torch.zeros(rows, groups, 4, dtype=torch.bool).scatter_(-1, scores.topk(2, dim=-1).indices, True)
    values = torch.randint(0, 2, (rows, groups, 4), generator=generator) * 2 - 1
    nonzero = torch.rand(rows, groups, 4, generator=generator) < density
    t = (values * kept * nonzero).float().reshape(rows, groups * 4)
    return t[:, :k].contiguous()


def test_the_33_codes_are_exactly_the_groups_with_at_most_two_nonzeros():
    table = {tuple(v) for v in GROUP_VALUES.tolist()}
    valid = {g for g in itertools.product((-1, 0, 1), repeat=4) if sum(x != 0 for x in g) <= 2}
    assert len(GROUP_VALUES) == 33 and table == valid  # 1 + 8 + 24 distinct groups
    assert GROUP_VALUES[0].tolist() == [0, 0, 0, 0]
    assert GROUP_VALUES[1 + 2 * 3 + 1].tolist() == [0, 0, 0, -1]  # one nonzero: 1 + 2 i + s
    assert GROUP_VALUES[9 + 4 * 4 + 2 * 0 + 1].tolist() == [0, 1, 0, -1]  # pair (1, 3), signs (+, -)


@pytest.mark.parametrize("k", TAIL_KS)
def test_random_round_trip(k):
    g = torch.Generator().manual_seed(k)
    for density in (0.0, 0.5, 1.0):
        t = random_24(9, k, g, density)
        packed = kernels.pack_ternary24(t)
        assert packed.dtype == torch.uint8 and packed.shape == (9, 2 * math.ceil(math.ceil(k / 4) / 3))
        assert torch.equal(kernels.unpack_ternary24(packed, k), t)
        assert torch.equal(kernels.pack_ternary24(kernels.unpack_ternary24(packed, k)), packed)


def test_every_unit_value_round_trips():
    """All 33^3 16-bit units (every triple of group codes) unpack and pack back to themselves."""
    unit = torch.arange(33 ** 3)
    packed = torch.stack([unit & 0xFF, unit >> 8], dim=-1).to(torch.uint8)
    values = kernels.unpack_ternary24(packed, 12, dtype=torch.int8)
    assert values.shape == (33 ** 3, 12)
    assert int((values.reshape(-1, 3, 4) != 0).sum(-1).max()) <= 2
    assert torch.equal(kernels.pack_ternary24(values), packed)
    assert len({tuple(r) for r in values.tolist()}) == 33 ** 3  # distinct units, distinct values


def test_adversarial_tensors():
    zeros = torch.zeros(3, 13)
    assert torch.equal(kernels.pack_ternary24(zeros), torch.zeros(3, 4, dtype=torch.uint8))
    assert torch.equal(kernels.unpack_ternary24(kernels.pack_ternary24(-zeros), 13), zeros)  # -0.0 is 0
    dense_pairs = torch.tensor([[-1.0, -1.0, 0.0, 0.0] * 3 + [-1.0, -1.0]])  # tail of 2, both nonzero
    assert torch.equal(kernels.unpack_ternary24(kernels.pack_ternary24(dense_pairs), 14), dense_pairs)
    leading = torch.tensor([[[1.0, 0.0, 0.0, 1.0, 0.0]], [[0.0, -1.0, 1.0, 0.0, 1.0]]])  # leading dims kept
    assert torch.equal(kernels.unpack_ternary24(kernels.pack_ternary24(leading), 5), leading)
    assert torch.equal(kernels.unpack_ternary24(kernels.pack_ternary24(leading.to(torch.int8)), 5), leading)


def test_size_is_four_thirds_of_a_bit_per_weight():
    assert kernels.ternary24_nbytes(10, 12 * 7) * 8 / (10 * 12 * 7) == pytest.approx(4 / 3)
    assert kernels.ternary24_nbytes(1, 13) == 4 and kernels.ternary24_nbytes(1, 12) == 2
    t = random_24(64, 576, torch.Generator().manual_seed(0))  # a 3x3 conv over 64 channels
    assert kernels.pack_ternary24(t).numel() * 8 / t.numel() == pytest.approx(4 / 3)
    sign, nonzero = kernels.pack_ternary(t)
    assert (sign.numel() + nonzero.numel()) * 8 / kernels.pack_ternary24(t).numel() == pytest.approx(1.5)


@pytest.mark.parametrize("k", TAIL_KS)
def test_planes_are_pack_ternarys(k):
    t = random_24(5, k, torch.Generator().manual_seed(100 + k))
    sign, nonzero = kernels.unpack_ternary24_planes(kernels.pack_ternary24(t), k)
    ref_sign, ref_nonzero = kernels.pack_ternary(t)
    assert torch.equal(sign, ref_sign) and torch.equal(nonzero, ref_nonzero)


@pytest.mark.parametrize("path", ["popcount"] + (["native"] if native.available() else []))
def test_ternary_matmul_runs_the_unpacked_planes(path):
    """The CPU ternary GEMM on the format's planes gives the exact integer products."""
    g = torch.Generator().manual_seed(7)
    k = 4 * 37 + 3
    w = random_24(23, k, g)
    x = torch.randint(-1, 2, (6, k), generator=g).float()
    planes = kernels.unpack_ternary24_planes(kernels.pack_ternary24(w), k)
    weights = kernels.prepack_ternary(planes, k) if path == "native" else planes
    out = kernels.ternary_matmul(kernels.pack_ternary(x), weights, k, path=path)
    assert torch.equal(out.long(), (x.double() @ w.double().T).long())


def test_tap_major_is_the_native_conv_order():
    w = torch.randn(5, 64, 3, 3)
    rows = tap_major(w)
    assert rows.shape == (5, 9 * 64) and torch.equal(rows[2, 4 * 64 + 7], w[2, 7, 1, 1])
    assert torch.equal(kernels.pack_bits(rows), kernels.pack_conv_weight(w))  # C % 64 == 0: no per-tap pad
    assert torch.equal(from_tap_major(rows, w.shape), w)
    linear = torch.randn(3, 10)
    assert tap_major(linear) is linear and torch.equal(from_tap_major(linear, linear.shape), linear)
    with pytest.raises(ValueError, match="conv .* or linear"):
        tap_major(torch.randn(2, 3, 4))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"group 1 \(elements 4..7\) of row \(1,\) holds \[1, -1, 1, 0\]"):
        kernels.pack_ternary24(torch.tensor([[0.0] * 8, [1, 0, 0, 0, 1, -1, 1, 0]]))
    with pytest.raises(ValueError, match=r"group 0 .* holds \[1, 1, 1, 0\]"):
        kernels.sparse24.group_codes(torch.tensor([1.0, 1.0, 1.0]))  # a tail of 3 is a group too
    with pytest.raises(ValueError, match=r"values in \{-1, 0, \+1\}"):
        kernels.pack_ternary24(torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="33\\^3"):
        kernels.unpack_ternary24(torch.tensor([[0xFF, 0xFF]], dtype=torch.uint8), 12)
    with pytest.raises(ValueError, match="padding must be zero"):
        kernels.unpack_ternary24(kernels.pack_ternary24(torch.tensor([[0.0, 0.0, 0.0, 1.0]])), 3)
    with pytest.raises(ValueError, match="padding must be zero"):
        kernels.unpack_ternary24(kernels.pack_ternary24(torch.tensor([[0.0] * 4 + [1.0]])), 4)
    with pytest.raises(ValueError, match="have 4 bytes"):
        kernels.unpack_ternary24(torch.zeros(2, 2, dtype=torch.uint8), 13)
    with pytest.raises(ValueError, match="uint8"):
        kernels.unpack_ternary24(torch.zeros(2, 2, dtype=torch.int16), 12)
    with pytest.raises(ValueError, match="positive int"):
        kernels.ternary24_nbytes(1, 0)
