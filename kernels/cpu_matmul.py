"""CPU paths of the packed binary / ternary matmul (exact int32 results).

The NumPy routes of the packed matmul, the reference the native engine (:mod:`kernels.native`,
preferred by :func:`choose_cpu_path` wherever it builds) is tested against, and the fallback where
it does not.  Two exact routes:

``popcount`` -- NumPy 2 ``np.bitwise_count`` on **uint64** views of the packed words (on signed
    dtypes it counts the bits of ``|x|``, so the words are never read as int64).  The output is
    cut into tiles small enough that the XOR / popcount temporaries stay in cache, and the tiles
    run on a thread pool (NumPy ufuncs release the GIL, so both cores work).  Formulas::

        binary:   dot = K - 2 * sum_w popc(a_w ^ b_w)
        ternary:  dot = sum_w popc(ma_w & mb_w) - 2 * popc(ma_w & mb_w & (sa_w ^ sb_w))

    Best for small M (GEMV), where it touches each packed weight word once per row of A.

``int_mm`` -- unpack to int8 and use ``torch._int_mm`` (int32 accumulation; exact).
    Binary operands are unpacked to their **0/1 bits**, not to +-1, which saves a pass; with
    ``pa, pb`` the row popcounts the AND identity gives
    ``dot = K - 2 * (pa + pb) + 4 * (bits_a . bits_b)``.  Ternary operands are unpacked to their
    int8 values ``m * (1 - 2 s)`` and multiplied directly.  B is unpacked in row blocks so the
    int8 temporary stays bounded.  ``torch._int_mm`` is a private API: it is feature-detected once
    (:func:`int_mm_available`) and the path is never used where it is missing or wrong.

Which route is *fast* depends on the CPU, not on whether the API exists: int8 GEMMs are fast
only with int8 dot-product instructions (x86 VNNI: ``avx512_vnni`` / ``avx_vnni``, or AMX).
Without them (e.g. an AVX2-only AMD EPYC) ``torch._int_mm`` runs ~16x slower than float32
``F.linear`` and ~20-40x slower than popcount.  ``path='auto'`` therefore decides with
:func:`decide_cpu_path`, a pure function of M and two facts about this machine:

* ``int_mm_fast`` -- from the CPU's feature flags (:func:`cpu_info`, parsed from
  ``/proc/cpuinfo``; :func:`int8_dot_from_features`): an x86 CPU with VNNI/AMX-int8 -> True,
  an x86 CPU whose flags lack them -> False.  Where the flags say nothing (non-x86, no
  ``/proc/cpuinfo``) a one-time calibration (:func:`calibrate_int_mm`) times both routes on a
  small shape and keeps the faster.  Cached for the process (:func:`int_mm_fast`).
* ``int_mm_available()`` -- the private API exists here and is exact.

``int_mm`` is chosen iff both hold and ``M >= INT_MM_MIN_ROWS``; otherwise ``popcount``.

Pad bits (wherever they sit, e.g. per-tap channel padding in conv) must be 0 in both operands;
they then add nothing to any popcount or product, so ``K`` is the number of real elements.
"""

from __future__ import annotations

import functools
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "popcount_binary",
    "popcount_ternary",
    "int_mm_binary",
    "int_mm_ternary",
    "int_mm_available",
    "choose_cpu_path",
    "decide_cpu_path",
    "CpuInfo",
    "cpu_info",
    "parse_cpuinfo",
    "int8_dot_from_features",
    "calibrate_int_mm",
    "int_mm_fast",
    "INT_MM_MIN_ROWS",
    "INT8_DOT_FLAGS",
]

# Temporaries per popcount tile (XOR words + uint8 counts): ~L2-sized.  Measured on 2 cores,
# 2 MiB beat 128 KiB - 1 MiB tiles: per-tile NumPy call overhead outweighs the cache misses.
TILE_BYTES = 2 * 1024 * 1024
# Rows of B unpacked to int8 at once on the int_mm path (bounds the temporary at BLOCK_ROWS * K).
INT_MM_BLOCK_ROWS = 2048
# On a CPU with VNNI, from M = INT_MM_MIN_ROWS on int_mm beats popcount (benchmarks/kernels.py at
# N=K=4096 on a 2-core Zen 4 with avx512_vnni: popcount cost grows with M, int_mm's is dominated by
# the one-off unpack of B).  Without VNNI it never does (see the module docstring).
INT_MM_MIN_ROWS = 16
# /proc/cpuinfo flags of x86 int8 dot-product hardware that makes torch._int_mm (oneDNN) fast.
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8"})
# Calibration shape (M, N, K) for CPUs whose flags say nothing; M >= INT_MM_MIN_ROWS.
CALIBRATION_SHAPE = (64, 256, 1024)
CALIBRATION_MARGIN = 1.25

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


@dataclass(frozen=True)
class CpuInfo:
    """What the dispatch knows about this CPU: model name, ISA, feature flags, torch's SIMD level."""

    model: str
    machine: str  # platform.machine(): 'x86_64', 'AMD64', 'aarch64', ...
    flags: frozenset  # /proc/cpuinfo 'flags' (x86) or 'Features' (ARM); empty if unknown
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): 'AVX2', 'AVX512', ...

    @property
    def is_x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i386", "i686", "x86")

    def describe(self) -> str:
        """One line for logs and RESULTS.md: model, ISA, the flags that matter here, torch level."""
        shown = sorted(f for f in self.flags if f in INT8_DOT_FLAGS or f in ("avx2", "avx512f", "avx512bw", "popcnt"))
        missing = sorted((INT8_DOT_FLAGS | {"avx512f"}) - self.flags) if self.is_x86 and self.flags else []
        return (
            f"{self.model or 'unknown CPU'} ({self.machine}; flags: {' '.join(shown) or 'none of interest'}"
            f"{'; no ' + '/'.join(missing) if missing else ''}; torch CPU capability {self.torch_capability})"
        )


def parse_cpuinfo(text: str) -> tuple[str, frozenset]:
    """(model name, feature flags) of the first processor in ``/proc/cpuinfo`` text."""
    model, flags = "", None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and flags is None:
            flags = frozenset(value.split())
    return model, flags or frozenset()


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (read once; flags empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model, flags = parse_cpuinfo(f.read())
    except OSError:
        model, flags = "", frozenset()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return CpuInfo(model or platform.processor(), platform.machine(), flags, capability)


def int8_dot_from_features(info: CpuInfo) -> bool | None:
    """True / False when the flags tell whether int8 GEMMs are fast here, None when they cannot.

    x86 with known flags: True iff any of :data:`INT8_DOT_FLAGS`.  Anything else (ARM, whose int8
    GEMM speed depends on the build; no flags at all): None, i.e. calibrate.
    """
    if info.is_x86 and info.flags:
        return bool(info.flags & INT8_DOT_FLAGS)
    return None


def calibrate_int_mm(shape=CALIBRATION_SHAPE, rounds: int = 5, margin: float = CALIBRATION_MARGIN) -> bool:
    """Time both exact routes on one ``(M, N, K)`` binary product; True iff int_mm clearly wins.

    Min over ``rounds`` interleaved runs after a warm-up; int_mm must beat popcount by ``margin``
    (popcount is the safe default, and a loaded machine can swing a single timing).  Also checks
    both give the same integers (False if not).  Only used where :func:`int8_dot_from_features`
    returns None; tens of milliseconds, once per process.
    """
    if not int_mm_available():
        return False
    m, n, k = shape
    gen = torch.Generator().manual_seed(0)
    words = -(-k // 64)
    a = torch.randint(-(2**62), 2**62, (m, words), dtype=torch.int64, generator=gen)
    b = torch.randint(-(2**62), 2**62, (n, words), dtype=torch.int64, generator=gen)
    if k % 64:  # pad bits must be 0
        mask = (1 << (k % 64)) - 1
        a[:, -1] &= mask
        b[:, -1] &= mask
    best = {}
    results = {}
    for name, fn in (("popcount", popcount_binary), ("int_mm", int_mm_binary)):
        results[name] = fn(a, b, k)  # warm-up
        best[name] = float("inf")
    for _ in range(rounds):
        for name, fn in (("popcount", popcount_binary), ("int_mm", int_mm_binary)):
            start = time.perf_counter()
            fn(a, b, k)
            best[name] = min(best[name], time.perf_counter() - start)
    if not torch.equal(results["popcount"], results["int_mm"]):
        return False
    return best["int_mm"] * margin < best["popcount"]


@functools.lru_cache(maxsize=1)
def int_mm_fast() -> bool:
    """Is int_mm the faster route for M >= INT_MM_MIN_ROWS on this CPU? (cached per process)"""
    from_flags = int8_dot_from_features(cpu_info())
    if from_flags is not None:
        return from_flags
    return calibrate_int_mm()


def decide_cpu_path(m: int, *, int_mm_works: bool, int_mm_is_fast: bool) -> str:
    """The 'auto' choice as a pure function: int_mm iff it works, is fast here and M is large."""
    return "int_mm" if int_mm_works and int_mm_is_fast and m >= INT_MM_MIN_ROWS else "popcount"


def choose_cpu_path(m: int, path: str = "auto") -> str:
    """'native', 'popcount' or 'int_mm': the explicit choice if given, else the native engine
    (:mod:`kernels.native`) where it is available, else :func:`decide_cpu_path`."""
    if path not in ("auto", "native", "popcount", "int_mm"):
        raise ValueError(f"path must be 'auto', 'native', 'popcount' or 'int_mm', got {path!r}")
    from . import native

    if path == "native":
        if not native.available():
            raise ValueError(f"path='native' requested but the native CPU kernels are unavailable: "
                             f"{native.unavailable_reason()}")
        return path
    if path == "int_mm":
        if not int_mm_available():
            raise ValueError("path='int_mm' requested but torch._int_mm is unavailable on CPU here")
        return path
    if path == "popcount":
        return path
    if native.available():
        return "native"
    if m < INT_MM_MIN_ROWS:  # no need to detect anything
        return "popcount"
    return decide_cpu_path(m, int_mm_works=int_mm_available(), int_mm_is_fast=int_mm_fast())
