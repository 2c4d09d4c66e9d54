"""CPU tests of kernels/: packing format, exact binary/ternary matmul, conv, epilogue, errors.

Integers have no tolerance: every product is compared with torch.equal against a float64 / int64
reference built from sign(x) with the project's convention (x >= 0 -> +1, -0.0 -> +1).  Inputs are
fresh random per run (the seed is in every failure message), plus biased and adversarial cases.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import cpu_matmul

K_VALUES = [1, 7, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 4095, 4096, 4097]
CPU_PATHS = ["popcount"] + (["int_mm"] if cpu_matmul.int_mm_available() else [])


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    return g


def sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).double()


def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (sign(a) @ sign(b).T).long()


def random_pm1(shape, gen, p_neg=0.5):
    """+-1 float tensor with P(-1) = p_neg, with some exact 0.0 and -0.0 mixed in as +1 values."""
    x = torch.where(torch.rand(shape, generator=gen) < p_neg, -1.0, 1.0)
    x = x * torch.rand(shape, generator=gen).add(0.5)  # magnitudes vary, signs kept
    zeros = torch.rand(shape, generator=gen) < 0.05
    return torch.where(zeros & (x > 0), torch.zeros_like(x), torch.where(zeros, -torch.zeros_like(x), x))


# --------------------------------------------------------------------------- packing format


def test_bit_layout_is_little_endian_with_bit1_negative():
    x = torch.ones(2, 130)
    x[0, 0] = -1.0  # word 0, bit 0
    x[0, 63] = -2.0  # word 0, bit 63: the int64 sign bit
    x[1, 64] = -0.5  # word 1, bit 0
    x[1, 129] = -3.0  # word 2, bit 1
    bits = kernels.pack_bits(x)
    assert bits.dtype == torch.int64 and bits.shape == (2, 3)
    words = bits.numpy().view(np.uint64)
    assert words[0, 0] == (1 | (1 << 63)) and words[0, 1] == 0 and words[0, 2] == 0
    assert words[1, 0] == 0 and words[1, 1] == 1 and words[1, 2] == 2


def test_zero_and_negative_zero_pack_as_plus_one():
    x = torch.tensor([[0.0, -0.0, 1e-30, -1e-30, float("inf"), float("-inf")]])
    assert torch.equal(kernels.unpack_bits(kernels.pack_bits(x), 6), torch.tensor([[1.0, 1, 1, -1, 1, -1]]))


def test_nan_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        kernels.pack_bits(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("k", [1, 63, 64, 65, 1000])
def test_roundtrip_pad_bits_and_size(k, gen):
    x = torch.randn(5, k, generator=gen)
    x[0, 0], x[-1, -1] = 0.0, -0.0
    bits = kernels.pack_bits(x)
    assert torch.equal(kernels.unpack_bits(bits, k), sign(x).float()), gen.initial_seed()
    words = bits.numpy().view(np.uint64)
    if k % 64:
        pad_mask = np.uint64(~((1 << (k % 64)) - 1) & (2**64 - 1))
        assert not (words[:, -1] & pad_mask).any(), "pad bits must be zero"
    assert bits.numel() * bits.element_size() == 5 * -(-k // 64) * 8 == kernels.packed_nbytes(5, k)


def test_memory_ratio_exactly_one_32nd_and_ternary_one_16th(gen):
    w = torch.randn(128, 4096, generator=gen)
    bits = kernels.pack_bits(w)
    assert bits.numel() * 8 * 32 == w.numel() * 4
    s, m = kernels.pack_ternary(torch.randint(-1, 2, (128, 4096), generator=gen).float())
    assert (s.numel() + m.numel()) * 8 * 16 == w.numel() * 4


def test_non_contiguous_and_transposed_inputs(gen):
    x = torch.randn(70, 9, generator=gen)
    xt = x.T  # [9, 70], non-contiguous
    assert torch.equal(kernels.pack_bits(xt), kernels.pack_bits(xt.contiguous()))
    sliced = torch.randn(6, 200, generator=gen)[:, ::2]
    assert torch.equal(kernels.unpack_bits(kernels.pack_bits(sliced), 100), sign(sliced).float())


def test_batched_leading_dims(gen):
    x = torch.randn(2, 3, 4, 77, generator=gen)
    bits = kernels.pack_bits(x)
    assert bits.shape == (2, 3, 4, 2)
    assert torch.equal(kernels.unpack_bits(bits, 77), sign(x).float())


def test_ternary_pack_roundtrip_and_rejects_other_values(gen):
    t = torch.randint(-1, 2, (4, 131), generator=gen).float()
    t[0, 0] = -0.0
    planes = kernels.pack_ternary(t)
    assert torch.equal(kernels.unpack_ternary(planes, 131), t + 0.0)
    sign_plane, nonzero = planes
    assert not bool((sign_plane & ~nonzero).any()), "sign bits only where nonzero"
    with pytest.raises(ValueError, match="-1, 0, \\+1"):
        kernels.pack_ternary(torch.tensor([0.0, 0.5]))


# --------------------------------------------------------------------------- binary matmul


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("k", K_VALUES)
def test_binary_matmul_exact_over_k(k, path, gen):
    m, n = (1, 17) if k > 1000 else (3, 129)
    a, b = random_pm1((m, k), gen), random_pm1((n, k), gen)
    got = kernels.binary_matmul(kernels.pack_bits(a), kernels.pack_bits(b), k, path=path)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got.long(), reference(a, b)), gen.initial_seed()


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (17, 3, 65), (64, 127, 129), (128, 1, 1000), (1, 1000, 257)])
def test_binary_matmul_exact_over_shapes(m, n, k, path, gen):
    a, b = random_pm1((m, k), gen), random_pm1((n, k), gen)
    got = kernels.binary_matmul(kernels.pack_bits(a), kernels.pack_bits(b), k, path=path)
    assert torch.equal(got.long(), reference(a, b)), gen.initial_seed()


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("p_neg", [0.01, 0.99])
def test_binary_matmul_biased_inputs(p_neg, path, gen):
    a, b = random_pm1((9, 1000), gen, p_neg), random_pm1((33, 1000), gen, p_neg)
    got = kernels.binary_matmul(kernels.pack_bits(a), kernels.pack_bits(b), 1000, path=path)
    assert torch.equal(got.long(), reference(a, b)), gen.initial_seed()


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("k", [63, 4097])
def test_binary_matmul_all_plus_and_all_minus_reach_k(k, path):
    plus, minus = torch.ones(2, k), -torch.ones(3, k)
    pp, mm = kernels.pack_bits(plus), kernels.pack_bits(minus)
    assert (kernels.binary_matmul(pp, pp, k, path=path) == k).all()
    assert (kernels.binary_matmul(mm, mm, k, path=path) == k).all()
    assert (kernels.binary_matmul(pp, mm, k, path=path) == -k).all()


def test_identity_with_hamming_on_raw_words(gen):
    k = 200
    a_bits = kernels.pack_bits(torch.randn(4, k, generator=gen))
    b_bits = kernels.pack_bits(torch.randn(5, k, generator=gen))
    got = kernels.binary_matmul(a_bits, b_bits, k)
    aw, bw = a_bits.numpy().view(np.uint64), b_bits.numpy().view(np.uint64)
    for i in range(4):
        for j in range(5):
            hamming = sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(aw[i], bw[j]))
            assert got[i, j] == k - 2 * hamming


def test_many_tiles_and_blocks_match_reference(monkeypatch, gen):
    """Force tiny popcount tiles / int_mm blocks so the tiling and thread pool are exercised."""
    monkeypatch.setattr(cpu_matmul, "TILE_BYTES", 700)
    monkeypatch.setattr(cpu_matmul, "INT_MM_BLOCK_ROWS", 7)
    a, b = random_pm1((11, 300), gen), random_pm1((50, 300), gen)
    for path in CPU_PATHS:
        got = kernels.binary_matmul(kernels.pack_bits(a), kernels.pack_bits(b), 300, path=path)
        assert torch.equal(got.long(), reference(a, b)), (path, gen.initial_seed())
    assert len(cpu_matmul._tiles(11, 50, 5, 1)) > 4


def test_non_contiguous_packed_operands(gen):
    a, b = torch.randn(6, 128, generator=gen), torch.randn(7, 128, generator=gen)
    a_bits, b_bits = kernels.pack_bits(a), kernels.pack_bits(b)
    b_view = b_bits.T.contiguous().T
    assert not b_view.is_contiguous()
    assert torch.equal(kernels.binary_matmul(a_bits, b_view, 128).long(), reference(a, b))


def test_auto_path_choice():
    assert cpu_matmul.choose_cpu_path(1) == "popcount"
    expected = "int_mm" if cpu_matmul.int_mm_available() else "popcount"
    assert cpu_matmul.choose_cpu_path(cpu_matmul.INT_MM_MIN_ROWS) == expected
    with pytest.raises(ValueError, match="path must be"):
        cpu_matmul.choose_cpu_path(4, "fast")


# --------------------------------------------------------------------------- ternary matmul


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("k", [1, 63, 64, 65, 257, 1000])
def test_ternary_matmul_exact_with_zeros(k, path, gen):
    a = torch.randint(-1, 2, (5, k), generator=gen).float()
    b = torch.randint(-1, 2, (19, k), generator=gen).float()
    a[0] = 0.0  # an all-zero row
    got = kernels.ternary_matmul(kernels.pack_ternary(a), kernels.pack_ternary(b), k, path=path)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), (a.double() @ b.double().T).long()), gen.initial_seed()


def test_ternary_all_nonzero_equals_binary(gen):
    a, b = random_pm1((3, 100), gen), random_pm1((4, 100), gen)
    tern = kernels.ternary_matmul(kernels.pack_ternary(sign(a)), kernels.pack_ternary(sign(b)), 100)
    assert torch.equal(tern, kernels.binary_matmul(kernels.pack_bits(a), kernels.pack_bits(b), 100))


# --------------------------------------------------------------------------- errors


def test_clear_errors():
    a = kernels.pack_bits(torch.randn(2, 100))
    b = kernels.pack_bits(torch.randn(3, 100))
    with pytest.raises(ValueError, match="int64"):
        kernels.binary_matmul(a.float(), b, 100)
    with pytest.raises(ValueError, match="larger than"):
        kernels.binary_matmul(a, b, 129)
    with pytest.raises(ValueError, match="word counts differ"):
        kernels.binary_matmul(a, kernels.pack_bits(torch.randn(3, 200)), 100)
    with pytest.raises(ValueError, match="2-D"):
        kernels.binary_matmul(a[0], b, 100)
    with pytest.raises(ValueError, match="positive int"):
        kernels.binary_matmul(a, b, 0)
    with pytest.raises(ValueError, match="sign_plane|pair"):
        kernels.ternary_matmul(a, (b, b), 100)
    with pytest.raises(ValueError, match="differ"):
        kernels.ternary_matmul((a, a[:1]), (b, b), 100)


def test_import_does_not_need_cupy():
    code = "import sys, kernels; assert 'cupy' not in sys.modules, 'cupy imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_missing_cupy_error_is_clear():
    try:
        import cupy  # noqa: F401
    except ImportError:
        from kernels import cuda_runtime

        with pytest.raises(RuntimeError, match="pip install"):
            cuda_runtime.cupy()
    else:
        pytest.skip("cupy is installed here")


# --------------------------------------------------------------------------- properties


@st.composite
def pm1_vector(draw):
    k = draw(st.integers(min_value=1, max_value=300))
    values = draw(st.lists(st.sampled_from([-1.0, 1.0, 0.0, -0.0]), min_size=k, max_size=k))
    return torch.tensor([values])


@settings(max_examples=40, deadline=None)
@given(pm1_vector())
def test_property_self_and_negated_dot(a):
    k = a.shape[1]
    neg = -sign(a).float()
    bits, neg_bits = kernels.pack_bits(a), kernels.pack_bits(neg)
    assert kernels.binary_matmul(bits, bits, k).item() == k
    assert kernels.binary_matmul(bits, neg_bits, k).item() == -k


@settings(max_examples=40, deadline=None)
@given(pm1_vector(), pm1_vector(), st.integers(min_value=0))
def test_property_one_flip_changes_dot_by_two(a, b, index):
    k = min(a.shape[1], b.shape[1])
    a, b = sign(a[:, :k]).float(), sign(b[:, :k]).float()
    i = index % k
    flipped = a.clone()
    flipped[0, i] = -flipped[0, i]
    before = kernels.binary_matmul(kernels.pack_bits(a), kernels.pack_bits(b), k).item()
    after = kernels.binary_matmul(kernels.pack_bits(flipped), kernels.pack_bits(b), k).item()
    assert after - before == (-2 if a[0, i] == b[0, i] else 2)


# --------------------------------------------------------------------------- convolution

CONV_CASES = [
    # C, O, H, W, kernel, stride, padding, dilation
    (3, 5, 7, 6, 3, 1, 1, 1),
    (70, 4, 9, 9, 3, 2, 1, 1),
    (64, 3, 8, 8, 3, 1, 2, 2),
    (5, 2, 5, 5, 1, 1, 0, 1),
    (130, 7, 6, 7, (3, 2), (1, 2), (1, 0), 1),
    (16, 8, 10, 10, 3, 2, 0, 2),
]


@pytest.mark.parametrize("padding_mode", ["zeros", "ones"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_binary_conv2d_matches_conv2d_of_pm1(case, padding_mode, gen):
    c, o, h, w, k, s, p, d = case
    ks = (k, k) if isinstance(k, int) else k
    x = torch.randn(2, c, h, w, generator=gen)
    x[0, 0, 0, 0] = -0.0
    weight = torch.randn(o, c, *ks, generator=gen)
    got = kernels.binary_conv2d(
        x, kernels.pack_conv_weight(weight), k, stride=s, padding=p, dilation=d, padding_mode=padding_mode
    )
    xs = sign(x)
    pp = (p, p) if isinstance(p, int) else p
    if padding_mode == "ones":
        xs, pp = F.pad(xs, (pp[1], pp[1], pp[0], pp[0]), value=1.0), 0
    ref = F.conv2d(xs, sign(weight), stride=s, padding=pp, dilation=d)
    assert got.dtype == torch.int32 and got.shape == ref.shape
    assert torch.equal(got.long(), ref.long()), (case, gen.initial_seed())


def test_binary_conv2d_zero_and_one_padding_differ_only_at_border(gen):
    x, w = torch.randn(1, 8, 6, 6, generator=gen), torch.randn(4, 8, 3, 3, generator=gen)
    wb = kernels.pack_conv_weight(w)
    zeros = kernels.binary_conv2d(x, wb, 3, padding=1)
    ones = kernels.binary_conv2d(x, wb, 3, padding=1, padding_mode="ones")
    assert torch.equal(zeros[..., 1:-1, 1:-1], ones[..., 1:-1, 1:-1])
    assert not torch.equal(zeros, ones)


def test_binary_conv2d_packed_input_and_errors(gen):
    x, w = torch.randn(2, 66, 5, 5, generator=gen), torch.randn(3, 66, 3, 3, generator=gen)
    wb = kernels.pack_conv_weight(w)
    packed = kernels.pack_activations(x)
    assert packed.shape == (2, 5, 5, 2)
    assert torch.equal(
        kernels.binary_conv2d(packed, wb, 3, in_channels=66, padding=1), kernels.binary_conv2d(x, wb, 3, padding=1)
    )
    with pytest.raises(ValueError, match="in_channels"):
        kernels.binary_conv2d(packed, wb, 3)
    with pytest.raises(ValueError, match="weight_bits"):
        kernels.binary_conv2d(x, wb, 5)
    with pytest.raises(ValueError, match="padding_mode"):
        kernels.binary_conv2d(x, wb, 3, padding_mode="reflect")


# --------------------------------------------------------------------------- epilogue


def test_fold_bn_matches_unfolded_formula(gen):
    n = 6
    acc = torch.randint(-50, 50, (4, n), generator=gen, dtype=torch.int32)
    alpha, bias = torch.rand(n, generator=gen) + 0.1, torch.randn(n, generator=gen)
    mean, var = torch.randn(n, generator=gen), torch.rand(n, generator=gen) + 0.5
    gamma, beta, eps = torch.randn(n, generator=gen), torch.randn(n, generator=gen), 1e-5
    direct = gamma.double() * (alpha.double() * acc.double() + bias.double() - mean.double()) / torch.sqrt(
        var.double() + eps
    ) + beta.double()
    y = kernels.epilogue(acc, scale=alpha, bias=bias, bn=(mean, var, gamma, beta, eps))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), direct, rtol=1e-5, atol=1e-4)


def test_epilogue_sign_pack_tie_rule_and_bit_identity(gen):
    acc = torch.tensor([[3, -3, 0, 7, -2, 5, 4]], dtype=torch.int32).repeat(2, 1)
    acc[1] = -acc[1]
    # channel: positive mul, negative mul, gamma = 0 (y = beta = 0: tie), exact tie at acc*mul = -add,
    # negative mul with tie, mul = 0 with add < 0, positive mul with add > 0
    mul = torch.tensor([1.0, -2.0, 0.0, 0.5, -1.0, 0.0, 0.25], dtype=torch.float64)
    add = torch.tensor([0.0, 0.0, 0.0, -3.5, -2.0, -1.0, 1.0], dtype=torch.float64)
    bits = kernels.epilogue(acc, mul_add=(mul, add), sign_pack=True)
    y = acc.double() * mul + add
    assert (y == 0).any(), "the test must contain exact ties"
    assert torch.equal(bits, kernels.pack_bits(y))
    assert torch.equal(kernels.unpack_bits(bits, 7), torch.where(y >= 0, 1.0, -1.0))
    assert bits.shape == (2, 1)


def test_epilogue_sign_pack_from_bn_with_negative_gamma_and_zero_gamma(gen):
    n = 130
    acc = torch.randint(-100, 100, (3, n), generator=gen, dtype=torch.int32)
    gamma = torch.randn(n, generator=gen)
    gamma[:10] = 0.0
    mean, var, beta = torch.randn(n, generator=gen), torch.rand(n, generator=gen) + 0.1, torch.randn(n, generator=gen)
    beta[:5] = 0.0  # gamma = 0 and beta = 0: y == 0 exactly -> +1
    alpha = torch.rand(n, generator=gen) - 0.5
    bits = kernels.epilogue(acc, scale=alpha, bn=(mean, var, gamma, beta, 1e-3), sign_pack=True)
    mul, add = kernels.fold_bn(n, scale=alpha, bn=(mean, var, gamma, beta, 1e-3))
    assert torch.equal(bits, kernels.pack_bits(acc.double() * mul + add))
    assert bits.shape == (3, 3)
    assert (kernels.unpack_bits(bits, n)[:, :5] == 1).all()


def test_epilogue_errors():
    with pytest.raises(ValueError, match="int32"):
        kernels.epilogue(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        kernels.epilogue(torch.zeros(2, 3, dtype=torch.int32), scale=torch.ones(4))
    with pytest.raises(ValueError, match="not both"):
        kernels.epilogue(torch.zeros(2, 3, dtype=torch.int32), scale=1.0, mul_add=(1.0, 0.0))
    with pytest.raises(ValueError, match="positive"):
        kernels.epilogue(torch.zeros(1, 2, dtype=torch.int32), bn=(0.0, -1.0, 1.0, 0.0, 0.0))


# --------------------------------------------------------------------------- benchmark report


def test_benchmark_results_section_replaced_and_others_kept(tmp_path, monkeypatch):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "kernels.py")
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Training\nkeep me\n\n## Kernels\nold numbers\n\n## Other\nkeep too\n")
    monkeypatch.setattr(bench, "RESULTS", results)
    bench.write_results("python benchmarks/kernels.py", ["| cpu |"], ["GPU: x"], ["e2e"], "before", "after")
    text = results.read_text()
    assert "keep me" in text and "keep too" in text and "old numbers" not in text
    assert text.count("## Kernels") == 1 and "| cpu |" in text and "not yet measured" in text
    assert text.index("## Training") < text.index("## Kernels") < text.index("## Other")
