"""CUDA paths of the packed matmuls: kernel choice and launch geometry (kernels in ``*.cu``).

Choice, for ``C[M, N]`` with ``W`` words per row:

* ``M <= 16`` and the A rows fit in shared memory -> ``packed_gemv`` (binary_gemv.cu): weight
  streaming, the memory-bound small-batch regime; 16-byte loads of B when ``W`` is even **and**
  B's planes start on a 16-byte boundary (:func:`gemv_vector_words`; a contiguous view at an odd
  word offset is valid input and gets the 8-byte variant instead of a misaligned-address fault).
* otherwise binary -> ``packed_gemm_tc`` (binary_gemm_tc.cu, b1 tensor cores, AND identity
  ``dot = K - 2 (pa + pb) + 4 popc(a & b)``), or ``packed_gemm<1>`` (binary_gemm.cu, CUDA
  cores) with ``tensor_cores=False``; ternary -> ``packed_gemm<2>``.

The tiled GEMMs run one CTA per 128 x 128 output tile on the grid :func:`tile_grid`: M tiles on
``gridDim.x`` (limit 2^31 - 1) and N tiles on ``gridDim.y`` (limit 65535), because M is the axis
that grows with the data (a binary conv's M is batch x Ho x Wo, which passes 65535 x 128 = 8.4 M
at e.g. batch 512 of 128 x 128 maps) while N is a layer's output width.

All outputs are allocated by torch on the operands' device; launches go on torch's current stream.
"""

from __future__ import annotations

import torch

from . import cuda_runtime
from .cuda_runtime import GRID_LIMITS, INT32_MAX
from .sources import GEMV_MAX_ROWS, GEMV_ROW_VARIANTS

__all__ = ["binary_matmul", "ternary_matmul", "row_popcount", "tile_grid", "gemv_vector_words"]

_BLOCK = 256
_WARPS = _BLOCK // 32
_MAX_GEMV_SHARED = 160 * 1024  # well under the 227 KiB opt-in limit of sm_90
_TILE = 128


def tile_grid(m: int, n: int, tile: int = _TILE) -> tuple[int, int]:
    """Grid ``(ceil(M / tile), ceil(N / tile))`` of the tiled GEMMs: M tiles on x, N tiles on y.

    Raises ValueError (instead of a failed launch) when N needs more than 65535 tiles or M is so
    large that the kernels' int32 row index ``m0 + row`` could overflow.
    """
    if m < 1 or n < 1:
        raise ValueError(f"tile_grid needs M, N >= 1, got M={m}, N={n}")
    if m > INT32_MAX - tile:
        raise ValueError(f"M = {m} rows exceed the kernels' int32 indexing (at most {INT32_MAX - tile})")
    grid = (-(-m // tile), -(-n // tile))
    if grid[1] > GRID_LIMITS[1]:
        raise ValueError(f"N = {n} columns need {grid[1]} tiles of {tile}; CUDA's gridDim.y allows {GRID_LIMITS[1]}")
    return grid


def gemv_vector_words(words: int, *data_ptrs: int) -> int:
    """Words per global load of B in the GEMV: 2 (one 16-byte load) or 1.

    A 16-byte load needs a 16-byte-aligned address: row ``n`` of a plane starts at
    ``data_ptr + 8 W n``, so every plane's ``data_ptr`` must be 16-byte aligned and ``W`` even.
    """
    if words % 2 == 0 and all(p % 16 == 0 for p in data_ptrs):
        return 2
    return 1


def _gemv_rows(m: int) -> int:
    return next(r for r in GEMV_ROW_VARIANTS if r >= m)


def _use_gemv(m: int, words: int, planes: int) -> bool:
    return m <= GEMV_MAX_ROWS and planes * _gemv_rows(m) * words * 8 <= _MAX_GEMV_SHARED


def _gemv(a_planes, b_planes, k: int, out: torch.Tensor) -> None:
    planes = len(a_planes)
    m, words = a_planes[0].shape
    n = b_planes[0].shape[0]
    rows = _gemv_rows(m)
    vec = gemv_vector_words(words, *(p.data_ptr() for p in b_planes))
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
        tile_grid(m, n),
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
        tile_grid(m, n),
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
