"""The native CPU engine (kernels/native, kernels/cpu_native.py) against the NumPy / float64 reference.

Every instruction set this machine runs is tested (``ISAS``): the CI machine's CPU decides which
(an AVX2 x86 runs avx2, popcnt and scalar; an AVX-512 VPOPCNTDQ one adds avx512; ARM runs neon and
scalar).  Integers are compared exactly; the float output bit for bit with ``kernels.epilogue``.
"""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from conftest import native_isas
from kernels import cpu_native, native
from kernels.conv import conv_output_size

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: "
                                f"{native.unavailable_reason() if not native.available() else ''}")

REPO = Path(__file__).resolve().parents[2]


def signs(x: torch.Tensor) -> torch.Tensor:
    """+-1 float64 with the project's convention (x >= 0 -> +1, -0.0 -> +1)."""
    return torch.where(x < 0, -1.0, 1.0).double()


def with_zeros(x: torch.Tensor) -> torch.Tensor:
    """Exact 0.0 and -0.0 in a tenth of the entries each (both must pack as +1)."""
    x = x.clone()
    x.view(-1)[::10] = 0.0
    x.view(-1)[5::10] = -0.0
    return x


def reference_conv(x, w, stride, padding, dilation, groups, padding_value=0.0):
    sx = signs(x)
    if padding_value:
        sx = F.pad(sx, (padding[1], padding[1], padding[0], padding[0]), value=padding_value)
        padding = (0, 0)
    return F.conv2d(sx, signs(w), None, stride, padding, dilation, groups).round().to(torch.int32)


def prepacked_conv(w, groups):
    per_group = [kernels.pack_conv_weight(chunk) for chunk in w.chunk(groups, 0)]
    return cpu_native.prepack_conv(per_group, tuple(w.shape[2:]), w.shape[1])


MATMUL_SHAPES = [(1, 1, 1), (1, 5, 63), (3, 17, 64), (5, 9, 65), (7, 33, 1000), (1, 64, 4097), (33, 31, 4097),
                 (65, 8, 127), (4, 3, 129)]


@pytest.mark.parametrize("m,n,k", MATMUL_SHAPES)
def test_binary_matmul_equals_reference(isa, gen, m, n, k):
    a, b = with_zeros(torch.randn(m, k, generator=gen)), torch.randn(n, k, generator=gen)
    expected = (signs(a) @ signs(b).T).to(torch.int32)
    got = cpu_native.linear(cpu_native.pack_rows(a), cpu_native.prepack_linear(kernels.pack_bits(b), k))
    assert torch.equal(got, expected), (isa, m, n, k)
    assert torch.equal(kernels.binary_matmul(kernels.pack_bits(a), kernels.pack_bits(b), k, path="native"), expected)
    prepacked = kernels.prepack_binary(kernels.pack_bits(b), k)
    assert torch.equal(kernels.binary_matmul(kernels.pack_bits(a), prepacked, k), expected)


def test_prepacked_binary_matmul_checks_what_the_general_path_checks(gen):
    """The prepacked call's short path: any row count, non-contiguous rows, and the general path's
    errors for operands it does not take."""
    b, k = torch.randn(9, 130, generator=gen), 130
    prepacked = kernels.prepack_binary(kernels.pack_bits(b), k)
    for m in (1, 4, 1):  # a cached plan per row count
        a = torch.randn(m, k, generator=gen)
        assert torch.equal(kernels.binary_matmul(kernels.pack_bits(a), prepacked, k),
                           (signs(a) @ signs(b).T).to(torch.int32))
    a = torch.randn(k, 3, generator=gen).T  # [3, 130], not contiguous once packed along the rows
    a_bits = kernels.pack_bits(a.contiguous()).T.contiguous().T
    assert not a_bits.is_contiguous()
    assert torch.equal(kernels.binary_matmul(a_bits, prepacked, k), (signs(a) @ signs(b).T).to(torch.int32))
    with pytest.raises(ValueError, match="word counts differ"):
        kernels.binary_matmul(torch.zeros(1, 4, dtype=torch.int64), prepacked, k)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        kernels.binary_matmul(torch.zeros(1, 3, dtype=torch.int32), prepacked, k)
    with pytest.raises(ValueError, match="k=130"):
        kernels.binary_matmul(kernels.pack_bits(a.contiguous()), prepacked, 129)


@pytest.mark.parametrize("m,n,k", MATMUL_SHAPES)
def test_ternary_matmul_equals_reference(isa, gen, m, n, k):
    a = torch.randint(-1, 2, (m, k), generator=gen).float()
    b = torch.randint(-1, 2, (n, k), generator=gen).float()
    expected = (a.double() @ b.double().T).to(torch.int32)
    got = kernels.ternary_matmul(kernels.pack_ternary(a), kernels.prepack_ternary(kernels.pack_ternary(b), k), k)
    assert torch.equal(got, expected), (isa, m, n, k)


def test_extreme_dot_products(isa):
    """All +1 against all -1: |dot| = K, the accumulator's range (K up to 4097 words' worth)."""
    for k in (1, 64, 4097, 70000):
        plus, minus = torch.ones(3, k), -torch.ones(2, k)
        got = cpu_native.linear(cpu_native.pack_rows(plus), cpu_native.prepack_linear(kernels.pack_bits(minus), k))
        assert (got == -k).all(), (isa, k)
        got = cpu_native.linear(cpu_native.pack_rows(minus), cpu_native.prepack_linear(kernels.pack_bits(minus), k))
        assert (got == k).all(), (isa, k)


# (batch, C_in, H, W, C_out, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (1, 1, 5, 5, 1, 1, 1, 0, 1, 1),       # K = 1
    (1, 3, 5, 5, 5, 3, 1, 1, 1, 1),
    (2, 64, 8, 8, 16, 3, 1, 1, 1, 1),     # one word per tap
    (2, 65, 7, 9, 17, 3, 2, 1, 1, 1),     # stride 2, odd sizes, 65 channels
    (1, 130, 6, 6, 9, 1, 1, 0, 1, 1),     # 1x1
    (3, 32, 9, 9, 24, 3, 1, 2, 2, 1),     # dilation 2
    (2, 64, 6, 6, 64, 3, 1, 1, 1, 64),    # depthwise
    (2, 12, 5, 5, 8, 3, 2, 1, 1, 4),      # groups
    (1, 1000, 3, 3, 11, 3, 1, 1, 1, 1),   # many words per tap
    (2, 7, 4, 4, 3, 5, 1, 2, 1, 1),       # 5x5, input smaller than the padded kernel
    (1, 63, 4, 4, 7, 2, 2, 0, 1, 1),      # even kernel, no padding
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_binary_conv_equals_reference_in_both_memory_formats(isa, gen, case):
    n, c, h, w, o, k, s, p, d, g = case
    x = with_zeros(torch.randn(n, c, h, w, generator=gen))
    weight = torch.randn(o, c // g, k, k, generator=gen)
    expected = reference_conv(x, weight, (s, s), (p, p), (d, d), g)
    weights = prepacked_conv(weight, g)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x_words = cpu_native.pack_pixels(x.contiguous(memory_format=memory_format), g)
        got = cpu_native.conv(x_words, weights, (s, s), (p, p), (d, d)).permute(0, 3, 1, 2)
        assert torch.equal(got, expected), (isa, case, memory_format)
    if p:  # one-padding is the same kernel without the tap-sum correction
        ones = cpu_native.conv(x_words, weights, (s, s), (p, p), (d, d), zero_padding=False).permute(0, 3, 1, 2)
        assert torch.equal(ones, reference_conv(x, weight, (s, s), (p, p), (d, d), g, padding_value=1.0))


def test_binary_conv2d_public_function_uses_the_native_path(isa, gen):
    x, weight = torch.randn(2, 70, 6, 5, generator=gen), torch.randn(9, 70, 3, 3, generator=gen)
    bits = kernels.pack_conv_weight(weight)
    for mode, value in (("zeros", 0.0), ("ones", 1.0)):
        got = kernels.binary_conv2d(x, bits, 3, stride=2, padding=1, padding_mode=mode, path="native")
        reference = kernels.binary_conv2d(x, bits, 3, stride=2, padding=1, padding_mode=mode, path="popcount")
        assert torch.equal(got, reference)
        assert torch.equal(got, reference_conv(x, weight, (2, 2), (1, 1), (1, 1), 1, padding_value=value))


@pytest.mark.parametrize("case", CONV_CASES[:6], ids=str)
def test_float_output_is_bit_identical_to_the_epilogue(isa, gen, case):
    n, c, h, w, o, k, s, p, d, g = case
    x, weight = torch.randn(n, c, h, w, generator=gen), torch.randn(o, c // g, k, k, generator=gen)
    mul, add = torch.randn(o, generator=gen), torch.randn(o, generator=gen)
    mul[0] = 0.0
    x_words = cpu_native.pack_pixels(x, g)
    weights = prepacked_conv(weight, g)
    acc = cpu_native.conv(x_words, weights, (s, s), (p, p), (d, d))
    got = cpu_native.conv(x_words, weights, (s, s), (p, p), (d, d), mode=native.OUT_FLOAT, mul=mul, add=add)
    assert torch.equal(got, kernels.epilogue(acc, scale=mul, bias=add)), (isa, case)


@pytest.mark.parametrize("out_channels", [16, 13])  # whole 8-channel panels, and a remainder panel
def test_residual_and_clamp_equal_the_separate_float_ops_nan_included(isa, gen, out_channels):
    """y = hardtanh(dot * mul + add + residual), as the float model's three ops round it; a NaN or
    infinite residual passes through the clamp as Hardtanh passes it; values on the bounds stay."""
    x, weight = torch.randn(2, 70, 6, 5, generator=gen), torch.randn(out_channels, 70, 3, 3, generator=gen)
    mul, add = torch.rand(out_channels, generator=gen) * 0.1, torch.randn(out_channels, generator=gen)
    x_words, weights = cpu_native.pack_pixels(x), prepacked_conv(weight, 1)
    acc = cpu_native.conv(x_words, weights, (1, 1), (1, 1), (1, 1))
    residual = torch.randn(*acc.shape, generator=gen) * 3
    flat = residual.view(-1)
    flat[::7], flat[3::11], flat[5::13] = float("nan"), float("inf"), -float("inf")
    lo, hi = -1.0, 0.5
    epilogue = kernels.epilogue(acc, scale=mul, bias=add)
    flat[1::17] = (hi - epilogue.reshape(-1)[1::17])  # lands on (or within one rounding of) the upper bound
    got = cpu_native.conv(x_words, weights, (1, 1), (1, 1), (1, 1), mode=native.OUT_FLOAT, mul=mul, add=add,
                          residual=residual, clamp=(lo, hi))
    expected = F.hardtanh(epilogue + residual, lo, hi)
    assert torch.equal(got.isnan(), expected.isnan()), isa
    assert torch.equal(got.nan_to_num(), expected.nan_to_num()), isa
    assert got.isnan().any() and (got == hi).any() and (got == lo).any()


def test_cached_call_plans_follow_new_shapes_and_in_place_changes(gen):
    """conv keeps a plan per geometry and transform with the weights: a new input size, a mul
    changed in place (here a float64 one the float mode converts), or another residual still count."""
    weight = torch.randn(16, 70, 3, 3, generator=gen)
    weights = prepacked_conv(weight, 1)
    mul, add = torch.rand(16, dtype=torch.float64, generator=gen), torch.randn(16, generator=gen)
    for size in (5, 7, 5):
        x = torch.randn(2, 70, size, size, generator=gen)
        x_words = cpu_native.pack_pixels(x)
        acc = cpu_native.conv(x_words, weights, (1, 1), (1, 1), (1, 1))
        assert torch.equal(acc, reference_conv(x, weight, (1, 1), (1, 1), (1, 1), 1).permute(0, 2, 3, 1))
        for _ in range(2):
            residual = torch.randn(2, size, size, 16, generator=gen)
            got = cpu_native.conv(x_words, weights, (1, 1), (1, 1), (1, 1), mode=native.OUT_FLOAT, mul=mul,
                                  add=add, residual=residual)
            assert torch.equal(got, kernels.epilogue(acc, scale=mul.float(), bias=add) + residual)
            mul.mul_(2.0)
    listed = [1.0] * 16  # a list converted to a tensor: changed in place, it must still count
    first = cpu_native.conv(x_words, weights, (1, 1), (1, 1), (1, 1), mode=native.OUT_FLOAT, mul=listed, add=0.0)
    listed[0] = 3.0
    again = cpu_native.conv(x_words, weights, (1, 1), (1, 1), (1, 1), mode=native.OUT_FLOAT, mul=listed, add=0.0)
    assert torch.equal(again[..., 1:], first[..., 1:]) and torch.equal(again[..., 0], 3 * first[..., 0])
    for copied in (copy.deepcopy(weights), pickle.loads(pickle.dumps(weights))):  # plans hold raw pointers
        assert not copied.plans and torch.equal(cpu_native.conv(x_words, copied, (1, 1), (1, 1), (1, 1)), acc)
    with pytest.raises(ValueError, match="residual must be"):
        cpu_native.conv(x_words, weights, (1, 1), (1, 1), (1, 1), mode=native.OUT_FLOAT, mul=mul, add=add,
                        residual=torch.zeros(2, 4, 4, 16))


def test_sign_output_is_bit_identical_including_ties(isa, gen):
    """y = dot * mul + add placed exactly on 0 for some outputs: the tie y == 0 is +1 (bit 0)."""
    x, weight = torch.randn(2, 40, 5, 5, generator=gen), torch.randn(70, 40, 3, 3, generator=gen)
    x_words, weights = cpu_native.pack_pixels(x), prepacked_conv(weight, 1)
    acc = cpu_native.conv(x_words, weights, (1, 1), (1, 1), (1, 1))
    mul = torch.randn(70, dtype=torch.float64, generator=gen)
    mul[:3] = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    add = -acc[0, 2, 2].double() * mul  # pixel (0, 2, 2) sits exactly on every threshold
    got = cpu_native.conv(x_words, weights, (1, 1), (1, 1), (1, 1), mode=native.OUT_SIGN, mul=mul, add=add)
    expected = kernels.epilogue(acc, mul_add=(mul, add), sign_pack=True)
    assert torch.equal(got, expected), isa
    assert int(got[0, 2, 2, 0]) == 0 and int(got[0, 2, 2, 1]) == 0  # ties -> +1 -> bit 0


def test_packing_equals_pack_bits(isa, gen):
    x = with_zeros(torch.randn(3, 130, 4, 5, generator=gen))
    reference = kernels.pack_activations(x)
    assert torch.equal(cpu_native.pack_pixels(x), reference)
    assert torch.equal(cpu_native.pack_pixels(x.contiguous(memory_format=torch.channels_last)), reference)
    rows = x.reshape(-1, 200)
    assert torch.equal(cpu_native.pack_rows(rows), kernels.pack_bits(rows))
    with pytest.raises(ValueError, match="NaN"):
        cpu_native.pack_rows(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="NaN"):
        cpu_native.pack_pixels(torch.full((1, 3, 2, 2), float("nan")))


def signs_packed(negative: torch.Tensor) -> torch.Tensor:
    """Packed NHWC words of a boolean ``[N, H, W, C]`` "is negative" map (bit 1 = negative)."""
    return kernels.pack_activations(torch.where(negative, -1.0, 1.0).permute(0, 3, 1, 2).contiguous())


def float_conv_in_tap_order(x, w, b, stride, padding, dilation):
    """float32 ``conv(x, w) (+ b)`` summed in (c, i, j) order, one rounding per product and per add."""
    o, _, kh, kw = w.shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [N, C kh kw, L]
    acc = torch.zeros(x.shape[0], o, cols.shape[2])
    for k, column in enumerate(w.reshape(o, -1).t()):
        acc = acc + cols[:, k:k + 1] * column.view(1, o, 1)
    return acc if b is None else acc + b.view(1, o, 1)


FLOAT_CONV_CASES = [  # out channels, in channels, kernel, stride, padding, dilation, bias, batch, size
    (32, 1, 3, 1, 0, 1, False, 2, (28, 28)),   # mnist_cnn's first conv
    (70, 3, 3, 2, 1, 1, True, 3, (11, 9)),      # two words, the second partly used; padding, stride 2
    (64, 2, 5, 1, 2, 2, False, 1, (9, 10)),     # dilation 2: every tap of the border pixels checked
    (24, 2, 3, 2, 0, 1, False, 2, (9, 21)),     # stride 2 inside the image (pixels four at a time)
    (130, 1, 3, 1, 1, 1, True, 1, (6, 12)),     # three words; 64-channel blocks in several passes
    (1, 1, 1, 1, 0, 1, True, 1, (1, 1)),
    (16, 3, 3, 1, 1, 1, False, 64, (16, 16)),  # enough work for the thread pool
]


@pytest.mark.parametrize("case", FLOAT_CONV_CASES, ids=str)
def test_float_conv_sign_equals_the_float32_sum_in_tap_order(isa, gen, case):
    o, c, k, stride, padding, dilation, with_bias, n, size = case
    w, x = torch.randn(o, c, k, k, generator=gen), with_zeros(torch.randn(n, c, *size, generator=gen))
    b = torch.randn(o, generator=gen) if with_bias else None
    mul, add = torch.randn(o, generator=gen, dtype=torch.float64), torch.randn(o, generator=gen, dtype=torch.float64)
    mul[0] = 0.0  # a constant channel: the sign of add alone
    geometry = [(v, v) for v in (stride, padding, dilation)]
    y = float_conv_in_tap_order(x, w, b, *geometry)
    ho, wo = (conv_output_size(side, k, stride, padding, dilation) for side in size)
    z = y.double() * mul.view(1, o, 1) + add.view(1, o, 1)
    expected = signs_packed((z < 0).reshape(n, o, ho, wo).permute(0, 2, 3, 1))
    conv = cpu_native.FloatConvSign(w, b, *geometry, mul, add)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        assert torch.equal(conv.run(x.contiguous(memory_format=memory_format)), expected), (isa, memory_format)


def test_float_conv_sign_refuses_nan_and_wrong_input():
    conv = cpu_native.FloatConvSign(torch.ones(4, 2, 3, 3), None, (1, 1), (1, 1), (1, 1), torch.ones(4),
                                    torch.zeros(4))
    x = torch.randn(1, 2, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        conv.run(x)
    with pytest.raises(ValueError, match=r"float32 \[N, 2, H, W\]"):
        conv.run(torch.randn(1, 3, 5, 5))


def test_affine_sign_pack_takes_the_sign_in_float64(gen):
    x = with_zeros(torch.randn(3, 70, 5, 4, generator=gen))
    mul, add = torch.randn(70, generator=gen, dtype=torch.float64), torch.randn(70, generator=gen, dtype=torch.float64)
    z = x.double() * mul.view(1, -1, 1, 1) + add.view(1, -1, 1, 1)
    expected = kernels.pack_activations(torch.where(z < 0, -1.0, 1.0).float())
    for memory_format in (torch.contiguous_format, torch.channels_last):
        assert torch.equal(cpu_native.affine_sign_pack(x.contiguous(memory_format=memory_format), mul, add), expected)
    x[0, 3, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cpu_native.affine_sign_pack(x, mul, add)


def test_plans_refuse_inputs_of_another_shape(gen):
    weight = torch.randn(8, 64, 3, 3, generator=gen)
    x_words = cpu_native.pack_pixels(torch.randn(1, 64, 6, 6, generator=gen))
    weights = prepacked_conv(weight, 1)
    plan = cpu_native.conv_plan(x_words.shape, weights)
    assert torch.equal(plan.run(x_words), cpu_native.conv(x_words, weights))
    with pytest.raises(ValueError, match="shape"):
        plan.run(x_words[:, :5].contiguous())
    pool = cpu_native.MaxPoolBitsPlan(x_words.shape, torch.zeros(1, dtype=torch.int64), (2, 2), (2, 2), (0, 0),
                                      (1, 1))
    assert pool.run(x_words).shape == (1, 3, 3, 1)
    with pytest.raises(ValueError, match="shape"):
        pool.run(x_words[:, :4].contiguous())


def pool_plans(shape, gen, geometries):
    """MaxPoolBitsPlans of random AND/OR masks, one per (kernel, stride, padding, dilation), chained from ``shape``."""
    plans = []
    for kernel, stride, padding, dilation in geometries:
        mask = torch.randint(-2**62, 2**62, (shape[3],), generator=gen, dtype=torch.int64)
        plans.append(cpu_native.MaxPoolBitsPlan(shape, mask, (kernel, kernel), (stride, stride), (padding, padding),
                                                (dilation, dilation)))
        shape = plans[-1].out_shape
    return plans


POOL_CHAINS = [[(2, 2, 0, 1)], [(3, 2, 1, 1)], [(2, 2, 0, 1), (3, 1, 1, 2)]]


@pytest.mark.parametrize("geometries", POOL_CHAINS, ids=str)
def test_pooled_conv_equals_the_conv_then_each_pool(isa, gen, geometries):
    x = torch.randn(2, 96, 11, 10, generator=gen)
    x_words, weights = cpu_native.pack_pixels(x), prepacked_conv(torch.randn(130, 96, 3, 3, generator=gen), 1)
    mul, add = (torch.randn(130, generator=gen, dtype=torch.float64) for _ in range(2))
    plan = cpu_native.conv_plan(x_words.shape, weights, padding=(1, 1), mode=native.OUT_SIGN, mul=mul, add=add)
    plans = pool_plans(plan.final_shape, gen, geometries)
    expected = plan.run(x_words)
    for pool in plans:
        expected = pool.run(expected)
    assert torch.equal(plan.run(x_words, pools=cpu_native.PoolChain(plans)), expected), isa


@pytest.mark.parametrize("geometries", POOL_CHAINS, ids=str)
def test_pooled_float_conv_sign_equals_the_conv_then_each_pool(isa, gen, geometries):
    x, w = torch.randn(2, 1, 28, 27, generator=gen), torch.randn(70, 1, 3, 3, generator=gen)
    mul, add = (torch.randn(70, generator=gen, dtype=torch.float64) for _ in range(2))
    conv = cpu_native.FloatConvSign(w, None, (1, 1), (0, 0), (1, 1), mul, add)
    plans = pool_plans(conv.plan(x)[1], gen, geometries)
    expected = conv.run(x)
    for pool in plans:
        expected = pool.run(expected)
    assert torch.equal(conv.run(x, pools=cpu_native.PoolChain(plans)), expected), isa
    x[1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        conv.run(x, pools=cpu_native.PoolChain(plans))


def test_pool_chains_refuse_mismatched_shapes_and_other_outputs(gen):
    x_words, weights = cpu_native.pack_pixels(torch.randn(1, 64, 6, 6, generator=gen)), prepacked_conv(
        torch.randn(8, 64, 3, 3, generator=gen), 1)
    first, second = pool_plans((1, 4, 4, 1), gen, [(2, 2, 0, 1)] * 2)  # the second takes 2x2, gets 2x2: fine
    with pytest.raises(ValueError, match="does not follow"):
        cpu_native.PoolChain([first, first])
    chain = cpu_native.PoolChain([first, second])
    sign = cpu_native.conv_plan(x_words.shape, weights, mode=native.OUT_SIGN, mul=1.0, add=0.0)
    assert sign.run(x_words, pools=chain).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="sign output"):
        cpu_native.conv_plan(x_words.shape, weights).run(x_words, pools=chain)
    with pytest.raises(ValueError, match="the pools take"):
        cpu_native.conv_plan(x_words.shape, weights, padding=(1, 1), mode=native.OUT_SIGN, mul=1.0,
                             add=0.0).run(x_words, pools=chain)


@pytest.mark.parametrize("pool", ["openmp", "own"])
def test_results_do_not_depend_on_the_thread_count_or_pool(gen, pool):
    if pool not in native.pools():
        pytest.skip("the native kernels were built without OpenMP here")
    x, weight = torch.randn(4, 96, 9, 9, generator=gen), torch.randn(200, 96, 3, 3, generator=gen)
    x_words, weights = cpu_native.pack_pixels(x), prepacked_conv(weight, 1)
    expected = reference_conv(x, weight, (1, 1), (1, 1), (1, 1), 1).permute(0, 2, 3, 1)
    previous = torch.get_num_threads()
    try:
        with native.using_pool(pool):
            assert native.pool() == pool
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                got = cpu_native.conv(x_words, weights, (1, 1), (1, 1), (1, 1))
                assert torch.equal(got, expected), (pool, threads)
    finally:
        torch.set_num_threads(previous)


def test_without_openmp_the_build_falls_back_to_the_own_pool(tmp_path):
    code = ("from kernels import native\nnative.OPENMP_FLAGS = ['-fno-such-openmp-flag']\n"
            "print(native.pool(), native.library().bq_use_openmp(1))")
    done = run_python(code, BITQAT_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0 and done.stdout.split() == ["own", "0"], done.stderr


def test_openmp_pool_shares_torchs_openmp_runtime():
    """One libgomp in the process: the kernels' team is torch's, not a second pool beside it."""
    if "openmp" not in native.pools():
        pytest.skip("the native kernels were built without OpenMP here")
    maps = "sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l})"
    done = run_python(f"import torch\nprint({maps})\nfrom kernels import native\nnative.library()\nprint({maps})")
    assert done.returncode == 0, done.stderr
    torchs, after = done.stdout.splitlines()
    if "libgomp.so.1'" not in torchs:  # e.g. a wheel whose libgomp was renamed: the kernels get their own
        pytest.skip(f"torch's OpenMP runtime is not libgomp.so.1 here: {torchs}")
    assert after == torchs, (torchs, after)


def test_peak_microbenchmark_reports_a_rate():
    assert cpu_native.peak_bitmacs_per_s(200) > 1e8


def run_python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_changes)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("variable,getter,choices,bad,valid", [
    ("BITQAT_CPU_ISA", "isa", lambda: native_isas()[-1:], "sse9", "valid:"),  # the portable one
    ("BITQAT_CPU_POOL", "pool", lambda: native.pools(), "tbb", "valid: openmp, own"),
])
def test_forcing_an_instruction_set_or_pool_by_environment(variable, getter, choices, bad, valid):
    for forced in choices():
        done = run_python(f"from kernels import native; print(native.{getter}())", **{variable: forced})
        assert done.returncode == 0 and done.stdout.strip() == forced, done.stderr
    refused = run_python(f"from kernels import native; native.{getter}()", **{variable: bad})
    assert refused.returncode != 0 and f"{variable}={bad!r}" in refused.stderr and valid in refused.stderr, \
        refused.stderr


def test_without_a_compiler_the_numpy_path_runs_with_one_warning(tmp_path):
    """A fresh cache and no compiler on PATH: one RuntimeWarning, then exact NumPy results."""
    code = ("import warnings, torch, kernels\n"
            "warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    a, b = torch.randn(3, 100), torch.randn(5, 100)\n"
            "    got = kernels.binary_matmul(kernels.pack_bits(a), kernels.pack_bits(b), 100)\n"
            "    kernels.binary_matmul(kernels.pack_bits(a), kernels.pack_bits(b), 100)\n"
            "ref = (torch.where(a < 0, -1., 1.) @ torch.where(b < 0, -1., 1.).T).int()\n"
            "print(torch.equal(got, ref),\n"
            "      len([w for w in caught if 'native CPU kernels unavailable' in str(w.message)]))\n")
    done = run_python(code, BITQAT_CACHE_DIR=str(tmp_path), PATH=str(tmp_path), CXX="")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "1"], done.stdout


def test_disabled_by_environment_falls_back():
    done = run_python("from kernels import native, cpu_matmul\n"
                      "print(native.available(), cpu_matmul.choose_cpu_path(1))",
                      BITQAT_NATIVE="0")
    assert done.returncode == 0 and done.stdout.split() == ["False", "popcount"], done.stderr


def test_packed_models_give_identical_outputs_on_the_native_and_numpy_paths(monkeypatch):
    """The packed layers' native route (fused pack + direct conv + float output) against their
    NumPy route, on whole models, both memory formats, grouped convs and a binary linear."""
    import qat
    from qat import models
    from qat.export import pack_model

    torch.manual_seed(0)
    grouped = torch.nn.Sequential(
        torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.BatchNorm2d(24), torch.nn.Hardtanh(),
        torch.nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=3), torch.nn.BatchNorm2d(24), torch.nn.Hardtanh(),
        torch.nn.Conv2d(24, 24, 3, padding=1, groups=24), torch.nn.Flatten(), torch.nn.Linear(24 * 16, 10))
    cases = [(models.build("resnet20", num_classes=10, activation="hardtanh"), (3, 32, 32)),
             (models.build("mnist_cnn", num_classes=10, in_channels=1), (1, 28, 28)), (grouped, (3, 8, 8))]
    for model, shape in cases:
        for module in model.modules():  # BatchNorm statistics that are not the identity
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        packed = pack_model(qat.quantize_model(model, {"method": "xnor", "keep_fp": ["first"]}).eval())
        for memory_format in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(3, *shape).contiguous(memory_format=memory_format)
            with torch.inference_mode():
                fast = packed(x)
                with monkeypatch.context() as patch:
                    patch.setattr(native, "available", lambda: False)
                    reference = packed(x)
            assert torch.equal(fast, reference), (type(model).__name__, memory_format)


# ------------------------------------------------------------- what training saves for backward
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 4097])
def test_pack_compare_gives_the_words_of_the_torch_comparison(n):
    """native_src/saved_tensors.cpp's compare-and-pack: the words of kernels.pack_bits' format for
    every comparison, with NaN, +-0 and values at the threshold, SIMD body and scalar tail."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 2
    special = torch.tensor([float("nan"), 0.0, -0.0, 1.0, -1.0, 0.3])
    x[: min(n, 6)] = special[: min(n, 6)]
    x[7::9] = 1.0
    for op, compare in (("lt", torch.lt), ("le", torch.le), ("ge", torch.ge)):
        for absolute, threshold in ((False, 0.0), (False, 0.3), (True, 1.0)):
            flags = compare(x.abs() if absolute else x, threshold).to(torch.int8).neg_()
            expected = kernels.pack_bits(flags)
            assert torch.equal(cpu_native.pack_compare(x, op, threshold, absolute), expected), (op, absolute)


@pytest.mark.parametrize("shape", [(3, 5, 1), (2, 4, 7), (2, 3, 8), (2, 3, 4, 17), (4, 6)])
def test_int16_forms_equal_torchs_rounding_and_scaling(shape):
    """round(x / s_c) to int16 and back, per channel (dim 1), as act_compression's torch ops give
    them: integer multiples of the scale, and ties at half-integers (rounded half to even) through
    both the SIMD body and the scalar tail."""
    generator = torch.Generator().manual_seed(len(shape))
    channels = shape[1]
    scale = torch.rand(channels, generator=generator) + 0.05
    view = (1, channels) + (1,) * (len(shape) - 2)
    y = torch.randint(-3000, 3001, shape, generator=generator).float() * scale.view(view)
    ties = (torch.arange(y.numel()) % 17 - 8).float().add_(0.5).view(shape)
    for values, inverse in ((y, scale.reciprocal()), (ties, torch.ones(channels))):
        want = values.mul(inverse.view(view)).round_().to(torch.int16)
        assert torch.equal(cpu_native.scaled_to_i16(values, inverse), want)
    packed = cpu_native.scaled_to_i16(y, scale.reciprocal())
    assert torch.equal(cpu_native.i16_to_scaled(packed, scale), packed.to(torch.float32).mul_(scale.view(view)))
    with pytest.raises(ValueError, match="one scale per channel"):
        cpu_native.scaled_to_i16(y, scale[:-1])


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 4097])
def test_zero_where_is_masked_fill_bit_for_bit(n):
    """g.masked_fill_(flags, 0.0) from the packed flags: +0.0 where set (NaN and -0.0 too), the
    rest untouched bit for bit (NaN payloads, -0.0)."""
    generator = torch.Generator().manual_seed(n)
    flags = torch.rand(n, generator=generator) < 0.4
    g = torch.randn(n, generator=generator)
    g[::5] = float("nan")
    g[::7] = -0.0
    want = g.clone().masked_fill_(flags, 0.0)
    got = cpu_native.zero_where_(g.clone(), kernels.pack_bits(flags.to(torch.int8).neg_()))
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
