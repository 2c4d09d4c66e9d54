"""Public packed matmuls: exact int32 dot products of +-1 (binary) or {-1,0,+1} (ternary) matrices.

Layout is nn.Linear's: ``A[M, K]`` (activations) times ``B[N, K]^T`` (weights) -> ``C[M, N]``, both
operands packed along K by :mod:`kernels.packing`.  This module only validates and dispatches:
CPU tensors go to :mod:`kernels.cpu_matmul` (NumPy popcount or torch._int_mm), CUDA tensors to the
CuPy kernels in :mod:`kernels.cuda_matmul` (imported lazily, so ``import kernels`` needs no CuPy).

Results are exact: ``|dot| <= K < 2**31`` always fits int32.
"""

from __future__ import annotations

import torch

from . import cpu_matmul
from .packing import _check_planes, check_packed

__all__ = ["binary_matmul", "ternary_matmul"]

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
    device.  ``path``: 'auto', or on CPU 'popcount' / 'int_mm' (:mod:`kernels.cpu_matmul`), on CUDA
    'gemv' / 'gemm' / 'tc' (:mod:`kernels.cuda_matmul`).
    """
    _check_pair(a_bits, b_bits, k, "a_bits", "b_bits")
    a_bits, b_bits = a_bits.contiguous(), b_bits.contiguous()
    if a_bits.is_cuda:
        from . import cuda_matmul

        return cuda_matmul.binary_matmul(a_bits, b_bits, k, kernel=path)
    chosen = cpu_matmul.choose_cpu_path(a_bits.shape[0], path)
    return _CPU_IMPL["binary", chosen](a_bits, b_bits, k)


def ternary_matmul(a_planes, b_planes, k: int, *, path: str = "auto") -> torch.Tensor:
    """Exact ``C = A @ B^T`` for ternary matrices given ``(sign, nonzero)`` planes from pack_ternary.

    ``C[i, j] = popc(ma & mb) - 2 * popc(ma & mb & (sa ^ sb))`` summed over words.
    Returns int32 [M, N].  ``path`` as in :func:`binary_matmul` (no 'tc' for ternary).
    """
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
    return _CPU_IMPL["ternary", chosen]((sa, ma), (sb, mb), k)
