"""CPU tests of kernels/: packing format, exact binary/ternary matmul, conv, epilogue, errors.

Integers have no tolerance: every product is compared with torch.equal against a float64 / int64
reference built from sign(x) with the project's convention (x >= 0 -> +1, -0.0 -> +1).  Inputs are
random but reproducible: each test's generator is seeded from KERNELS_TEST_SEED (default
DEFAULT_SEED) and the test's id, the seed is printed (pytest shows it under "Captured stdout
setup" of a failing test), recorded in the test's user_properties (JUnit XML) and repeated in the
assertion messages.  Rerun with another KERNELS_TEST_SEED to explore new inputs.  Plus biased and
adversarial cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import cpu_matmul, native

K_VALUES = [1, 7, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 4095, 4096, 4097]
CPU_PATHS = (["popcount"] + (["int_mm"] if cpu_matmul.int_mm_available() else [])
             + (["native"] if native.available() else []))


DEFAULT_SEED = 20240607
SEED_ENV = "KERNELS_TEST_SEED"


def test_seed(base: int, node_id: str) -> int:
    """Per-test seed: a fixed function of the base seed and the test id (stable across runs)."""
    return (base * 1_000_003 + zlib.crc32(node_id.encode())) % 2**63


test_seed.__test__ = False  # a helper, not a test


def seeded_generator(node) -> torch.Generator:
    """The generator of one test (``node``: a pytest item); prints and records its seed."""
    base = int(os.environ.get(SEED_ENV, DEFAULT_SEED))
    seed = test_seed(base, node.nodeid)
    print(f"random inputs: {SEED_ENV}={base} -> generator seed {seed} for {node.nodeid}")
    node.user_properties.append(("seed", seed))
    node.user_properties.append((SEED_ENV, base))
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def gen(request):
    return seeded_generator(request.node)


def test_seed_is_reproducible_printed_and_overridable(monkeypatch, capsys):
    monkeypatch.delenv(SEED_ENV, raising=False)
    node = types.SimpleNamespace(nodeid="tests/x.py::t", user_properties=[])
    first = seeded_generator(node).initial_seed()
    assert seeded_generator(node).initial_seed() == first == test_seed(DEFAULT_SEED, node.nodeid)
    assert ("seed", first) in node.user_properties and (SEED_ENV, DEFAULT_SEED) in node.user_properties
    assert f"generator seed {first}" in capsys.readouterr().out
    monkeypatch.setenv(SEED_ENV, "7")
    assert seeded_generator(node).initial_seed() == test_seed(7, node.nodeid) != first
    other = types.SimpleNamespace(nodeid="tests/x.py::u", user_properties=[])
    assert seeded_generator(other).initial_seed() != test_seed(7, node.nodeid)


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
            hamming = sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(aw[i], bw[j], strict=True))
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
    assert cpu_matmul.choose_cpu_path(1) == ("native" if native.available() else "popcount")
    with pytest.raises(ValueError, match="path must be"):
        cpu_matmul.choose_cpu_path(4, "fast")


# CPUs as the dispatch sees them (flags abridged from real /proc/cpuinfo lines).
AVX2_EPYC = cpu_matmul.CpuInfo("AMD EPYC", "x86_64", frozenset({"fpu", "avx", "avx2", "fma", "popcnt"}), "AVX2")
ZEN4_VNNI = cpu_matmul.CpuInfo(
    "AMD EPYC 9R14", "x86_64", frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni", "popcnt"}), "AVX512"
)
ALDER_LAKE = cpu_matmul.CpuInfo("12th Gen Intel Core i7-12700", "x86_64", frozenset({"avx2", "avx_vnni"}), "AVX2")
SKYLAKE_X = cpu_matmul.CpuInfo("Intel Xeon Gold 6148", "x86_64", frozenset({"avx2", "avx512f", "avx512bw"}), "AVX512")
GRAVITON = cpu_matmul.CpuInfo("", "aarch64", frozenset({"asimd", "asimddp", "i8mm"}), "DEFAULT")
NO_FLAGS = cpu_matmul.CpuInfo("", "x86_64", frozenset(), "AVX2")


def test_int8_dot_hardware_from_flags():
    assert cpu_matmul.int8_dot_from_features(AVX2_EPYC) is False
    assert cpu_matmul.int8_dot_from_features(SKYLAKE_X) is False  # AVX-512 without VNNI
    assert cpu_matmul.int8_dot_from_features(ZEN4_VNNI) is True
    assert cpu_matmul.int8_dot_from_features(ALDER_LAKE) is True
    assert cpu_matmul.int8_dot_from_features(GRAVITON) is None  # not x86: calibrate
    assert cpu_matmul.int8_dot_from_features(NO_FLAGS) is None


def test_decide_cpu_path_is_a_pure_function_of_its_inputs():
    rows = cpu_matmul.INT_MM_MIN_ROWS
    for m in (1, rows - 1, rows, 64, 4096):
        for works in (False, True):
            for fast in (False, True):
                want = "int_mm" if works and fast and m >= rows else "popcount"
                assert cpu_matmul.decide_cpu_path(m, int_mm_works=works, int_mm_is_fast=fast) == want


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """The NumPy paths' choice, as where the native engine is unavailable (no compiler)."""
    monkeypatch.setattr(native, "available", lambda: False)
    cpu_matmul.int_mm_fast.cache_clear()
    yield
    cpu_matmul.int_mm_fast.cache_clear()


@pytest.mark.parametrize(
    "info,fast", [(AVX2_EPYC, False), (SKYLAKE_X, False), (ZEN4_VNNI, True), (ALDER_LAKE, True)]
)
def test_auto_choice_follows_the_cpu_flags(info, fast, monkeypatch, fresh_dispatch):
    def no_calibration(*args, **kwargs):
        raise AssertionError("flags are conclusive: no calibration")

    monkeypatch.setattr(cpu_matmul, "cpu_info", lambda: info)
    monkeypatch.setattr(cpu_matmul, "calibrate_int_mm", no_calibration)
    monkeypatch.setattr(cpu_matmul, "int_mm_available", lambda: True)
    assert cpu_matmul.choose_cpu_path(64) == ("int_mm" if fast else "popcount")
    assert cpu_matmul.choose_cpu_path(cpu_matmul.INT_MM_MIN_ROWS - 1) == "popcount"
    monkeypatch.setattr(cpu_matmul, "int_mm_available", lambda: False)
    assert cpu_matmul.choose_cpu_path(64) == "popcount"


@pytest.mark.parametrize("calibrated", [False, True])
def test_auto_choice_calibrates_once_where_flags_say_nothing(calibrated, monkeypatch, fresh_dispatch):
    calls = []
    monkeypatch.setattr(cpu_matmul, "cpu_info", lambda: GRAVITON)
    monkeypatch.setattr(cpu_matmul, "calibrate_int_mm", lambda: calls.append(1) or calibrated)
    monkeypatch.setattr(cpu_matmul, "int_mm_available", lambda: True)
    for m in (16, 64, 256):
        assert cpu_matmul.choose_cpu_path(m) == ("int_mm" if calibrated else "popcount")
    assert len(calls) == 1


def test_this_machine_never_auto_picks_int_mm_without_int8_dot_hardware(fresh_dispatch):
    if cpu_matmul.int8_dot_from_features(cpu_matmul.cpu_info()) is False:
        assert cpu_matmul.choose_cpu_path(4096) == "popcount"
    assert cpu_matmul.cpu_info().describe()  # what benchmarks/kernels.py prints


def test_calibration_times_both_routes_and_prefers_popcount_unless_int_mm_clearly_wins(monkeypatch):
    fake_clock = iter(range(10**6))
    monkeypatch.setattr(cpu_matmul.time, "perf_counter", lambda: next(fake_clock))  # every call costs 1
    monkeypatch.setattr(cpu_matmul, "int_mm_available", lambda: True)
    assert cpu_matmul.calibrate_int_mm(shape=(16, 8, 100), rounds=2) is False  # a tie keeps popcount
    assert cpu_matmul.calibrate_int_mm(shape=(16, 8, 100), rounds=2, margin=0.5) is True
    monkeypatch.setattr(cpu_matmul, "int_mm_available", lambda: False)
    assert cpu_matmul.calibrate_int_mm(shape=(16, 8, 100), rounds=2, margin=0.5) is False


def test_parse_cpuinfo_x86_and_arm():
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 popcnt\n\n" \
          "processor\t: 1\nmodel name\t: other\nflags\t\t: avx512_vnni\n"
    assert cpu_matmul.parse_cpuinfo(x86) == ("AMD EPYC", frozenset({"fpu", "avx2", "popcnt"}))
    arm = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd asimddp i8mm\nCPU part\t: 0xd40\n"
    assert cpu_matmul.parse_cpuinfo(arm) == ("", frozenset({"fp", "asimd", "asimddp", "i8mm"}))
    assert cpu_matmul.parse_cpuinfo("") == ("", frozenset())


@pytest.mark.skipif(not cpu_matmul.int_mm_available(), reason="torch._int_mm is not usable on CPU here")
@pytest.mark.parametrize("m,n,k", [(1, 5, 1), (16, 33, 65), (17, 64, 640), (40, 7, 1000)])
def test_both_cpu_paths_give_identical_integers(m, n, k, gen):
    a, b = random_pm1((m, k), gen), random_pm1((n, k), gen)
    a_bits, b_bits = kernels.pack_bits(a), kernels.pack_bits(b)
    pop = kernels.binary_matmul(a_bits, b_bits, k, path="popcount")
    assert torch.equal(pop, kernels.binary_matmul(a_bits, b_bits, k, path="int_mm")), gen.initial_seed()
    ta = torch.randint(-1, 2, (m, k), generator=gen).float()
    tb = torch.randint(-1, 2, (n, k), generator=gen).float()
    pa, pb = kernels.pack_ternary(ta), kernels.pack_ternary(tb)
    tern = kernels.ternary_matmul(pa, pb, k, path="popcount")
    assert torch.equal(tern, kernels.ternary_matmul(pa, pb, k, path="int_mm")), gen.initial_seed()


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


def test_epilogue_accepts_parameters_that_require_grad(gen):
    n = 5
    acc = torch.randint(-50, 50, (3, n), generator=gen, dtype=torch.int32)
    plain = [torch.rand(n, generator=gen) + 0.5 for _ in range(6)]  # scale, bias, mean, var, gamma, beta
    params = [torch.nn.Parameter(t.clone()) for t in plain]

    def call(ts, **kw):
        scale, bias, mean, var, gamma, beta = ts
        return kernels.epilogue(acc, scale=scale, bias=bias, bn=(mean, var, gamma, beta, 1e-5), **kw)

    for sign_pack in (False, True):
        y = call(params, sign_pack=sign_pack)
        assert not y.requires_grad and torch.equal(y, call(plain, sign_pack=sign_pack))
    # What the CUDA path hands to DLPack (which refuses tensors that require grad):
    mul, add = kernels.fold_bn(n, scale=params[0], bias=params[1], bn=(*params[2:], 1e-5))
    assert not mul.requires_grad and not add.requires_grad
    mul, add = kernels.fold_bn(n, scale=params[0], bias=params[1])
    assert not mul.requires_grad and not add.requires_grad


@pytest.mark.parametrize(
    "mul,add",
    [([1.0, float("nan")], [0.0, 0.0]), ([1.0, 2.0], [float("nan"), 0.0]),
     ([float("inf"), 1.0], [0.0, 0.0]), ([1.0, 1.0], [0.0, float("-inf")])],
)
def test_sign_pack_rejects_non_finite_parameters_before_any_device_path(mul, add, monkeypatch):
    epi = sys.modules["kernels.epilogue"]  # the module (kernels.epilogue is also the function's name)

    mul, add = torch.tensor(mul, dtype=torch.float64), torch.tensor(add, dtype=torch.float64)
    bad = int((~torch.isfinite(mul) | ~torch.isfinite(add)).nonzero()[0, 0])
    with pytest.raises(ValueError, match=f"finite.*channel {bad}"):
        epi.check_sign_pack_params(mul, add)
    acc = torch.zeros(2, 2, dtype=torch.int32)  # 0 * inf = NaN: the case that was +1 on CUDA
    with pytest.raises(ValueError, match="finite"):
        kernels.epilogue(acc, mul_add=(mul, add), sign_pack=True)

    def unreachable(*args):
        raise AssertionError("the decision must come before the CPU / CUDA branch")

    monkeypatch.setattr(epi, "_epilogue_cpu", unreachable)
    monkeypatch.setattr(epi, "_epilogue_cuda", unreachable)
    with pytest.raises(ValueError, match="finite"):
        kernels.epilogue(acc, mul_add=(mul, add), sign_pack=True)


def test_sign_pack_nan_from_bn_is_a_clear_error_and_float_output_stays_ieee():
    acc = torch.tensor([[1, -2, 0]], dtype=torch.int32)
    nan = float("nan")
    with pytest.raises(ValueError, match="channel 1"):
        kernels.epilogue(acc, bn=([0.0, nan, 0.0], 1.0, 1.0, 0.0, 1e-5), sign_pack=True)
    y = kernels.epilogue(acc, mul_add=([1.0, nan, float("inf")], 0.0))
    assert y[0, 0] == 1.0 and y[0, 1].isnan() and y[0, 2].isnan()  # 0 * inf = NaN, as IEEE says
    assert torch.equal(kernels.epilogue(acc, mul_add=([1.0, 2.0, 3.0], 0.5), sign_pack=True), torch.tensor([[2]]))


def test_epilogue_float_path_keeps_subnormals():
    acc = torch.tensor([[3, -7, 1]], dtype=torch.int32)
    mul = torch.tensor([1e-40, 1e-41, 2e-45], dtype=torch.float64)  # float32 subnormals
    y = kernels.epilogue(acc, mul_add=(mul, 0.0))
    expected = acc.float() * mul.float()
    assert torch.equal(y, expected) and (y != 0).all() and (y.abs() < torch.finfo(torch.float32).tiny).all()


# --------------------------------------------------------------------------- CUDA host side (no GPU)


def test_tile_grid_puts_m_on_x_for_huge_m():
    from kernels import cuda_matmul, cuda_runtime

    limit = cuda_runtime.GRID_LIMITS
    m = 65535 * 128 + 1  # one more row than gridDim.y could hold as 128-row tiles
    assert cuda_matmul.tile_grid(m, 64) == (65536, 1)
    assert cuda_runtime.check_grid(cuda_matmul.tile_grid(m, 64)) == (65536, 1)
    with pytest.raises(ValueError, match="gridDim.y|dimension y"):
        cuda_runtime.check_grid((1, 65536))  # the old layout (N tiles, M tiles) for this M
    conv_m = 512 * 128 * 128  # binary conv, batch 512 of 128 x 128 output maps
    assert cuda_matmul.tile_grid(conv_m, 256) == (conv_m // 128, 2)
    big = cuda_runtime.INT32_MAX - 128
    gx, gy = cuda_runtime.check_grid(cuda_matmul.tile_grid(big, 65535 * 128))
    assert gx == -(-big // 128) <= limit[0] and gy == 65535
    with pytest.raises(ValueError, match="gridDim.y"):
        cuda_matmul.tile_grid(10, 65535 * 128 + 1)
    with pytest.raises(ValueError, match="int32"):
        cuda_matmul.tile_grid(big + 1, 1)
    for m, n in [(1, 1), (128, 128), (129, 1), (1, 129), (300, 129)]:
        assert cuda_matmul.tile_grid(m, n) == (-(-m // 128), -(-n // 128))


def test_check_grid_limits():
    from kernels import cuda_runtime

    assert cuda_runtime.check_grid([3]) == (3,)
    assert cuda_runtime.check_grid((2**31 - 1, 65535, 65535)) == (2**31 - 1, 65535, 65535)
    for bad in [(0,), (2**31,), (1, 65536), (1, 1, 65536), (), (1, 1, 1, 1)]:
        with pytest.raises(ValueError):
            cuda_runtime.check_grid(bad)


@pytest.fixture
def fake_launch(monkeypatch):
    """Record cuda_runtime.launch calls of cuda_matmul instead of running them (no GPU needed)."""
    from kernels import cuda_matmul, cuda_runtime

    calls = []
    monkeypatch.setattr(cuda_runtime, "launch", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(cuda_runtime, "device_sm_count", lambda device: 132)
    return cuda_matmul, calls


def test_gemm_launches_use_tile_grid(fake_launch):
    cuda_matmul, calls = fake_launch
    a, b = torch.zeros(300, 3, dtype=torch.int64), torch.zeros(129, 3, dtype=torch.int64)
    out = torch.empty(300, 129, dtype=torch.int32)
    cuda_matmul._gemm((a,), (b,), 150, out)
    cuda_matmul._gemm_tc(a, b, 150, out)
    grids = [args[3] for args, _ in calls if args[1] in ("packed_gemm<1>", "packed_gemm_tc")]
    assert grids == [(3, 2), (3, 2)]


def test_gemv_vector_width_checks_alignment(fake_launch):
    cuda_matmul, calls = fake_launch
    base = torch.zeros(1 + 40 * 4, dtype=torch.int64)
    assert base.data_ptr() % 16 == 0, "torch's CPU allocator aligns to 64 bytes"
    aligned, offset = base[:160].view(40, 4), base[1:].view(40, 4)
    assert offset.is_contiguous() and offset.data_ptr() % 16 == 8
    assert cuda_matmul.gemv_vector_words(4, aligned.data_ptr()) == 2
    assert cuda_matmul.gemv_vector_words(4, offset.data_ptr()) == 1
    assert cuda_matmul.gemv_vector_words(4, aligned.data_ptr(), offset.data_ptr()) == 1  # every plane
    assert cuda_matmul.gemv_vector_words(3, aligned.data_ptr()) == 1  # odd W: rows alternate
    assert cuda_matmul.gemv_vector_words(4, 0x7F0000001000, 0x7F0000002010) == 2
    a = torch.zeros(5, 4, dtype=torch.int64)
    out = torch.empty(5, 40, dtype=torch.int32)
    for b, vec in ((aligned, 2), (offset, 1)):
        calls.clear()
        cuda_matmul._gemv((a,), (b,), 256, out)
        assert calls[0][0][1] == f"packed_gemv<1, 8, {vec}>"
    calls.clear()
    cuda_matmul._gemv((a, a), (aligned, offset), 256, out)  # ternary: the sign and nonzero planes
    assert calls[0][0][1] == "packed_gemv<2, 8, 1>"


def test_kernel_arguments_are_checked_before_the_driver_sees_them():
    from kernels import cuda_runtime

    with pytest.raises(ValueError, match="int32"):
        cuda_runtime._arg(2**31)
    assert cuda_runtime._arg(2**31 - 1) == 2**31 - 1
    misaligned = torch.frombuffer(bytearray(48), dtype=torch.int64, offset=4, count=4)
    with pytest.raises(ValueError, match="element-aligned"):
        cuda_runtime._arg(misaligned)
    with pytest.raises(ValueError, match="require grad"):
        cuda_runtime._arg(torch.zeros(2, requires_grad=True))


class _FakeCupy:
    """Enough of CuPy to see on which device every device-specific call happens."""

    def __init__(self):
        self.current = 0
        self.events = []
        fake = self

        class Device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                self.saved, fake.current = fake.current, self.index

            def __exit__(self, *exc):
                fake.current = self.saved

        class Function:
            def __init__(self, name):
                self.name = name

            @property
            def max_dynamic_shared_size_bytes(self):
                return 0

            @max_dynamic_shared_size_bytes.setter
            def max_dynamic_shared_size_bytes(self, value):
                fake.events.append(("set_shared", fake.current, value))

            def __call__(self, grid, block, args, shared_mem=0):
                fake.events.append(("launch", fake.current, grid))

        class RawModule:
            def __init__(self, code, options, name_expressions):
                fake.events.append(("module", fake.current, code, options))

            def compile(self):
                fake.events.append(("compile", fake.current))

            def get_function(self, name):
                fake.events.append(("load", fake.current))
                return Function(name)

        self.cuda = types.SimpleNamespace(Device=Device)
        self.RawModule = RawModule

    def from_dlpack(self, t):
        return t


def test_module_load_shared_memory_and_launch_happen_on_the_tensors_device(monkeypatch):
    import contextlib

    from kernels import cuda_runtime, sources

    fake = _FakeCupy()
    monkeypatch.setattr(cuda_runtime, "cupy", lambda: fake)
    monkeypatch.setattr(cuda_runtime, "_torch_stream", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(cuda_runtime, "_modules", {})
    monkeypatch.setattr(cuda_runtime, "_functions", {})
    monkeypatch.setattr(cuda_runtime, "_shared_set", {})
    name = "packed_gemv<1, 16, 2>"
    for _ in range(2):
        cuda_runtime.launch("binary_gemv.cu", name, 1, (4,), (256,), (3, 4), shared_mem=100 * 1024)
    assert fake.current == 0, "the caller's current device is restored"
    kinds = [e[0] for e in fake.events]
    assert kinds == ["module", "compile", "load", "set_shared", "launch", "launch"]
    assert all(e[1] == 1 for e in fake.events), fake.events  # every step on device 1, not device 0
    _, _, code, options = fake.events[0]
    assert options == sources.COMPILE_OPTIONS and "-ftz=false" in options
    assert code == sources.read_source("binary_gemv.cu") and '#include "bitops.cuh"' not in code
    fake.events.clear()
    cuda_runtime.get_kernel("binary_gemm.cu", "packed_gemm<2>", 3)  # direct use, also on its device
    assert [e[:2] for e in fake.events] == [("module", 3), ("compile", 3), ("load", 3)]


def test_compile_options_ask_for_ieee_float():
    from kernels import sources

    opts = sources.COMPILE_OPTIONS
    for flag in ("-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=false"):
        assert flag in opts
    assert sources.cupy_effective_options()[-1] == "-ftz=true"  # why epilogue.cu also uses PTX


def test_header_text_is_part_of_every_source_and_changes_it(tmp_path, monkeypatch):
    from kernels import sources

    for f in list(sources.SOURCE_DIR.glob("*.cu")) + list(sources.SOURCE_DIR.glob("*.cuh")):
        (tmp_path / f.name).write_text(f.read_text())
    monkeypatch.setattr(sources, "SOURCE_DIR", tmp_path)
    header = (tmp_path / "bitops.cuh").read_text()
    before = {name: sources.read_source(name) for name in sources.KERNEL_SOURCES}
    for text in before.values():
        assert "#include" not in text and "struct WordDot<1>" in text and text.count("struct WordDot<2>") == 1
        assert "#pragma once" not in text
    (tmp_path / "bitops.cuh").write_text(header.replace("return __popcll(a_s ^ b_s);", "return 0;"))
    for name in sources.KERNEL_SOURCES:
        after = sources.read_source(name)
        assert after != before[name] and "return 0;" in after  # a new CuPy cache key
    (tmp_path / "bitops.cuh").unlink()
    with pytest.raises(ValueError, match="bitops.cuh"):
        sources.read_source("binary_gemv.cu")


# --------------------------------------------------------------------------- benchmark report


def test_benchmark_results_section_replaced_and_others_kept(tmp_path, monkeypatch):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks", "kernels.py")
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Training\nkeep me\n\n## Kernels\nold numbers\n\n## Other\nkeep too\n")
    monkeypatch.setattr(bench, "RESULTS", results)
    bench.write_results(
        "python benchmarks/kernels.py", ["| cpu |"], ["GPU: x"], ["e2e"], "before", "after", cpu_model="CPU: model"
    )
    text = results.read_text()
    assert "CPU: model" in text and bench.cpu_line().startswith("CPU: ")
    assert "keep me" in text and "keep too" in text and "old numbers" not in text
    assert text.count("## Kernels") == 1 and "| cpu |" in text and "not yet measured" in text
    assert text.index("## Training") < text.index("## Kernels") < text.index("## Other")


@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (7, 64, 3, 3), (4, 65, 1, 1), (3, 130, 2, 3), (2, 1, 5, 5)])
def test_repack_conv_weight_equals_pack_conv_weight(shape, gen):
    """The packed layers build the per-tap layout from their flat bits, never from floats."""
    w = torch.randn(*shape, generator=gen)
    flat = kernels.pack_bits(w.flatten(1))
    assert torch.equal(kernels.repack_conv_weight(flat, shape[1], shape[2:]), kernels.pack_conv_weight(w))
