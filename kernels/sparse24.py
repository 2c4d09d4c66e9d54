"""The packed 2:4-sparse ternary format: at most 2 nonzeros in every group of 4 weights.

A 2:4 ternary tensor ``t[..., K]`` (values in {-1, 0, +1}) is read along its last dimension in
groups of 4 consecutive elements, ``group g = t[..., 4g : 4g + 4]``, ``G = ceil(K / 4)`` groups per
row; the tail group of a row with ``K % 4 != 0`` is padded with zeros.  Every group holds at most 2
nonzeros.  For a conv weight the row is the output channel's K = kh * kw * C_in/groups in the
*tap-major* order of the native conv engine (:func:`tap_major`, ``kernels.conv.pack_conv_weight``'s
order: channels innermost), so with ``C_in/groups % 4 == 0`` a group is 4 input channels of one tap,
as NVIDIA's ASP and sparse tensor cores group them.

Group codes.  A group can take 33 values, not 32:

    c = 0                          all four zero                                    (1)
    c = 1 + 2 i + s                one nonzero, at position i in 0..3               (8)
    c = 9 + 4 p + 2 s_a + s_b      two nonzeros, at positions PAIRS[p] = (a, b)     (24)

with s = 1 where the value is -1, and PAIRS = (0,1), (0,2), (0,3), (1,2), (1,3), (2,3).  This is
why the "pattern (3 bits) + 2 sign bits" code of 5 bits (1.25 bits/weight) cannot be exact: it
holds the 24 two-nonzero groups and has 8 spare codes for the 9 groups with fewer (a kept slot
that TWN's threshold zeroes is common: ~20% of groups).  log2(33) = 5.044 bits per group (1.261
bits per weight) is the floor of any fixed-rate group code.

Bit layout.  Three groups share one 16-bit unit in base 33 (33^3 = 35937 <= 2^16):

    u_j = c_{3j} + 33 c_{3j+1} + 33^2 c_{3j+2},      j = 0 .. U - 1,   U = ceil(G / 3),

groups past G having code 0, stored little-endian as two bytes, ``out[..., 2j] = u_j & 0xFF``,
``out[..., 2j + 1] = u_j >> 8``: a uint8 tensor ``[..., 2U]``.  Rate: 16 bits per 12 weights =
**1.333 bits per weight** when K % 12 == 0 (5.7% above the 1.261 floor; dense two-plane ternary
is 2), whatever the number of zeros.  Padding is canonical (zero codes, zero tail values), so
``pack_ternary24`` and ``unpack_ternary24`` are exact inverses; unpacking rejects anything else.

To the kernels.  ``unpack_ternary24_planes`` gives the ``(sign, nonzero)`` planes of
:func:`kernels.pack_ternary` (the format :func:`kernels.ternary_matmul` and the native ternary
GEMM consume): since 4 divides 64, group g is exactly bits 4(g % 16) .. 4(g % 16) + 3 of word
g // 16 in both planes, so each code expands by table lookup to one sign nibble and one nonzero
nibble, with no per-element pass.

All functions are torch ops (CPU or CUDA tensors); nothing here knows about layers or training.
"""

from __future__ import annotations

import math

import torch

from .packing import WORD_BITS, _check_float, packed_words

__all__ = [
    "GROUP",
    "PAIRS",
    "GROUP_VALUES",
    "ternary24_row_bytes",
    "ternary24_nbytes",
    "group_codes",
    "pack_ternary24",
    "unpack_ternary24",
    "unpack_ternary24_planes",
    "tap_major",
    "from_tap_major",
]

GROUP = 4
PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
CODES = 33
GROUPS_PER_UNIT = 3
UNIT_BYTES = 2


def _group_values() -> torch.Tensor:
    """GROUP_VALUES[c] = the four values of group code c (the table in the module docstring)."""
    values = torch.zeros(CODES, GROUP, dtype=torch.int8)
    for i in range(GROUP):
        for s in (0, 1):
            values[1 + 2 * i + s, i] = 1 - 2 * s
    for p, (a, b) in enumerate(PAIRS):
        for s_a in (0, 1):
            for s_b in (0, 1):
                code = 9 + 4 * p + 2 * s_a + s_b
                values[code, a], values[code, b] = 1 - 2 * s_a, 1 - 2 * s_b
    return values


#: [33, 4] int8: the values of each group code.
GROUP_VALUES = _group_values()
_BASE3 = torch.tensor([1, 3, 9, 27])
#: [81] int64: the code of a group given sum_i (t_i + 1) 3^i, -1 for groups with > 2 nonzeros.
_CODE_OF = torch.full((3 ** GROUP,), -1, dtype=torch.int64)
_CODE_OF[((GROUP_VALUES.long() + 1) * _BASE3).sum(1)] = torch.arange(CODES)
_NIBBLE_WEIGHTS = torch.tensor([1, 2, 4, 8], dtype=torch.uint8)
#: [33] uint8: bit i set where value i of the code's group is -1 (sign plane) / nonzero.
_SIGN_NIBBLE = ((GROUP_VALUES < 0).to(torch.uint8) * _NIBBLE_WEIGHTS).sum(1, dtype=torch.uint8)
_NONZERO_NIBBLE = ((GROUP_VALUES != 0).to(torch.uint8) * _NIBBLE_WEIGHTS).sum(1, dtype=torch.uint8)


def _units(k: int) -> int:
    """16-bit units of a row of k elements: ceil(ceil(k / 4) / 3)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return math.ceil(math.ceil(k / GROUP) / GROUPS_PER_UNIT)


def ternary24_row_bytes(k: int) -> int:
    """Bytes of one packed row of k weights: ``2 ceil(ceil(k / 4) / 3)``."""
    return UNIT_BYTES * _units(k)


def ternary24_nbytes(rows: int, k: int) -> int:
    """Bytes of a packed [rows, k] 2:4 ternary matrix: ``rows * 2 ceil(ceil(k / 4) / 3)``."""
    return rows * ternary24_row_bytes(k)


def group_codes(t: torch.Tensor) -> torch.Tensor:
    """The code (module docstring) of every group of 4 along the last dim of a 2:4 ternary tensor
    ``t[..., K]``: int64 ``[..., ceil(K/4)]``, the tail group zero-padded.

    ``t`` holds values exactly in {-1, 0, +1} (``-0.0`` counts as 0) with at most 2 nonzeros in
    every group; anything else raises ValueError naming the first bad group.
    """
    _check_float(t, "t")
    valid = (t == 0) | (t == 1) | (t == -1)
    if not bool(valid.all()):
        bad = t[~valid].flatten()[:3].tolist()
        raise ValueError(f"a 2:4 ternary tensor holds values in {{-1, 0, +1}}, found e.g. {bad}")
    k = t.shape[-1]
    padded = torch.nn.functional.pad(t.to(torch.int8), (0, -k % GROUP))
    groups = padded.reshape(*t.shape[:-1], -1, GROUP)
    base3 = ((groups + 1) * _BASE3.to(device=t.device, dtype=torch.int8)).sum(-1, dtype=torch.int64)
    codes = _CODE_OF.to(t.device)[base3]
    if bool((codes < 0).any()):
        where = (codes < 0).nonzero()[0].tolist()
        values = groups[tuple(where)].tolist()
        raise ValueError(f"group {where[-1]} (elements {4 * where[-1]}..{4 * where[-1] + 3}) of row "
                         f"{tuple(where[:-1])} holds {values}: more than 2 of 4 nonzero, not 2:4 sparse")
    return codes


def pack_ternary24(t: torch.Tensor) -> torch.Tensor:
    """Pack a 2:4 ternary tensor ``t[..., K]`` into uint8 ``[..., 2 ceil(ceil(K/4)/3)]``: the
    :func:`group_codes` three per 16-bit unit (layout: the module docstring)."""
    codes = group_codes(t)
    units = _units(t.shape[-1])
    codes = torch.nn.functional.pad(codes, (0, units * GROUPS_PER_UNIT - codes.shape[-1]))  # code 0: all zero
    codes = codes.reshape(*t.shape[:-1], units, GROUPS_PER_UNIT)
    unit = codes[..., 0] + CODES * codes[..., 1] + CODES * CODES * codes[..., 2]
    out = torch.stack([unit & 0xFF, unit >> 8], dim=-1).to(torch.uint8)
    return out.reshape(*t.shape[:-1], units * UNIT_BYTES)


def _group_codes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The G = ceil(k/4) group codes (int64 ``[..., G]``) of a packed tensor, checked canonical."""
    units = _units(k)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor from pack_ternary24, got "
                         f"{getattr(packed, 'dtype', type(packed).__name__)}")
    if packed.dim() < 1 or packed.shape[-1] != units * UNIT_BYTES:
        raise ValueError(f"packed rows of k={k} weights have {units * UNIT_BYTES} bytes, "
                         f"got shape {tuple(packed.shape)}")
    pairs = packed.to(torch.int64).reshape(*packed.shape[:-1], units, UNIT_BYTES)
    unit = pairs[..., 0] | (pairs[..., 1] << 8)
    if bool((unit >= CODES ** GROUPS_PER_UNIT).any()):
        raise ValueError(f"packed holds a 16-bit unit >= 33^3 = {CODES ** GROUPS_PER_UNIT}: not a pack_ternary24 "
                         f"result (corrupt data?)")
    codes = torch.stack([unit % CODES, unit // CODES % CODES, unit // (CODES * CODES)], dim=-1)
    codes = codes.reshape(*packed.shape[:-1], units * GROUPS_PER_UNIT)
    groups = math.ceil(k / GROUP)
    tail = k - GROUP * (groups - 1)  # elements of the last group that are real: 1..4
    if bool((codes[..., groups:] != 0).any()) or bool(
            (_NONZERO_NIBBLE.to(packed.device)[codes[..., groups - 1]] >> tail != 0).any()):
        raise ValueError(f"packed has nonzero values past k={k} (padding must be zero): not a pack_ternary24 "
                         f"result for this k")
    return codes[..., :groups]


def unpack_ternary24(packed: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_ternary24`: uint8 ``[..., 2U]`` -> values ``[..., k]`` in {-1, 0, +1}."""
    codes = _group_codes(packed, k)
    values = GROUP_VALUES.to(device=packed.device, dtype=dtype)[codes]
    return values.reshape(*codes.shape[:-1], codes.shape[-1] * GROUP)[..., :k]


def unpack_ternary24_planes(packed: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(sign_plane, nonzero_plane)`` of :func:`kernels.pack_ternary` for the unpacked values,
    int64 ``[..., ceil(k/64)]``: group g fills bits 4(g % 16) .. + 3 of word g // 16 of each plane,
    ``nibble = sum_i bit_i 2^i`` of its four values (``bit`` = value is -1, resp. nonzero)."""
    codes = _group_codes(packed, k)
    nibbles_per_row = packed_words(k) * WORD_BITS // GROUP
    codes = torch.nn.functional.pad(codes, (0, nibbles_per_row - codes.shape[-1]))  # code 0: all zero
    planes = []
    for table in (_SIGN_NIBBLE, _NONZERO_NIBBLE):
        nibbles = table.to(packed.device)[codes]
        as_bytes = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # element 4g + i is bit 4g + i
        planes.append(as_bytes.contiguous().view(torch.int64))
    return planes[0], planes[1]


def tap_major(weight: torch.Tensor) -> torch.Tensor:
    """The rows the 2:4 groups run along: a conv weight ``[O, C, kh, kw]`` as ``[O, kh * kw * C]``
    (element ``(i kw + j) C + c`` is ``w[o, c, i, j]``: the native conv engine's order, channels
    innermost); a linear weight ``[O, K]`` as it is."""
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    if weight.dim() == 2:
        return weight
    raise ValueError(f"weight must be a conv [O, C, kh, kw] or linear [O, K] weight, got shape {tuple(weight.shape)}")


def from_tap_major(rows: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`tap_major`: rows ``[O, K]`` back to a weight of ``shape``."""
    shape = tuple(shape)
    if len(shape) == 4:
        o, c, kh, kw = shape
        return rows.reshape(o, kh, kw, c).permute(0, 3, 1, 2)
    if len(shape) == 2:
        return rows.reshape(shape)
    raise ValueError(f"shape must be a conv [O, C, kh, kw] or linear [O, K] weight shape, got {shape}")
