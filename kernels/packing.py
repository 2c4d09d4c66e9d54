"""Bit packing of binary (+-1) and ternary ({-1, 0, +1}) tensors into 64-bit words.

Format (shared by every kernel in this package, CPU and CUDA):

* Values are packed along the **last** dimension into ``W = ceil(K / 64)`` words stored as
  ``torch.int64`` (the bit pattern is what matters; kernels read the words as ``uint64``).
* Bit ``j`` of word ``w`` holds element ``64 * w + j`` (little-endian bit order).
* **bit 1 = -1**, bit 0 = +1.  Binarization is ``x >= 0 -> +1`` so ``sign(0) = +1`` and ``-0.0``
  also maps to +1 (the comparison is ``x < 0``, never the IEEE sign bit).  NaN raises ValueError.
* The ``64 * W - K`` pad bits of the last word are always 0 in every operand, so with the true
  ``K`` the XOR form ``dot = K - 2 * popcount(a ^ b)`` is exact.
* Ternary values use two planes of the same format: the *sign plane* ``s`` (bit 1 where t = -1)
  and the *nonzero plane* ``m`` (bit 1 where t != 0).  ``t = m * (1 - 2 s)``.

Packing and unpacking are torch ops (bytes via shifts, then a free ``view`` of 8 bytes as one
int64), so they run unchanged on CPU and CUDA tensors; CPU unpacking uses NumPy's ``unpackbits``
(weights of BWN/ternary layers with float activations are exported by unpacking on CPU).  Memory:
a packed [N, K] matrix takes ``N * ceil(K/64) * 8`` bytes, i.e. exactly 1/32 of float32 when
``K % 64 == 0`` (ternary: 1/16).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

__all__ = [
    "packed_words",
    "pack_bits",
    "unpack_bits",
    "pack_ternary",
    "unpack_ternary",
    "packed_nbytes",
]

WORD_BITS = 64
_BYTE_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("kernels.packing assumes a little-endian host (8 bytes viewed as one int64)")


def packed_words(k: int) -> int:
    """Number of 64-bit words that hold ``k`` packed elements: ``ceil(k / 64)``."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return (k + WORD_BITS - 1) // WORD_BITS


def packed_nbytes(rows: int, k: int, planes: int = 1) -> int:
    """Bytes of a packed [rows, k] operand: ``planes * rows * ceil(k/64) * 8``."""
    return planes * rows * packed_words(k) * 8


def _byte_shifts(device: torch.device) -> torch.Tensor:
    shifts = _BYTE_SHIFTS_CACHE.get(device)
    if shifts is None:
        shifts = torch.arange(8, dtype=torch.uint8, device=device)
        _BYTE_SHIFTS_CACHE[device] = shifts
    return shifts


def _pack_bool(flags: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor [..., K] into int64 words [..., ceil(K/64)] (bit j of word w = 64w+j)."""
    k = flags.shape[-1]
    words = packed_words(k)
    pad = words * WORD_BITS - k
    bits = flags.to(torch.uint8)
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*flags.shape[:-1], words * 8, 8)
    # Shifted bits of one byte are disjoint, so their sum is their OR and stays < 256.
    packed_bytes = (bits << _byte_shifts(flags.device)).sum(dim=-1, dtype=torch.uint8)
    return packed_bytes.view(torch.int64)


def _unpack_bool(bits: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bool`: int64 words [..., W] -> uint8 0/1 flags [..., k]."""
    check_packed(bits, k, "bits")
    as_bytes = bits.contiguous().view(torch.uint8)
    if as_bytes.device.type == "cpu":  # NumPy's unpackbits is ~10x faster than the shift form
        flat = np.unpackbits(as_bytes.numpy(), axis=-1, count=k, bitorder="little")
        return torch.from_numpy(flat)
    flags = (as_bytes.unsqueeze(-1) >> _byte_shifts(bits.device)) & 1
    return flags.reshape(*bits.shape[:-1], -1)[..., :k]


def check_packed(bits: torch.Tensor, k: int, name: str) -> int:
    """Validate a packed operand against ``k`` and return its word count W."""
    if not isinstance(bits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of int64 words, got {type(bits).__name__}")
    if bits.dtype != torch.int64:
        raise ValueError(f"{name} must have dtype torch.int64 (packed words), got {bits.dtype}")
    if bits.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the word axis), got a scalar")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    words = bits.shape[-1]
    if k > words * WORD_BITS:
        raise ValueError(
            f"k={k} is larger than the {words} words * 64 = {words * WORD_BITS} bits of {name}"
        )
    return words


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a floating or signed integer tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if x.is_floating_point() and bool(torch.isnan(x).any()):
        raise ValueError(f"{name} contains NaN; binarization of NaN is undefined")


def pack_bits(x: torch.Tensor) -> torch.Tensor:
    """Binarize ``x`` (x >= 0 -> +1, x < 0 -> -1) and pack its last dim into int64 words.

    ``x[..., K]`` -> ``int64[..., ceil(K/64)]`` with bit ``j`` of word ``w`` = 1 iff
    ``x[..., 64w + j] < 0``.  Zero and -0.0 give +1 (bit 0); pad bits are 0; NaN raises.
    Non-contiguous / transposed inputs are fine (the result is always contiguous).
    """
    _check_float(x, "x")
    return _pack_bool(x < 0)


def unpack_bits(bits: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack int64 words ``[..., ceil(k/64)]`` to +-1 values ``[..., k]``: value = 1 - 2 * bit."""
    return _lookup(_unpack_bool(bits, k), (1, -1), dtype)


def pack_ternary(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a ternary tensor (values exactly in {-1, 0, +1}) into ``(sign_plane, nonzero_plane)``.

    ``sign_plane`` bit = 1 where t == -1, ``nonzero_plane`` bit = 1 where t != 0; both have the
    packing format of :func:`pack_bits`.  ``-0.0`` counts as 0.  Any other value raises ValueError
    (scale first: the planes hold only the pattern; a scale alpha lives outside the kernel).
    """
    _check_float(t, "t")
    valid = (t == 0) | (t == 1) | (t == -1)
    if not bool(valid.all()):
        bad = t[~valid].flatten()[:3].tolist()
        raise ValueError(f"pack_ternary expects values in {{-1, 0, +1}}, found e.g. {bad}")
    return _pack_bool(t < 0), _pack_bool(t != 0)


def unpack_ternary(
    planes: tuple[torch.Tensor, torch.Tensor], k: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Unpack ``(sign_plane, nonzero_plane)`` to values ``m * (1 - 2 s)`` in {-1, 0, +1}."""
    sign, nonzero = _check_planes(planes, "planes")
    s, m = _unpack_bool(sign, k), _unpack_bool(nonzero, k)
    return _lookup(m + (s & m), (0, 1, -1), dtype)  # index 0: zero, 1: +1, 2: -1


def _lookup(index: torch.Tensor, table: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``table[index]`` as ``dtype``: one pass writing the output (the cost of unpacking is the write)."""
    values = torch.tensor(table, dtype=dtype, device=index.device)
    if index.device.type == "cpu" and dtype != torch.bfloat16:  # NumPy has no bfloat16
        return torch.from_numpy(np.take(values.numpy(), index.numpy()))
    return values[index.long()]


def _check_planes(planes, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(planes, (tuple, list)) and len(planes) == 2):
        raise ValueError(f"{name} must be a (sign_plane, nonzero_plane) pair from pack_ternary")
    sign, nonzero = planes
    if not (isinstance(sign, torch.Tensor) and isinstance(nonzero, torch.Tensor)):
        raise ValueError(f"{name} must hold two torch.Tensor planes")
    if sign.shape != nonzero.shape:
        raise ValueError(
            f"{name}: sign plane {tuple(sign.shape)} and nonzero plane {tuple(nonzero.shape)} differ"
        )
    return sign, nonzero
