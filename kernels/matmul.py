"""Public packed matmuls: exact int32 dot products of +-1 (binary) or {-1,0,+1} (ternary) matrices.

Layout is nn.Linear's: ``A[M, K]`` (activations) times ``B[N, K]^T`` (weights) -> ``C[M, N]``, both
operands packed along K by :mod:`kernels.packing`.  This module only validates and dispatches:
CPU tensors go to the native engine (:mod:`kernels.cpu_native`) where it is available, else to
:mod:`kernels.cpu_matmul` (NumPy popcount or torch._int_mm); CUDA tensors to the CuPy kernels in
:mod:`kernels.cuda_matmul` (imported lazily, so ``import kernels`` needs no CuPy).

Weights used many times can be prepacked once for the native engine (:func:`prepack_binary`,
:func:`prepack_ternary`) and passed in place of their packed words.

Results are exact: ``|dot| <= K < 2**31`` always fits int32.
"""

from __future__ import annotations

import torch

from . import cpu_matmul, cpu_native, native
from .packing import _check_planes, check_packed

__all__ = ["binary_matmul", "ternary_matmul", "prepack_binary", "prepack_ternary", "PrepackedBinary",
           "PrepackedTernary"]


def _native_ready(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and native.available()


class PrepackedBinary:
    """Packed weights ``b_bits[N, W]`` plus their native panel layout (built once, here)."""

    def __init__(self, b_bits: torch.Tensor, k: int):
        check_packed(b_bits, k, "b_bits")
        self.bits, self.k = b_bits, k
        self.native = cpu_native.prepack_linear(b_bits, k) if _native_ready(b_bits) else None


class PrepackedTernary:
    """Ternary weight planes plus their native panel layout (built once, here)."""

    def __init__(self, b_planes, k: int):
        sign, nonzero = _check_planes(b_planes, "b_planes")
        check_packed(sign, k, "b_planes")
        self.planes, self.k = (sign, nonzero), k
        self.native = cpu_native.ternary_prepack((sign, nonzero), k) if _native_ready(sign) else None


def _unwrap(b, prepacked_type, k: int):
    """(packed operand, its prepacked form or None) of a weight argument that may be prepacked."""
    if not isinstance(b, prepacked_type):
        return b, None
    if b.k != k:
        raise ValueError(f"the prepacked weights have k={b.k}, not {k}")
    return (b.bits if prepacked_type is PrepackedBinary else b.planes), b


def prepack_binary(b_bits: torch.Tensor, k: int) -> PrepackedBinary:
    """Prepare weights for many :func:`binary_matmul` calls (the native panel layout on CPU)."""
    return PrepackedBinary(b_bits, k)


def prepack_ternary(b_planes, k: int) -> PrepackedTernary:
    """Prepare ternary weights for many :func:`ternary_matmul` calls (the native layout on CPU)."""
    return PrepackedTernary(b_planes, k)

_CPU_IMPL = {
    ("binary", "popcount"): cpu_matmul.popcount_binary,
    ("binary", "int_mm"): cpu_matmul.int_mm_binary,
    ("ternary", "popcount"): cpu_matmul.popcount_ternary,
    ("ternary", "int_mm"): cpu_matmul.int_mm_ternary,
}


def _check_pair(a: torch.Tensor, b: torch.Tensor, k: int, a_name: str, b_name: str):
    words_a = check_packed(a, k, a_name)
    words_b = check_packed(b, k, b_name)
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"{a_name} and {b_name} must be 2-D [rows, words], got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if words_a != words_b:
        raise ValueError(
            f"word counts differ: {a_name} has {words_a}, {b_name} has {words_b} (same K needed)"
        )
    if a.device != b.device:
        raise ValueError(f"{a_name} is on {a.device} but {b_name} is on {b.device}")
    if a.device.type not in ("cpu", "cuda"):
        raise ValueError(f"packed matmul runs on cpu or cuda tensors, got device {a.device}")


def binary_matmul(
    a_bits: torch.Tensor, b_bits: torch.Tensor, k: int, *, path: str = "auto"
) -> torch.Tensor:
    """Exact ``C = A @ B^T`` for +-1 matrices given packed ``a_bits[M, W]``, ``b_bits[N, W]``.

    ``C[i, j] = sum_k A[i,k] B[j,k] = K - 2 * popcount(a_i XOR b_j)`` (pad bits are 0 in both).
    ``k`` is the true number of elements (``k <= 64 W``).  Returns int32 [M, N] on the inputs'
    device.  ``path``: 'auto', or on CPU 'native' (:mod:`kernels.cpu_native`), 'popcount' /
    'int_mm' (:mod:`kernels.cpu_matmul`), on CUDA 'gemv' / 'gemm' / 'tc' (:mod:`kernels.cuda_matmul`).
    ``b_bits`` may be a :func:`prepack_binary` result (CPU).
    """
    if path == "auto" and isinstance(b_bits, PrepackedBinary) and b_bits.native is not None and b_bits.k == k:
        # The common call (prepacked weights, native engine) in as few steps as checking it takes: a
        # layer's weights come from memory anyway, and every Python step between is a cache miss more.
        if (isinstance(a_bits, torch.Tensor) and a_bits.dtype == torch.int64 and a_bits.dim() == 2
                and a_bits.device.type == "cpu" and a_bits.shape[1] == b_bits.native.group_words):
            return cpu_native.linear_plan(a_bits.shape[0], b_bits.native).run(a_bits.contiguous())
    b_bits, prepacked = _unwrap(b_bits, PrepackedBinary, k)
    _check_pair(a_bits, b_bits, k, "a_bits", "b_bits")
    a_bits, b_bits = a_bits.contiguous(), b_bits.contiguous()
    if a_bits.is_cuda:
        from . import cuda_matmul

        return cuda_matmul.binary_matmul(a_bits, b_bits, k, kernel=path)
    chosen = cpu_matmul.choose_cpu_path(a_bits.shape[0], path)
    if chosen == "native":
        if prepacked is not None and prepacked.native:
            weights = prepacked.native
        else:
            weights = cpu_native.prepack_linear(b_bits, k)
        return cpu_native.linear(a_bits, weights)
    return _CPU_IMPL["binary", chosen](a_bits, b_bits, k)


def ternary_matmul(a_planes, b_planes, k: int, *, path: str = "auto") -> torch.Tensor:
    """Exact ``C = A @ B^T`` for ternary matrices given ``(sign, nonzero)`` planes from pack_ternary.

    ``C[i, j] = popc(ma & mb) - 2 * popc(ma & mb & (sa ^ sb))`` summed over words.
    Returns int32 [M, N].  ``path`` as in :func:`binary_matmul` (no 'tc' for ternary);
    ``b_planes`` may be a :func:`prepack_ternary` result (CPU).
    """
    b_planes, prepacked = _unwrap(b_planes, PrepackedTernary, k)
    sa, ma = _check_planes(a_planes, "a_planes")
    sb, mb = _check_planes(b_planes, "b_planes")
    _check_pair(sa, sb, k, "a_planes", "b_planes")
    if ma.device != sa.device or mb.device != sb.device:
        raise ValueError("both planes of an operand must be on the same device")
    sa, ma, sb, mb = (p.contiguous() for p in (sa, ma, sb, mb))
    if sa.is_cuda:
        from . import cuda_matmul

        return cuda_matmul.ternary_matmul((sa, ma), (sb, mb), k, kernel=path)
    chosen = cpu_matmul.choose_cpu_path(sa.shape[0], path)
    if chosen == "native":
        weights = (prepacked.native if prepacked is not None and prepacked.native
                   else cpu_native.ternary_prepack((sb, mb), k))
        return cpu_native.ternary_matmul((sa, ma), weights)
    return _CPU_IMPL["ternary", chosen]((sa, ma), (sb, mb), k)
