"""The int8-activation x ternary/binary-weight kernel of the native engine (BitNet b1.58 inference).

Integers are compared exactly with a torch int64 reference, on every instruction set this machine
runs; the per-token quantization (RMSNorm included) exactly with the training layer's own functions
(``layers.bitnet.rms_norm`` / ``absmax_codes``: one source of truth for its roundings); the fused
layer bit for bit with its three steps done separately in torch (``tests/layers/test_bitnet.py``
compares packed models with the training layers).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
import layers.bitnet
from kernels import cpu_native, native
from layers.bitnet import NORM_EPS, absmax_codes, rms_norm

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")

def ternary(n: int, k: int, gen, zeros: float = 1 / 3) -> torch.Tensor:
    t = torch.randint(0, 2, (n, k), generator=gen).float() * 2 - 1
    return t * (torch.rand(n, k, generator=gen) >= zeros)


def codes(m: int, k: int, gen) -> torch.Tensor:
    return torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)


def reference(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (x.long() @ t.long().T).to(torch.int32)


def training_quant(x: torch.Tensor, norm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, step [...]) of x as the training layer computes them (``layers.bitnet``), after
    its RMSNorm with ``norm``: step = max|n| / 127, codes = clamp(round(n / step))."""
    codes, step = absmax_codes(rms_norm(x, -1) if norm else x)
    return codes.to(torch.int8), step.squeeze(-1)


# K not a multiple of 32 / 128, K < 32, M = 1 and M > 4 (microkernel rows), N odd and N % 4 != 0.
SHAPES = [(1, 1, 1), (1, 5, 31), (1, 4, 128), (1, 7, 129), (2, 3, 100), (3, 17, 300), (4, 8, 256), (5, 9, 1000),
          (7, 33, 383), (8, 768, 256), (9, 13, 1536), (33, 6, 65), (1, 1023, 384)]


def check_threads_and_layouts(matmul, weights, t, gen, rows):
    """``matmul(x, weights)`` equals the reference on 2 threads for each M in ``rows``, on a
    [2, 3, K] input and on a non-contiguous one."""
    n, k = t.shape
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for m in rows:
            x = codes(m, k, gen)
            assert torch.equal(matmul(x, weights), reference(x, t)), m
    finally:
        torch.set_num_threads(threads)
    x = codes(6, k, gen).reshape(2, 3, k)
    assert torch.equal(matmul(x, weights), reference(x.reshape(6, k), t).reshape(2, 3, n))
    strided = codes(k, 4, gen).T  # not contiguous
    assert torch.equal(matmul(strided, weights), reference(strided, t))


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matmul_equals_int64_reference(isa, gen, m, n, k):
    t, x = ternary(n, k, gen), codes(m, k, gen)
    weights = cpu_native.ternary_i8_prepack(kernels.pack_ternary(t), k)
    assert weights.codes.shape == (n, -(-k // 128) * 32)  # 2 bits per weight, K padded to 128
    assert torch.equal(cpu_native.ternary_i8_matmul(x, weights), reference(x, t)), (isa, m, n, k)


@pytest.mark.parametrize("m,n,k", [(1, 9, 200), (6, 5, 4096)])
def test_extreme_activations_and_weights(isa, m, n, k):
    """x = -128 everywhere (the value the abs/sign form gets wrong) against all -1, all +1, all 0 and
    mixed rows; 4096 x 128 x 2 also fills the int16 partial sums to their limit (-32768)."""
    t = torch.stack([torch.full((k,), v) for v in (-1.0, 1.0, 0.0, -1.0, 1.0)] +
                    [torch.arange(k).remainder(3).float() - 1] * (n - 5))
    weights = cpu_native.ternary_i8_prepack(kernels.pack_ternary(t), k)
    for fill in (-128, 127):
        x = torch.full((m, k), fill, dtype=torch.int8)
        x[-1, ::2] = -128 if fill == 127 else 127  # the last row alternates -128 and 127
        assert torch.equal(cpu_native.ternary_i8_matmul(x, weights), reference(x, t)), (isa, fill)
    assert cpu_native.ternary_i8_matmul(torch.full((1, k), -128, dtype=torch.int8), weights)[0, 0] == 128 * k


def test_all_zero_weights(isa, gen):
    weights = cpu_native.ternary_i8_prepack(kernels.pack_ternary(torch.zeros(6, 300)), 300)
    assert torch.equal(cpu_native.ternary_i8_matmul(codes(3, 300, gen), weights), torch.zeros(3, 6, dtype=torch.int32))


@pytest.mark.parametrize("m,n,k", [(1, 5, 63), (3, 17, 64), (8, 12, 1000)])
def test_binary_weights(isa, gen, m, n, k):
    w, x = torch.randn(n, k, generator=gen), codes(m, k, gen)
    signs = torch.where(w < 0, -1.0, 1.0)
    weights = cpu_native.binary_i8_prepack(kernels.pack_bits(w), k)
    assert torch.equal(cpu_native.ternary_i8_matmul(x, weights), reference(x, signs))


def test_threads_and_leading_dims(gen):
    """A layer large enough to run on the worker threads, and a [B, T, K] input read in place."""
    n, k = 1536, 1536
    t = ternary(n, k, gen)
    weights = cpu_native.ternary_i8_prepack(kernels.pack_ternary(t), k)
    check_threads_and_layouts(cpu_native.ternary_i8_matmul, weights, t, gen, (1, 8))


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("m,k", [(1, 1), (1, 7), (3, 129), (8, 384), (2, 1536), (64, 300)])
def test_quantize_equals_the_training_layers(isa, gen, m, k, norm):
    x = torch.randn(m, k, generator=gen) * torch.logspace(-30, 25, m).unsqueeze(1)  # squares under/overflow
    got_codes, got_step = cpu_native.quantize_i8(x, NORM_EPS if norm else None)
    want_codes, want_step = training_quant(x, norm)
    assert torch.equal(got_step, want_step), isa
    assert torch.equal(got_codes, want_codes), isa


def test_quantize_ties_zeros_and_extremes(isa):
    x = torch.tensor([[127.0, 2.5, -3.5, 0.5, 1.5, -0.5, -127.0, 126.5],  # scale 1: ties round to even
                      [0.0] * 8,                                            # all zero: scale 127 / 1e-5
                      [1e-7, -1e-7, 0, 0, 0, 0, 0, 0],                      # below the clamp
                      [3e38, -3e38, 1.0, 0, 0, 0, 0, 0]])                   # huge but finite
    got_codes, got_step = cpu_native.quantize_i8(x)
    want_codes, want_step = training_quant(x)
    assert got_codes[0].tolist() == [127, 2, -4, 0, 2, 0, -127, 126] and got_step[0] == 1.0
    assert got_step[1] == torch.tensor(1e-5) / 127  # the clamp, then a float32 division
    assert torch.equal(got_codes, want_codes) and torch.equal(got_step, want_step)


@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_quantize_after_rmsnorm_with_any_eps(isa, gen, eps, monkeypatch):
    """The kernel's eps is the caller's: equal to ``rms_norm`` with that eps (torch adds it in float32)."""
    x = torch.randn(5, 384, generator=gen) * torch.tensor([7.0, 1e-3, 1.0, 300.0, 1e-4]).unsqueeze(1)
    got_codes, got_step = cpu_native.quantize_i8(x, norm_eps=eps)
    monkeypatch.setattr(layers.bitnet, "NORM_EPS", eps)
    want_codes, want_step = training_quant(x, norm=True)
    assert torch.equal(got_step, want_step) and torch.equal(got_codes, want_codes), isa
    plain_codes, plain_step = cpu_native.quantize_i8(x)
    assert not torch.equal(got_step, plain_step)  # the norm did change the step
    if eps == 1e-6:  # x's RMS far above sqrt(eps): absmax codes are nearly scale-invariant
        assert (plain_codes[[0, 2, 3]].int() - got_codes[[0, 2, 3]].int()).abs().max() <= 1


@pytest.mark.parametrize("m,n,k,with_bias", [(1, 768, 256, False), (8, 384, 1536, True), (3, 7, 100, True)])
def test_fused_linear_equals_its_steps(isa, gen, m, n, k, with_bias):
    t = ternary(n, k, gen)
    weights = cpu_native.ternary_i8_prepack(kernels.pack_ternary(t), k)
    gamma = torch.tensor(0.0371, dtype=torch.float32)
    bias = torch.randn(n, generator=gen) if with_bias else None
    x = torch.randn(m, k, generator=gen)
    got = cpu_native.ternary_i8_linear(x, weights, float(gamma), bias)
    x_codes, step = training_quant(x)
    want = reference(x_codes, t).float() * (step * gamma).unsqueeze(1)  # the training layer's epilogue
    if bias is not None:
        want = want + bias
    assert torch.equal(got, want), isa
    # and what it stands for: the float layer on the dequantized activations and weights
    dequantized = F.linear(x_codes.float() * step.unsqueeze(1), t * gamma, bias)
    torch.testing.assert_close(got, dequantized, rtol=1e-4, atol=1e-4)
    layer = cpu_native.TernaryI8Linear(weights, float(gamma), bias)  # prepared once, called many times
    assert torch.equal(layer(x), want)
    assert torch.equal(layer(x[:1]), want[:1])
    if bias is None:  # absmax codes are scale-invariant and a power of two scales exactly
        assert torch.equal(layer(2 * x), 2 * want)
    normed = cpu_native.ternary_i8_linear(x.reshape(1, m, k), weights, float(gamma), bias, norm_eps=NORM_EPS)
    assert normed.shape == (1, m, n)
    assert not torch.equal(normed.reshape(m, n), got)  # the RMSNorm rescales the activations
    n_codes, n_step = training_quant(x, norm=True)
    want = reference(n_codes, t).float() * (n_step * gamma).unsqueeze(1)
    assert torch.equal(normed.reshape(m, n), want if bias is None else want + bias), isa


def test_layer_survives_pickling(gen, tmp_path):
    """torch.save / load of a model holding the layer: the native struct is rebuilt, not copied."""
    weights = cpu_native.ternary_i8_prepack(kernels.pack_ternary(ternary(10, 200, gen)), 200)
    layer = cpu_native.TernaryI8Linear(weights, 0.25, torch.randn(10, generator=gen), norm_eps=1e-6)
    torch.save(layer, tmp_path / "layer.pt")
    del weights
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    x = torch.randn(3, 200, generator=gen)
    assert torch.equal(loaded(x), layer(x))


def test_bad_inputs_are_refused(gen):
    weights = cpu_native.ternary_i8_prepack(kernels.pack_ternary(ternary(4, 64, gen)), 64)
    with pytest.raises(ValueError, match="dtype torch.int8"):
        cpu_native.ternary_i8_matmul(torch.zeros(1, 64), weights)
    with pytest.raises(ValueError, match="last dimension 64"):
        cpu_native.ternary_i8_matmul(torch.zeros(1, 65, dtype=torch.int8), weights)
    with pytest.raises(ValueError, match="TernaryI8Weights"):
        cpu_native.ternary_i8_matmul(torch.zeros(1, 64, dtype=torch.int8), kernels.pack_ternary(torch.zeros(4, 64)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        cpu_native.ternary_i8_linear(torch.tensor([[float("nan")] + [0.0] * 63]), weights, 1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        cpu_native.quantize_i8(torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(ValueError, match=r"bias must be a tensor \[4\]"):
        cpu_native.ternary_i8_linear(torch.zeros(1, 64), weights, 1.0, bias=torch.zeros(5))
    layer = cpu_native.TernaryI8Linear(weights, 1.0)
    with pytest.raises(ValueError, match="dtype torch.float32"):
        layer(torch.zeros(1, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="last dimension 64"):
        layer(torch.zeros(64, 1))
    assert layer(torch.ones(64)).shape == (4,)  # one token, no batch dimension
    with pytest.raises(ValueError, match="norm_eps"):
        cpu_native.quantize_i8(torch.zeros(1, 64), norm_eps=-1.0)


def test_weight_bytes_are_two_bits():
    n, k = 384, 1536
    weights = cpu_native.ternary_i8_prepack(kernels.pack_ternary(torch.zeros(n, k)), k)
    assert weights.nbytes * 16 == n * k * 4  # 1/16 of float32


# ---------------------------------------------------------------------------------------------
# The lookup-table kernel (ternary_i8_lut_matmul): the same products, by 27-entry tables per group
# of three weights; equal to the int64 reference and to the maddubs kernel, on every ISA here.
# ---------------------------------------------------------------------------------------------
# groups of 3 and words of 9 weights with every number of pads; 252 = 28 words (one int16 run), 253 one more
LUT_K = [1, 2, 3, 8, 9, 10, 63, 64, 65, 252, 253, 1000, 4097]


def lut_both(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = t.shape[1]
    planes = kernels.pack_ternary(t)
    lut = cpu_native.ternary_i8_lut_matmul(x, cpu_native.ternary_i8_lut_prepack(planes, k))
    return lut, cpu_native.ternary_i8_matmul(x, cpu_native.ternary_i8_prepack(planes, k))


@pytest.mark.parametrize("k", LUT_K)
@pytest.mark.parametrize("m,n", [(1, 1), (1, 77), (3, 129), (3, 5), (5, 64), (9, 200)])
def test_lut_matmul_equals_reference_and_maddubs_kernel(isa, gen, m, n, k):
    t, x = ternary(n, k, gen), codes(m, k, gen)
    lut, maddubs = lut_both(x, t)
    want = reference(x, t)
    assert lut.dtype == torch.int32 and torch.equal(lut, want), (isa, m, n, k)
    assert torch.equal(lut, maddubs), (isa, m, n, k)


@pytest.mark.parametrize("k", [64, 1000, 4097])
@pytest.mark.parametrize("m", [1, 3])
def test_lut_extremes_and_zeros(isa, m, k):
    """-128 / 127 against all -1, all +1, all 0 and mixed rows: K = 1000, 4097 fill the int16 runs
    (28 words * 9 * 128 = 32256) to their limit in both signs; zero codes give zero; odd N past two
    32-row panels."""
    n = 67
    t = torch.stack([torch.full((k,), v) for v in (-1.0, 1.0, 0.0, -1.0, 1.0)] +
                    [torch.arange(k).add(j).remainder(3).float() - 1 for j in range(n - 5)])
    for fill in (-128, 127):
        x = torch.full((m, k), fill, dtype=torch.int8)
        x[-1, ::2] = -128 if fill == 127 else 127
        lut, maddubs = lut_both(x, t)
        assert torch.equal(lut, reference(x, t)) and torch.equal(lut, maddubs), (isa, fill)
    lut, _ = lut_both(torch.full((1, k), -128, dtype=torch.int8), t)
    assert lut[0, :3].tolist() == [128 * k, -128 * k, 0]
    zeros, _ = lut_both(torch.zeros(m, k, dtype=torch.int8), t)
    assert torch.equal(zeros, torch.zeros(m, n, dtype=torch.int32))
    weights = cpu_native.ternary_i8_lut_prepack(kernels.pack_ternary(torch.zeros(5, k)), k)
    x = torch.full((m, k), -128, dtype=torch.int8)
    assert torch.equal(cpu_native.ternary_i8_lut_matmul(x, weights), torch.zeros(m, 5, dtype=torch.int32))


@pytest.mark.parametrize("m,k", [(2, 9000), (4, 4097)])
def test_lut_tables_built_by_the_threads_then_shared(isa, gen, m, k):
    """Fewer row blocks than threads and m x groups >= 4096: the threads build the tables first
    (one task per row), then split the panels (bq_ternary_i8_lut_gemm's third path)."""
    t, x = ternary(256, k, gen), codes(m, k, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        lut, _ = lut_both(x, t)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(lut, reference(x, t)), (isa, m, k)


def test_lut_threads_layout_and_refusals(gen):
    """A layer on the worker threads at M = 1, 3, 8 and 40, a [B, T, K] and a strided input, the stored
    layout (a 16-bit word per row and 9 weights: three 5-bit indices), and wrong inputs."""
    n, k = 1536, 1536
    t = ternary(n, k, gen)
    weights = cpu_native.ternary_i8_lut_prepack(kernels.pack_ternary(t), k)
    assert weights.codes.shape == (48, 171, 64) and weights.nbytes * 8 / (n * k) < 1.79  # 16 bits per 9 weights
    q = (t + 1).long()
    word = weights.codes[2, 7].view(torch.int16)[5].item() & 0xFFFF  # row 2 * 32 + 5, weights 63..71
    for g in range(3):
        c = q[69, 63 + 3 * g] + 3 * q[69, 64 + 3 * g] + 9 * q[69, 65 + 3 * g]
        assert (word >> 5 * g) & 31 == c, g
    # tables built up front and shared (1, 3), or per task of rows (8, 40)
    check_threads_and_layouts(cpu_native.ternary_i8_lut_matmul, weights, t, gen, (1, 3, 8, 40))
    x = codes(6, k, gen).reshape(2, 3, k)
    with pytest.raises(ValueError, match="TernaryI8LutWeights"):
        cpu_native.ternary_i8_lut_matmul(x, cpu_native.ternary_i8_prepack(kernels.pack_ternary(t), k))
    with pytest.raises(ValueError, match="dtype torch.int8"):
        cpu_native.ternary_i8_lut_matmul(torch.zeros(1, k), weights)
    with pytest.raises(ValueError, match=f"last dimension {k}"):
        cpu_native.ternary_i8_lut_matmul(torch.zeros(1, k + 1, dtype=torch.int8), weights)
    with pytest.raises(ValueError, match=r"codes must be a contiguous CPU uint8 tensor \(48, 171, 64\)"):
        cpu_native.TernaryI8LutWeights(weights.codes[:, :-1], n, k)
