"""Bool flags (sign bits, gradient masks) packed in the kernels' format, for what layers and
``qat.act_compression`` save for backward.

The format is ``kernels.pack_bits``': bit j of 64-bit word w holds flag 64 w + j (little-endian),
pad bits 0, stored as int64 words [ceil(n / 64)] of the flattened tensor. On CPU one NumPy
``packbits`` pass produces it (``kernels.pack_bits`` takes five passes over the flags, which costs
more than a binary conv's backward here); on other devices ``kernels.pack_bits`` itself.
``tests/qat/test_act_compression.py`` checks both give the same words.

Speed (CPU, what a training step pays per saved tensor): comparisons that make the flags of a
float32 tensor run in one pass of the native engine (``kernels.cpu_native.pack_compare``: compare
and pack together, 0.8 ms against NumPy's 2.8 ms for |x| >= 1 over 2M elements on the 2-core AMD
EPYC), else in NumPy (a NumPy ``<``, ``<=``, ``>=`` is about 3x faster than PyTorch's one-thread
bool kernels here; float64 and float16 always, and without a compiler), and unpacking to two
values (``unpack_values``, ``unpack_signs``) reads a 256 x 8 table, one row of eight values per
packed byte (one gather writing the output; the per-element lookup it replaces took 4x longer).
The values are the same either way: the table holds exactly the two values cast to the dtype.
"""
from __future__ import annotations

import operator
from functools import lru_cache

import numpy as np
import torch

from kernels import cpu_native, native, pack_bits, unpack_bits


def pack_flags(flags: torch.Tensor) -> torch.Tensor:
    """A bool tensor (any shape) as int64 words [ceil(numel / 64)], bit 1 where the flag is set."""
    flat = flags.reshape(-1)
    if flat.device.type != "cpu":
        return pack_bits(flat.to(torch.int8).neg_())
    n = flat.numel()
    packed = np.packbits(flat.numpy(), bitorder="little")
    pad = -packed.size % 8
    if pad:
        packed = np.concatenate([packed, np.zeros(pad, dtype=np.uint8)])
    return torch.from_numpy(packed).view(torch.int64) if n else torch.zeros(0, dtype=torch.int64)


def unpack_flags(words: torch.Tensor, shape: torch.Size | tuple) -> torch.Tensor:
    """Inverse of ``pack_flags``: a bool tensor of ``shape``."""
    shape = torch.Size(shape)
    n = shape.numel()
    if words.device.type != "cpu":
        return (unpack_bits(words, n, torch.int8) < 0).view(shape)
    flags = np.unpackbits(words.contiguous().view(torch.uint8).numpy(), count=n, bitorder="little")
    return torch.from_numpy(flags.view(np.bool_)).view(shape)


#: NumPy's dtypes for the CPU fast paths (NumPy has no bfloat16: it takes PyTorch's ops).
_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)
_COMPARE = {"lt": operator.lt, "le": operator.le, "ge": operator.ge}


def pack_compare(x: torch.Tensor, op: str, threshold: float, *, absolute: bool = False) -> torch.Tensor:
    """``pack_flags(op(x, threshold))`` (or of ``op(|x|, threshold)``), op one of "lt", "le", "ge":
    the same words, made on CPU by the native engine (float32) or NumPy (the threshold cast to x's
    dtype first, as PyTorch casts a Python scalar; NaN compares false in all three)."""
    compare = _COMPARE[op]
    x = x.detach()
    if x.device.type == "cpu" and x.dtype == torch.float32 and native.available():
        return cpu_native.pack_compare(x, op, threshold, absolute)
    if x.device.type == "cpu" and x.dtype in _NUMPY_FLOATS:
        values = x.numpy()
        if absolute:
            values = np.abs(values)
        return pack_flags(torch.from_numpy(np.asarray(compare(values, values.dtype.type(threshold)))))
    return pack_flags(compare(x.abs() if absolute else x, threshold))


@lru_cache(maxsize=64)
def _byte_table(values: tuple[float, float], dtype: torch.dtype) -> np.ndarray:
    """[256, 8]: row b holds values[bit j of b] for j = 0..7 (the little bit order of the words)."""
    pair = torch.tensor(values, dtype=dtype).numpy()
    bits = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1
    return np.ascontiguousarray(pair[bits])


def unpack_values(words: torch.Tensor, shape: torch.Size | tuple, values: tuple[float, float],
                  dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` holding ``values[0]`` where the flag is clear and ``values[1]`` where
    it is set (``values`` cast to ``dtype``)."""
    shape = torch.Size(shape)
    n = shape.numel()
    if words.device.type == "cpu" and dtype in _NUMPY_FLOATS:
        table = _byte_table(tuple(float(v) for v in values), dtype)
        rows = np.take(table, words.contiguous().view(torch.uint8).numpy(), axis=0)
        return torch.from_numpy(rows.reshape(-1)[:n]).view(shape)
    flags = unpack_flags(words, shape)
    return torch.tensor(values, dtype=dtype, device=words.device)[flags.long()]


def zero_where_(g: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """``g.masked_fill_(flags, 0.0)`` with the flags as ``pack_flags`` words (in place): one native
    pass for contiguous float32 on CPU (1.0 ms against 8.5 ms for unpacking to bool and filling, 2M
    elements), else the unpack and ``masked_fill_``. The same values, NaN and -0.0 included."""
    if g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous() and native.available():
        return cpu_native.zero_where_(g, words)
    return g.masked_fill_(unpack_flags(words, g.shape), 0.0)


def unpack_signs(words: torch.Tensor, shape: torch.Size | tuple, dtype: torch.dtype) -> torch.Tensor:
    """+-1 values of ``shape`` from sign flags (bit 1 = -1), as ``kernels.unpack_bits`` gives them."""
    shape = torch.Size(shape)
    if words.device.type == "cpu" and dtype in _NUMPY_FLOATS:
        return unpack_values(words, shape, (1.0, -1.0), dtype)
    return unpack_bits(words, shape.numel(), dtype).view(shape)
