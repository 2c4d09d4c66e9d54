"""Dense b-bit integer weight codes (b = 2, 4, 8) for the packed format, two kinds of code:

- ``int<b>``: the multi-bit method's (``layers.multibit``) odd codes c in [-(2^b - 1), 2^b - 1],
  stored as u = (c + 2^b - 1) / 2 in [0, 2^b - 1];
- ``sint<b>``: signed integer codes c in [-2^(b-1), 2^(b-1) - 1] (the ``int8`` method's absmax codes,
  ``layers.int8``), stored as u = c + 2^(b-1) (offset binary) in [0, 2^b - 1];

8 / b of them per byte along K, the first in the low bits (zero padded at the end of each row). No
kernel computes on them: a packed layer unpacks to scale * c and runs the float op.
"""
from __future__ import annotations

import math

import torch

INT_BITS = (2, 4, 8)


def int_format_bits(code_format: str) -> int | None:
    """8 for "int8" or "sint8", ..., None for a format that is not an integer code."""
    digits = code_format[4:] if is_signed_format(code_format) else code_format[3:]
    if code_format.startswith(("int", "sint")) and digits.isdigit() and int(digits) in INT_BITS:
        return int(digits)
    return None


def is_signed_format(code_format: str) -> bool:
    """Whether ``code_format`` stores signed codes ("sint8") rather than odd ones ("int8")."""
    return code_format.startswith("sint")


def row_bytes(k: int, bits: int) -> int:
    return math.ceil(k * bits / 8)


def pack_int_codes(code: torch.Tensor, bits: int, signed: bool = False) -> torch.Tensor:
    """[C_out, K] odd codes (``signed``: signed integer codes) -> [C_out, row_bytes] uint8;
    ValueError for a code outside the b-bit range."""
    levels = 2 ** bits - 1
    u = code + 2 ** (bits - 1) if signed else (code + levels) / 2
    if not (torch.equal(u, u.round()) and bool(((u >= 0) & (u <= levels)).all())):
        kind = (f"integers in [-{2 ** (bits - 1)}, {2 ** (bits - 1) - 1}]" if signed
                else f"odd integers in [-{levels}, {levels}]")
        raise ValueError(f"weight codes are not {kind}; they cannot be stored in {bits} bits")
    per_byte = 8 // bits
    rows, k = u.shape
    padded = torch.zeros(rows, row_bytes(k, bits) * per_byte, dtype=torch.int32, device=u.device)
    padded[:, :k] = u.to(torch.int32)
    shifts = torch.arange(per_byte, device=u.device, dtype=torch.int32) * bits
    return (padded.view(rows, -1, per_byte) << shifts).sum(-1).to(torch.uint8)


def unpack_int_codes(packed: torch.Tensor, bits: int, k: int, dtype=torch.float32, signed: bool = False
                     ) -> torch.Tensor:
    """The inverse of ``pack_int_codes``: [C_out, K] odd (``signed``: signed) codes in ``dtype``."""
    if bits == 8:  # one code per byte: no shifts (the same integers, several times faster per call)
        u = packed[:, :k].to(torch.int16)
        return (u - 128 if signed else 2 * u - 255).to(dtype)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    u = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    u = u.reshape(packed.shape[0], -1)[:, :k]
    return (u - 2 ** (bits - 1) if signed else 2 * u - (2 ** bits - 1)).to(dtype)
