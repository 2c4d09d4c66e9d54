"""Bool flags (sign bits, gradient masks) packed in the kernels' format, for what layers and
``qat.act_compression`` save for backward.

The format is ``kernels.pack_bits``': bit j of 64-bit word w holds flag 64 w + j (little-endian),
pad bits 0, stored as int64 words [ceil(n / 64)] of the flattened tensor. On CPU one NumPy
``packbits`` pass produces it (``kernels.pack_bits`` takes five passes over the flags, which costs
more than a binary conv's backward here); on other devices ``kernels.pack_bits`` itself.
``tests/qat/test_act_compression.py`` checks both give the same words.
"""
from __future__ import annotations

import numpy as np
import torch

from kernels import pack_bits, unpack_bits


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


def unpack_signs(words: torch.Tensor, shape: torch.Size | tuple, dtype: torch.dtype) -> torch.Tensor:
    """+-1 values of ``shape`` from sign flags (bit 1 = -1), as ``kernels.unpack_bits`` gives them."""
    shape = torch.Size(shape)
    return unpack_bits(words, shape.numel(), dtype).view(shape)
