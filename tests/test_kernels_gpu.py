"""GPU tests: the CuPy kernels equal the CPU path bit for bit (skipped without CUDA + CuPy).

Every kernel output buffer is poisoned with a sentinel first (torch.empty is patched to fill), each
kernel runs twice and both results must be identical (races), and both must equal the CPU path,
which tests/test_kernels.py ties to the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import cuda_matmul

try:
    import cupy

    HAVE_GPU = torch.cuda.is_available() and cupy.is_available()
except ImportError:
    HAVE_GPU = False

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA device and CuPy")]

SENTINEL = -123456789


@pytest.fixture
def poisoned(monkeypatch):
    """Make torch.empty in kernels fill with a sentinel so unwritten outputs show up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_cuda:
            t.fill_(SENTINEL if t.dtype in (torch.int32, torch.int64) else float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    yield


def run_twice(fn):
    first = fn()
    second = fn()
    torch.cuda.synchronize()
    assert torch.equal(first, second), "two runs differ: race?"
    assert not (first == SENTINEL).any(), "an output element was never written"
    return first


SHAPES = [(1, 1, 1), (1, 129, 63), (3, 17, 65), (8, 1000, 4097), (16, 64, 256), (17, 127, 257),
          (128, 129, 1000), (129, 128, 4095), (300, 257, 4096)]


@pytest.mark.parametrize("kernel", ["auto", "gemv", "gemm", "tc"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_binary_kernels_match_cpu(m, n, k, kernel, poisoned):
    if kernel == "gemv" and m > 16:
        pytest.skip("gemv is for M <= 16")
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    a_bits, b_bits = kernels.pack_bits(a), kernels.pack_bits(b)
    expected = kernels.binary_matmul(a_bits, b_bits, k)
    got = run_twice(lambda: kernels.binary_matmul(a_bits.cuda(), b_bits.cuda(), k, path=kernel))
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("kernel", ["auto", "gemv", "gemm"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_ternary_kernels_match_cpu(m, n, k, kernel, poisoned):
    if kernel == "gemv" and m > 16:
        pytest.skip("gemv is for M <= 16")
    g = torch.Generator().manual_seed(m + n + k)
    a = torch.randint(-1, 2, (m, k), generator=g).float()
    b = torch.randint(-1, 2, (n, k), generator=g).float()
    pa, pb = kernels.pack_ternary(a), kernels.pack_ternary(b)
    expected = kernels.ternary_matmul(pa, pb, k)
    got = run_twice(
        lambda: kernels.ternary_matmul(tuple(p.cuda() for p in pa), tuple(p.cuda() for p in pb), k, path=kernel)
    )
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("p_neg", [0.0, 1.0])
def test_all_plus_all_minus_on_gpu(p_neg):
    k = 4097
    x = torch.full((20, k), -1.0 if p_neg else 1.0)
    bits = kernels.pack_bits(x.cuda())
    for kernel in ("gemm", "tc"):
        assert (kernels.binary_matmul(bits, bits, k, path=kernel) == k).all()


def test_packing_on_gpu_equals_cpu():
    x = torch.randn(33, 1000)
    x[0, :5] = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.0])
    assert torch.equal(kernels.pack_bits(x.cuda()).cpu(), kernels.pack_bits(x))
    t = torch.randint(-1, 2, (5, 300)).float()
    for gpu, cpu in zip(kernels.pack_ternary(t.cuda()), kernels.pack_ternary(t)):
        assert torch.equal(gpu.cpu(), cpu)


def test_epilogue_on_gpu_equals_cpu(poisoned):
    n = 200
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-300, 300, (37, n), generator=g, dtype=torch.int32)
    mul, add = torch.randn(n, generator=g).double(), torch.randn(n, generator=g).double()
    mul[:8], add[:8] = 1.0, -acc[0, :8].double()  # exact ties in row 0
    for sign_pack in (False, True):
        expected = kernels.epilogue(acc, mul_add=(mul, add), sign_pack=sign_pack)
        got = run_twice(lambda: kernels.epilogue(acc.cuda(), mul_add=(mul, add), sign_pack=sign_pack))
        assert torch.equal(got.cpu(), expected)


def test_conv_on_gpu_equals_cpu():
    x, w = torch.randn(2, 70, 9, 9), torch.randn(5, 70, 3, 3)
    wb = kernels.pack_conv_weight(w)
    for mode in ("zeros", "ones"):
        expected = kernels.binary_conv2d(x, wb, 3, stride=2, padding=1, padding_mode=mode)
        got = kernels.binary_conv2d(x.cuda(), wb.cuda(), 3, stride=2, padding=1, padding_mode=mode)
        assert torch.equal(got.cpu(), expected)


def test_no_spills_in_loaded_kernels():
    from kernels import cuda_runtime

    kernels.binary_matmul(kernels.pack_bits(torch.randn(200, 64).cuda()), kernels.pack_bits(torch.randn(9, 64).cuda()), 64)
    fn = cuda_runtime.get_kernel("binary_gemm_tc.cu", "packed_gemm_tc", torch.cuda.current_device())
    assert fn.local_size_bytes == 0


def test_gemv_row_variants_cover_up_to_max():
    assert cuda_matmul._gemv_rows(1) == 1 and cuda_matmul._gemv_rows(9) == 16
