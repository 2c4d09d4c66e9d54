"""CUDA paths of the packed matmuls: kernel choice and launch geometry (kernels in ``*.cu``).

Choice, for ``C[M, N]`` with ``W`` words per row:

* ``M <= 16`` and the A rows fit in shared memory -> ``packed_gemv`` (binary_gemv.cu): weight
  streaming, the memory-bound small-batch regime; 16-byte loads when ``W`` is even.
* otherwise binary -> ``packed_gemm_tc`` (binary_gemm_tc.cu, b1 tensor cores, AND identity
  ``dot = K - 2 (pa + pb) + 4 popc(a & b)``), or ``packed_gemm<1>`` (binary_gemm.cu, CUDA
  cores) with ``tensor_cores=False``; ternary -> ``packed_gemm<2>``.

All outputs are allocated by torch on the operands' device; launches go on torch's current stream.
"""

from __future__ import annotations

import torch

from . import cuda_runtime
from .sources import GEMV_MAX_ROWS, GEMV_ROW_VARIANTS

__all__ = ["binary_matmul", "ternary_matmul", "row_popcount"]

_BLOCK = 256
_WARPS = _BLOCK // 32
_MAX_GEMV_SHARED = 160 * 1024  # well under the 227 KiB opt-in limit of sm_90
_TILE = 128


def _gemv_rows(m: int) -> int:
    return next(r for r in GEMV_ROW_VARIANTS if r >= m)


def _use_gemv(m: int, words: int, planes: int) -> bool:
    return m <= GEMV_MAX_ROWS and planes * _gemv_rows(m) * words * 8 <= _MAX_GEMV_SHARED


def _gemv(a_planes, b_planes, k: int, out: torch.Tensor) -> None:
    planes = len(a_planes)
    m, words = a_planes[0].shape
    n = b_planes[0].shape[0]
    rows = _gemv_rows(m)
    vec = 2 if words % 2 == 0 else 1
    device = out.device.index
    blocks = min(-(-n // _WARPS), 8 * cuda_runtime.device_sm_count(device))
    cuda_runtime.launch(
        "binary_gemv.cu",
        f"packed_gemv<{planes}, {rows}, {vec}>",
        device,
        (blocks,),
        (_BLOCK,),
        (a_planes[0], a_planes[-1], b_planes[0], b_planes[-1], out, m, n, words, k),
        shared_mem=planes * rows * words * 8,
    )


def _gemm(a_planes, b_planes, k: int, out: torch.Tensor) -> None:
    planes = len(a_planes)
    m, words = a_planes[0].shape
    n = b_planes[0].shape[0]
    cuda_runtime.launch(
        "binary_gemm.cu",
        f"packed_gemm<{planes}>",
        out.device.index,
        (-(-n // _TILE), -(-m // _TILE)),
        (_BLOCK,),
        (a_planes[0], a_planes[-1], b_planes[0], b_planes[-1], out, m, n, words, k),
    )


def row_popcount(bits: torch.Tensor) -> torch.Tensor:
    """Set bits per row of packed words [R, W] -> int32 [R] (one warp per row)."""
    rows, words = bits.shape
    out = torch.empty(rows, dtype=torch.int32, device=bits.device)
    cuda_runtime.launch(
        "binary_gemm_tc.cu",
        "row_popcount",
        bits.device.index,
        (-(-rows // _WARPS),),
        (_BLOCK,),
        (bits, out, rows, words),
    )
    return out


def _gemm_tc(a_bits, b_bits, k: int, out: torch.Tensor) -> None:
    m, words = a_bits.shape
    n = b_bits.shape[0]
    pa, pb = row_popcount(a_bits), row_popcount(b_bits)
    cuda_runtime.launch(
        "binary_gemm_tc.cu",
        "packed_gemm_tc",
        out.device.index,
        (-(-n // _TILE), -(-m // _TILE)),
        (_BLOCK,),
        (a_bits, b_bits, pa, pb, out, m, n, words, k),
    )


def _output(m: int, n: int, device) -> torch.Tensor:
    return torch.empty((m, n), dtype=torch.int32, device=device)


def binary_matmul(
    a_bits: torch.Tensor, b_bits: torch.Tensor, k: int, *, kernel: str = "auto"
) -> torch.Tensor:
    """Exact +-1 dot products on CUDA; ``kernel`` in {'auto', 'gemv', 'gemm', 'tc'}."""
    m, words = a_bits.shape
    out = _output(m, b_bits.shape[0], a_bits.device)
    if m == 0 or out.numel() == 0:
        return out
    if kernel == "auto":
        kernel = "gemv" if _use_gemv(m, words, 1) else "tc"
    if kernel == "gemv":
        if not _use_gemv(m, words, 1):
            raise ValueError(f"gemv kernel needs M <= {GEMV_MAX_ROWS} and A in shared memory; got M={m}")
        _gemv((a_bits,), (b_bits,), k, out)
    elif kernel == "gemm":
        _gemm((a_bits,), (b_bits,), k, out)
    elif kernel == "tc":
        _gemm_tc(a_bits, b_bits, k, out)
    else:
        raise ValueError(f"kernel must be 'auto', 'gemv', 'gemm' or 'tc', got {kernel!r}")
    return out


def ternary_matmul(a_planes, b_planes, k: int, *, kernel: str = "auto") -> torch.Tensor:
    """Exact ternary dot products on CUDA; ``kernel`` in {'auto', 'gemv', 'gemm'}."""
    m, words = a_planes[0].shape
    out = _output(m, b_planes[0].shape[0], a_planes[0].device)
    if m == 0 or out.numel() == 0:
        return out
    if kernel == "auto":
        kernel = "gemv" if _use_gemv(m, words, 2) else "gemm"
    if kernel == "gemv":
        if not _use_gemv(m, words, 2):
            raise ValueError(f"gemv kernel needs M <= {GEMV_MAX_ROWS} and A in shared memory; got M={m}")
        _gemv(tuple(a_planes), tuple(b_planes), k, out)
    elif kernel == "gemm":
        _gemm(tuple(a_planes), tuple(b_planes), k, out)
    else:
        raise ValueError(f"kernel must be 'auto', 'gemv' or 'gemm' for ternary, got {kernel!r}")
    return out
