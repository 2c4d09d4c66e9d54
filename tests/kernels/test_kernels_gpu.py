"""GPU tests: the CuPy kernels equal the CPU path bit for bit (skipped without CUDA + CuPy).

Every kernel output buffer is poisoned with a sentinel first (torch.empty is patched to fill), each
kernel runs twice and both results must be identical (races), and both must equal the CPU path,
which tests/kernels/test_kernels.py ties to the float64 reference.
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
    for gpu, cpu in zip(kernels.pack_ternary(t.cuda()), kernels.pack_ternary(t), strict=True):
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

    kernels.binary_matmul(kernels.pack_bits(torch.randn(200, 64).cuda()), kernels.pack_bits(torch.randn(9, 64).cuda()),
                          64)
    fn = cuda_runtime.get_kernel("binary_gemm_tc.cu", "packed_gemm_tc", torch.cuda.current_device())
    assert fn.local_size_bytes == 0


def test_gemv_row_variants_cover_up_to_max():
    assert cuda_matmul._gemv_rows(1) == 1 and cuda_matmul._gemv_rows(9) == 16


def test_m_beyond_65535_tiles_launches():
    """M tiles live on gridDim.x: more than 65535 x 128 rows (a large binary conv's M) must run."""
    m, n, k = 65535 * 128 + 1, 3, 64
    g = torch.Generator().manual_seed(5)
    # k = 64: one word per row with no pad bits, so random words are valid packed rows
    a_bits = torch.randint(-(2**63), 2**63 - 1, (m, 1), dtype=torch.int64, generator=g)
    b_bits = torch.randint(-(2**63), 2**63 - 1, (n, 1), dtype=torch.int64, generator=g)
    expected = kernels.binary_matmul(a_bits, b_bits, k, path="popcount")
    for kernel in ("gemm", "tc"):
        got = kernels.binary_matmul(a_bits.cuda(), b_bits.cuda(), k, path=kernel)
        assert torch.equal(got.cpu(), expected), kernel


def test_gemv_with_b_at_an_odd_word_offset(poisoned):
    """A contiguous view 8 bytes past a 16-byte boundary must take the 8-byte-load GEMV."""
    k, n = 256, 70
    g = torch.Generator().manual_seed(6)
    a_bits = kernels.pack_bits(torch.randn(5, k, generator=g))
    b_bits = kernels.pack_bits(torch.randn(n, k, generator=g))
    storage = torch.zeros(1 + b_bits.numel(), dtype=torch.int64, device="cuda")
    view = storage[1:].view(n, -1)
    view.copy_(b_bits.cuda())
    assert view.is_contiguous() and view.data_ptr() % 16 == 8
    got = run_twice(lambda: kernels.binary_matmul(a_bits.cuda(), view, k, path="gemv"))
    torch.cuda.synchronize()  # a misaligned load would have killed the context here
    assert torch.equal(got.cpu(), kernels.binary_matmul(a_bits, b_bits, k))


def test_epilogue_on_gpu_keeps_subnormals_and_detaches_parameters():
    acc = torch.tensor([[3, -7, 1, 100]], dtype=torch.int32)
    mul = torch.nn.Parameter(torch.tensor([1e-40, 1e-41, 2e-45, 1e-39]))
    add = torch.nn.Parameter(torch.zeros(4))
    expected = kernels.epilogue(acc, scale=mul, bias=add)
    assert (expected != 0).all()
    got = kernels.epilogue(acc.cuda(), scale=mul.cuda(), bias=add.cuda())
    assert not got.requires_grad and torch.equal(got.cpu(), expected)


def test_sign_pack_nan_raises_on_gpu_as_on_cpu():
    acc = torch.zeros(2, 3, dtype=torch.int32)
    mul = torch.tensor([1.0, float("inf"), 1.0], dtype=torch.float64)  # 0 * inf = NaN
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="finite"):
            kernels.epilogue(acc.to(device), mul_add=(mul.to(device), 0.0), sign_pack=True)
