r"""Binary 2-D convolution as a packed GEMM over a packed im2col (NHWC, groups = 1).

Layout.  Activations are packed along channels per pixel: ``x_bits[N, H, W, Wc]`` with
``Wc = ceil(C/64)`` words (:func:`pack_activations`).  Weights ``[O, C, kh, kw]`` are packed per tap
(:func:`pack_conv_weight`) into ``[O, T * Wc]`` with ``T = kh * kw`` taps in row-major (i, j) order,
each tap's C channels padded to whole words (pad bits 0).  The im2col gathers, for every output
pixel, the T tap words of the input in the same order, so a conv is one
:func:`kernels.binary_matmul` with ``K = T * C`` real elements (the interior pad bits are 0 in
both operands and add nothing).

Padding (``padding_mode``).  A zero-padded training conv ``F.conv2d(sign(x), sign(w), padding=p)``
sees a *third* value, 0, at the border, which one bit cannot hold.  We follow Larq Compute
Engine's "same-one + correction":

* the packed input is padded with bit 0 (= +1), which makes the GEMM compute the **one-padded**
  conv ``Y1[o, p] = sum_{valid taps} x.w + sum_{padded taps t} sum_c w[o, c, t]``;
* ``padding_mode="zeros"`` (default) subtracts the second term exactly:
  ``Y0[o, p] = Y1[o, p] - sum_t P[t, p] * S[o, t]`` with ``S[o, t] = sum_c w[o, c, t]`` (+-1 sums
  over the real channels, from the packed weights) and ``P[t, p] = 1`` iff tap t of output pixel p
  falls in the padding.  The correction depends only on the weights and the geometry, not on x,
  so it is one small [O, Ho*Wo] integer table per call, shared by the whole batch;
* ``padding_mode="ones"`` returns ``Y1`` (Larq's ``pad_values=1``): free, but a different model.

Result: int32 ``[N, O, Ho, Wo]`` in channels_last memory (it is the NHWC GEMM output viewed as
NCHW), exactly equal to ``F.conv2d`` of the +-1 tensors with the chosen padding value.

On CPU the native engine (:mod:`kernels.cpu_native`) computes the same integers without the
im2col: a direct (implicit-GEMM) convolution over the packed NHWC activations, where a padded tap
reads +1 bits and the same tap sums ``S[o, t]`` are subtracted per output pixel.  The im2col +
GEMM route above stays as the reference (``path='popcount'`` / ``'int_mm'``) and runs on CUDA.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import cpu_matmul
from .matmul import binary_matmul
from .packing import check_packed, pack_bits, packed_words, unpack_bits

__all__ = ["pack_activations", "pack_conv_weight", "repack_conv_weight", "binary_conv2d", "conv_output_size"]


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """``floor((size + 2p - d (k - 1) - 1) / s) + 1`` (as in nn.Conv2d)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pack_activations(x: torch.Tensor) -> torch.Tensor:
    """Float NCHW ``[N, C, H, W]`` -> packed NHWC ``[N, H, W, ceil(C/64)]`` (x >= 0 -> +1)."""
    if x.dim() != 4:
        raise ValueError(f"x must be NCHW [N, C, H, W], got shape {tuple(x.shape)}")
    return pack_bits(x.permute(0, 2, 3, 1))


def pack_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """Float ``[O, C, kh, kw]`` -> packed ``[O, kh * kw * ceil(C/64)]`` (tap-major, C padded per tap)."""
    if weight.dim() != 4:
        raise ValueError(f"weight must be [O, C, kh, kw], got shape {tuple(weight.shape)}")
    o = weight.shape[0]
    return pack_bits(weight.permute(0, 2, 3, 1)).reshape(o, -1)


def repack_conv_weight(weight_bits: torch.Tensor, in_channels: int, kernel_size) -> torch.Tensor:
    """Flat packed weights -> :func:`pack_conv_weight`'s per-tap layout, without unpacking to floats.

    ``weight_bits[O, ceil(C kh kw / 64)]`` is ``pack_bits(weight.flatten(1))`` (element ``c kh kw + t``
    of row o is ``w[o, c, t]``); the result is ``[O, kh kw ceil(C/64)]`` as ``pack_conv_weight(weight)``.
    Works on the bits (one byte per weight at most), so a large layer needs no float copy.
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    taps, o = kh * kw, weight_bits.shape[0]
    k = in_channels * taps
    check_packed(weight_bits, k, "weight_bits")
    source = weight_bits.detach().cpu().contiguous().numpy().view(np.uint8)
    packed = np.empty((o, taps * packed_words(in_channels)), dtype=np.int64)
    for start in range(0, o, 64):  # 64 rows at a time: the byte-per-weight temporaries stay small
        flat = np.unpackbits(source[start:start + 64], axis=-1, count=k, bitorder="little")
        rows = flat.shape[0]
        per_tap = np.zeros((rows, taps, packed_words(in_channels) * 64), dtype=np.uint8)
        per_tap[:, :, :in_channels] = flat.reshape(rows, in_channels, taps).transpose(0, 2, 1)
        packed[start:start + rows] = np.packbits(per_tap, axis=-1, bitorder="little").view(np.int64).reshape(rows, -1)
    return torch.from_numpy(packed).to(weight_bits.device)


def _im2col(x_bits: torch.Tensor, kernel, stride, padding, dilation, out_hw) -> torch.Tensor:
    """Packed NHWC [N, H, W, Wc] -> [N * Ho * Wo, T * Wc]; padding words are 0 (= +1 bits)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo) = kernel, stride, padding, dilation, out_hw
    padded = F.pad(x_bits, (0, 0, pw, pw, ph, ph))
    taps = [
        padded[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    cols = torch.stack(taps, dim=3)  # [N, Ho, Wo, T, Wc]
    return cols.reshape(x_bits.shape[0] * ho * wo, -1)


def _padded_taps(size_hw, kernel, stride, padding, dilation, out_hw, device) -> torch.Tensor:
    """P[t, p] = 1 where tap t of output pixel p reads padding, as int32 [T, Ho * Wo]."""
    masks = []
    for size, k, s, p, d, out in zip(size_hw, kernel, stride, padding, dilation, out_hw, strict=True):
        pos = torch.arange(out, device=device)[None, :] * s - p + torch.arange(k, device=device)[:, None] * d
        masks.append((pos < 0) | (pos >= size))  # [k, out]
    rows, cols = masks
    padded = rows[:, None, :, None] | cols[None, :, None, :]  # [kh, kw, Ho, Wo]
    return padded.reshape(kernel[0] * kernel[1], -1).to(torch.int32)


def _tap_sums(weight_bits: torch.Tensor, taps: int, in_channels: int) -> torch.Tensor:
    """S[o, t] = sum_c w[o, c, t] of the +-1 weights, int32 [O, T]."""
    words = weight_bits.shape[1] // taps
    per_tap = weight_bits.reshape(weight_bits.shape[0], taps, words)
    values = unpack_bits(per_tap, in_channels, dtype=torch.int32)
    return values.sum(dim=-1, dtype=torch.int32)


def binary_conv2d(
    x: torch.Tensor,
    weight_bits: torch.Tensor,
    kernel_size,
    *,
    in_channels: int | None = None,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
    path: str = "auto",
) -> torch.Tensor:
    """Exact binary conv: int32 ``[N, O, Ho, Wo]`` = ``F.conv2d(sign(x), sign(w), ...)``.

    ``x`` is either a float NCHW tensor (binarized with x >= 0 -> +1) or packed NHWC activations
    ``int64[N, H, W, ceil(C/64)]`` from :func:`pack_activations` (then ``in_channels`` is required).
    ``weight_bits`` comes from :func:`pack_conv_weight`.  ``padding_mode``: ``"zeros"`` (exact
    zero padding via the correction in the module docstring) or ``"ones"`` (pad with +1).
    ``path``: on CPU 'auto' (native where available), 'native', or the im2col GEMM's
    'popcount' / 'int_mm'; on CUDA passed to the GEMM.
    """
    if padding_mode not in ("zeros", "ones"):
        raise ValueError(f"padding_mode must be 'zeros' or 'ones', got {padding_mode!r}")
    kernel, stride, padding, dilation = (
        _pair(kernel_size, "kernel_size"),
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )
    if min(*kernel, *stride, *dilation) < 1 or min(padding) < 0:
        raise ValueError("kernel_size, stride, dilation must be >= 1 and padding >= 0")
    if x.dtype == torch.int64:
        if in_channels is None:
            raise ValueError("packed x (int64) needs in_channels=C")
        if x.dim() != 4:
            raise ValueError(f"packed x must be NHWC words [N, H, W, Wc], got {tuple(x.shape)}")
        x_bits = x.contiguous()
    else:
        if x.dim() != 4:
            raise ValueError(f"x must be NCHW [N, C, H, W], got shape {tuple(x.shape)}")
        if in_channels is not None and in_channels != x.shape[1]:
            raise ValueError(f"in_channels={in_channels} but x has {x.shape[1]} channels")
        in_channels = x.shape[1]
        x_bits = pack_activations(x)
    channel_words = packed_words(in_channels)
    check_packed(x_bits, in_channels, "x")
    if x_bits.shape[-1] != channel_words:
        raise ValueError(f"x has {x_bits.shape[-1]} words per pixel, C={in_channels} needs {channel_words}")
    taps = kernel[0] * kernel[1]
    if weight_bits.dim() != 2 or weight_bits.shape[1] != taps * channel_words:
        raise ValueError(
            f"weight_bits must be [O, {taps} * {channel_words}] from pack_conv_weight for "
            f"kernel {kernel} and C={in_channels}, got {tuple(weight_bits.shape)}"
        )
    if weight_bits.device != x_bits.device:
        raise ValueError(f"x is on {x_bits.device} but weight_bits on {weight_bits.device}")
    n, h, w, _ = x_bits.shape
    out_hw = tuple(
        conv_output_size(s, k, st, p, d)
        for s, k, st, p, d in zip((h, w), kernel, stride, padding, dilation, strict=True)
    )
    if min(out_hw) < 1:
        raise ValueError(f"input {h}x{w} is too small for kernel {kernel} with this padding/dilation")

    if not x_bits.is_cuda and cpu_matmul.choose_cpu_path(n * out_hw[0] * out_hw[1], path) == "native":
        from . import cpu_native

        weights = cpu_native.prepack_conv([weight_bits], kernel, in_channels)
        acc = cpu_native.conv(x_bits, weights, stride, padding, dilation, zero_padding=padding_mode == "zeros")
        return acc.permute(0, 3, 1, 2)
    cols = _im2col(x_bits, kernel, stride, padding, dilation, out_hw)
    acc = binary_matmul(cols, weight_bits.contiguous(), taps * in_channels, path=path)  # [N*Ho*Wo, O]
    out = acc.reshape(n, out_hw[0], out_hw[1], -1)
    if padding_mode == "zeros" and max(padding) > 0:
        padded = _padded_taps((h, w), kernel, stride, padding, dilation, out_hw, x_bits.device)
        tap_sums = _tap_sums(weight_bits, taps, in_channels)
        # float64 matmul: exact for these integers (|.| <= T*C << 2**53) and available on CUDA,
        # unlike int64 matmul.
        correction = (padded.T.double() @ tap_sums.T.double()).to(torch.int32)
        out = out - correction.reshape(out_hw[0], out_hw[1], -1)
    return out.permute(0, 3, 1, 2)
