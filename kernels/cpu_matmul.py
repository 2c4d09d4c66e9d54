"""CPU paths of the packed binary / ternary matmul (exact int32 results).

Two exact routes, chosen by :func:`choose_cpu_path`:

``popcount`` -- NumPy 2 ``np.bitwise_count`` on **uint64** views of the packed words (on signed
    dtypes it counts the bits of ``|x|``, so the words are never read as int64).  The output is
    cut into tiles small enough that the XOR / popcount temporaries stay in cache, and the tiles
    run on a thread pool (NumPy ufuncs release the GIL, so both cores work).  Formulas::

        binary:   dot = K - 2 * sum_w popc(a_w ^ b_w)
        ternary:  dot = sum_w popc(ma_w & mb_w) - 2 * popc(ma_w & mb_w & (sa_w ^ sb_w))

    Best for small M (GEMV), where it touches each packed weight word once per row of A.

``int_mm`` -- unpack to int8 and use ``torch._int_mm`` (VNNI, int32 accumulation; exact).
    Binary operands are unpacked to their **0/1 bits**, not to +-1, which saves a pass; with
    ``pa, pb`` the row popcounts the AND identity gives
    ``dot = K - 2 * (pa + pb) + 4 * (bits_a . bits_b)``.  Ternary operands are unpacked to their
    int8 values ``m * (1 - 2 s)`` and multiplied directly.  B is unpacked in row blocks so the
    int8 temporary stays bounded.  ``torch._int_mm`` is a private API: it is feature-detected once
    and the path is skipped where it is missing or wrong.

Pad bits (wherever they sit, e.g. per-tap channel padding in conv) must be 0 in both operands;
they then add nothing to any popcount or product, so ``K`` is the number of real elements.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = [
    "popcount_binary",
    "popcount_ternary",
    "int_mm_binary",
    "int_mm_ternary",
    "int_mm_available",
    "choose_cpu_path",
    "INT_MM_MIN_ROWS",
]

# Temporaries per popcount tile (XOR words + uint8 counts): ~L2-sized.  Measured on 2 cores,
# 2 MiB beat 128 KiB - 1 MiB tiles: per-tile NumPy call overhead outweighs the cache misses.
TILE_BYTES = 2 * 1024 * 1024
# Rows of B unpacked to int8 at once on the int_mm path (bounds the temporary at BLOCK_ROWS * K).
INT_MM_BLOCK_ROWS = 2048
# From M = INT_MM_MIN_ROWS on, int_mm beats popcount (benchmarks/kernels.py at N=K=4096 on a
# 2-core Zen 4: popcount cost grows with M, int_mm's is dominated by the one-off unpack of B).
INT_MM_MIN_ROWS = 16

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _workers() -> int:
    return max(1, min(os.cpu_count() or 1, torch.get_num_threads(), 8))


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="kernels-cpu")
        return _pool


def as_uint64(words: torch.Tensor) -> np.ndarray:
    """Zero-copy uint64 NumPy view of contiguous int64 CPU words (never count bits on int64)."""
    return words.contiguous().numpy().view(np.uint64)


def _tiles(m: int, n: int, words: int, planes: int) -> list[tuple[int, int, int, int]]:
    """Split the [m, n] output into tiles whose temporaries fit ``TILE_BYTES``."""
    per_pair = words * (8 + 1) * planes
    pairs = max(1, TILE_BYTES // per_pair)
    mb = max(1, min(m, 4, pairs))  # a few rows of A broadcast against many rows of B
    row_blocks = -(-m // mb)
    col_blocks = -(-n // max(1, pairs // mb))
    # Round the tile count up to a multiple of the workers so no core idles at the end (M = 1).
    workers = _workers()
    wanted = -(-(row_blocks * col_blocks) // workers) * workers
    col_blocks = min(n, max(col_blocks, -(-wanted // row_blocks)))
    nb = -(-n // col_blocks)
    return [
        (i, min(i + mb, m), j, min(j + nb, n)) for i in range(0, m, mb) for j in range(0, n, nb)
    ]


def _run_tiles(tile_fn, tiles) -> None:
    if len(tiles) == 1 or _workers() == 1:
        for t in tiles:
            tile_fn(*t)
        return
    for future in [_thread_pool().submit(tile_fn, *t) for t in tiles]:
        future.result()


def _sum_counts(counts: np.ndarray) -> np.ndarray:
    """Sum uint8 popcounts over the word axis into int32 (einsum avoids a slow cast pass)."""
    return np.einsum("...w->...", counts, dtype=np.int32)


def popcount_binary(a_bits: torch.Tensor, b_bits: torch.Tensor, k: int) -> torch.Tensor:
    """``dot[i, j] = K - 2 * sum_w popc(a[i, w] ^ b[j, w])`` with NumPy bitwise_count."""
    a, b = as_uint64(a_bits), as_uint64(b_bits)
    m, n, words = a.shape[0], b.shape[0], a.shape[1]
    out = np.empty((m, n), dtype=np.int32)

    def tile(i0, i1, j0, j1):
        x = np.bitwise_xor(a[i0:i1, None, :], b[None, j0:j1, :])
        hamming = _sum_counts(np.bitwise_count(x))
        np.subtract(k, 2 * hamming, out=out[i0:i1, j0:j1])

    _run_tiles(tile, _tiles(m, n, words, planes=1))
    return torch.from_numpy(out)


def popcount_ternary(a_planes, b_planes, k: int) -> torch.Tensor:
    """``dot = sum_w popc(ma & mb) - 2 * popc(ma & mb & (sa ^ sb))`` with NumPy bitwise_count."""
    sa, ma = (as_uint64(p) for p in a_planes)
    sb, mb = (as_uint64(p) for p in b_planes)
    m, n, words = sa.shape[0], sb.shape[0], sa.shape[1]
    out = np.empty((m, n), dtype=np.int32)

    def tile(i0, i1, j0, j1):
        both = np.bitwise_and(ma[i0:i1, None, :], mb[None, j0:j1, :])
        differ = np.bitwise_xor(sa[i0:i1, None, :], sb[None, j0:j1, :])
        np.bitwise_and(differ, both, out=differ)
        nonzero = _sum_counts(np.bitwise_count(both))
        negative = _sum_counts(np.bitwise_count(differ))
        np.subtract(nonzero, 2 * negative, out=out[i0:i1, j0:j1])

    _run_tiles(tile, _tiles(m, n, words, planes=2))
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=1)
def int_mm_available() -> bool:
    """Feature-detect ``torch._int_mm`` on CPU (private API): exists, accepts our shapes, exact."""
    fn = getattr(torch, "_int_mm", None)
    if fn is None:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(-1, 2, (17, 64), dtype=torch.int8, generator=gen)
        b = torch.randint(-1, 2, (24, 64), dtype=torch.int8, generator=gen)
        got = fn(a, b.t())
        return got.dtype == torch.int32 and torch.equal(got.long(), a.long() @ b.long().t())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _unpack01(words: np.ndarray) -> torch.Tensor:
    """uint64 words [R, W] -> int8 0/1 bits [R, 64 W] (pad bits included; they are 0)."""
    flat = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    return torch.from_numpy(flat.view(np.int8))


def _ternary_values(sign: np.ndarray, nonzero: np.ndarray) -> torch.Tensor:
    """Planes -> int8 values m * (1 - 2 s) over the padded width (pad: m = 0 -> 0)."""
    s, m = _unpack01(sign), _unpack01(nonzero)
    return m - 2 * (s & m)


def _int_mm_blocked(a_op: torch.Tensor, n: int, b_block, finish) -> torch.Tensor:
    """out[:, j0:j1] = finish(_int_mm(a_op, B_op[j0:j1].T), j0, j1), B unpacked block by block."""
    out = torch.empty((a_op.shape[0], n), dtype=torch.int32)
    for j0 in range(0, n, INT_MM_BLOCK_ROWS):
        j1 = min(j0 + INT_MM_BLOCK_ROWS, n)
        b_op = b_block(j0, j1)
        out[:, j0:j1] = finish(torch._int_mm(a_op, b_op.t()), b_op, j0, j1)
    return out


def _row_popcounts(words: np.ndarray) -> torch.Tensor:
    """Set bits per row of uint64 words, int32 [R] (bitwise_count: far cheaper than summing bits)."""
    return torch.from_numpy(_sum_counts(np.bitwise_count(words)))


def int_mm_binary(a_bits: torch.Tensor, b_bits: torch.Tensor, k: int) -> torch.Tensor:
    """``dot = K - 2 (pa + pb) + 4 * (bits_a . bits_b)`` with 0/1 int8 operands and _int_mm."""
    a, b = as_uint64(a_bits), as_uint64(b_bits)
    pa = _row_popcounts(a)

    def finish(both, b01, j0, j1):
        pb = _row_popcounts(b[j0:j1])
        return k - 2 * (pa[:, None] + pb[None, :]) + 4 * both

    return _int_mm_blocked(_unpack01(a), b.shape[0], lambda j0, j1: _unpack01(b[j0:j1]), finish)


def int_mm_ternary(a_planes, b_planes, k: int) -> torch.Tensor:
    """``dot = values_a . values_b`` with int8 values in {-1, 0, 1} and _int_mm."""
    sa, ma = (as_uint64(p) for p in a_planes)
    sb, mb = (as_uint64(p) for p in b_planes)
    a_val = _ternary_values(sa, ma)
    return _int_mm_blocked(
        a_val,
        sb.shape[0],
        lambda j0, j1: _ternary_values(sb[j0:j1], mb[j0:j1]),
        lambda prod, b_val, j0, j1: prod,
    )


def choose_cpu_path(m: int, path: str = "auto") -> str:
    """'popcount' or 'int_mm': explicit choice if given, else int_mm from INT_MM_MIN_ROWS rows."""
    if path not in ("auto", "popcount", "int_mm"):
        raise ValueError(f"path must be 'auto', 'popcount' or 'int_mm', got {path!r}")
    if path == "int_mm":
        if not int_mm_available():
            raise ValueError("path='int_mm' requested but torch._int_mm is unavailable on CPU here")
        return path
    if path == "popcount":
        return path
    return "int_mm" if m >= INT_MM_MIN_ROWS and int_mm_available() else "popcount"
