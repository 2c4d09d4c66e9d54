"""Bit-packed inference kernels for binary and ternary networks (CPU: NumPy/torch, CUDA: CuPy).

Public API (all exact integer arithmetic; see each module's docstring for formulas):

* packing: :func:`pack_bits`, :func:`unpack_bits`, :func:`pack_ternary`, :func:`unpack_ternary`,
  :func:`packed_words`, :func:`packed_nbytes`
* 2:4 sparse ternary (1.33 bits per weight): :func:`pack_ternary24`, :func:`unpack_ternary24`,
  :func:`unpack_ternary24_planes` (to the ternary matmul's planes), :func:`ternary24_nbytes`
* matmul:  :func:`binary_matmul`, :func:`ternary_matmul` (weights prepacked once for the native
  engine with :func:`prepack_binary` / :func:`prepack_ternary`)
* conv:    :func:`pack_activations`, :func:`pack_conv_weight`, :func:`binary_conv2d`
* output:  :func:`fold_bn`, :func:`epilogue`
* BitNet-style linears, int8 activations x ternary/binary weights (native engine only):
  :func:`ternary_i8_prepack`, :func:`binary_i8_prepack`, :func:`quantize_i8`,
  :func:`ternary_i8_matmul`, :class:`TernaryI8Linear` (see :mod:`kernels.cpu_native`)

Importing this package needs only torch and NumPy; CuPy is imported on first use with a CUDA
tensor.  The CUDA sources live next to this file as ``*.cu`` (see :mod:`kernels.sources`).  On CPU
the native engine (:mod:`kernels.native`: C++ compiled on first use, SIMD chosen by CPU features;
:mod:`kernels.cpu_native`) runs every kernel where a C++ compiler is available; the NumPy path
(:mod:`kernels.cpu_matmul`) is the fallback and the reference.
"""

from .conv import binary_conv2d, pack_activations, pack_conv_weight, repack_conv_weight
from .cpu_native import (
    TernaryI8Linear,
    binary_i8_prepack,
    quantize_i8,
    ternary_i8_matmul,
    ternary_i8_prepack,
)
from .epilogue import epilogue, fold_bn
from .matmul import binary_matmul, prepack_binary, prepack_ternary, ternary_matmul
from .packing import (
    pack_bits,
    pack_ternary,
    packed_nbytes,
    packed_words,
    unpack_bits,
    unpack_ternary,
)
from .sparse24 import pack_ternary24, ternary24_nbytes, unpack_ternary24, unpack_ternary24_planes

__all__ = [
    "pack_bits",
    "unpack_bits",
    "pack_ternary",
    "unpack_ternary",
    "packed_words",
    "packed_nbytes",
    "pack_ternary24",
    "unpack_ternary24",
    "unpack_ternary24_planes",
    "ternary24_nbytes",
    "binary_matmul",
    "ternary_matmul",
    "prepack_binary",
    "prepack_ternary",
    "pack_activations",
    "pack_conv_weight",
    "repack_conv_weight",
    "binary_conv2d",
    "fold_bn",
    "epilogue",
    "ternary_i8_prepack",
    "binary_i8_prepack",
    "quantize_i8",
    "ternary_i8_matmul",
    "TernaryI8Linear",
]
