r"""Output transform of the integer accumulator: scale, bias, batch norm, optional sign-and-pack.

A binary layer computes the exact +-1 dot product ``acc`` (int32).  Its float output is

    y = gamma * (alpha * acc + b - mean) / sqrt(var + eps) + beta

(alpha = per-channel weight scale, b = bias, then BatchNorm).  Everything per output channel folds
into one multiply and one add (Larq Compute Engine's ``output_transform``):

    inv  = 1 / sqrt(var + eps)
    mul  = gamma * alpha * inv
    add  = gamma * (b - mean) * inv + beta
    y    = acc * mul + add

:func:`fold_bn` does the folding in float64.  Without BN, ``mul = alpha`` and ``add = b``.

``sign_pack=True`` emits the next binary layer's input directly: ``+1 if y >= 0 else -1`` (tie
``y == 0 -> +1``, the project's sign convention), packed along the channel axis in the format of
:mod:`kernels.packing`.  For exact, device-independent ties, y is then computed in float64 as
``(acc * mul) + add`` with two roundings (no FMA) on CPU and CUDA alike.  The float output is
float32, also rounded as a separate multiply then add.

The accumulator is [..., N] with N = output channels innermost (Linear [M, N], conv NHWC).
On CUDA the transform runs as one kernel from ``epilogue.cu``; on CPU as torch ops.  Both keep
float32 subnormals (IEEE arithmetic, no flush-to-zero; see :mod:`kernels.sources`).

This is an inference transform: it is not differentiable.  ``scale``, ``bias``, ``bn`` and
``mul_add`` may be tensors that require grad (a layer's parameters); their values are used
detached, so the same call works on CPU and CUDA (DLPack refuses tensors that require grad).

Non-finite parameters with ``sign_pack=True``: since ``acc`` is an integer, ``y`` can only be NaN
when ``mul`` or ``add`` is not finite (``0 * inf``, ``inf - inf``, NaN), and NaN has no sign.
:func:`check_sign_pack_params` therefore rejects non-finite ``mul`` / ``add`` with a ValueError
naming the first bad channel, on every device, before any kernel runs (on CUDA this costs one
host synchronisation).  The float output (``sign_pack=False``) follows IEEE arithmetic on both
devices, NaN and inf included.
"""

from __future__ import annotations

import numpy as np
import torch

from .packing import pack_bits, packed_words

__all__ = ["fold_bn", "epilogue", "check_sign_pack_params"]


def _channel_vector(value, n: int, name: str, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        value = value.detach()  # inference only: values, never the autograd graph
    t = torch.as_tensor(value, dtype=torch.float64, device=device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {tuple(t.shape)}")
    return t


def fold_bn(
    n: int,
    scale=None,
    bias=None,
    bn=None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold scale alpha, bias b and BN ``(mean, var, gamma, beta, eps)`` into float64 (mul, add)."""
    alpha = _channel_vector(1.0 if scale is None else scale, n, "scale", device)
    b = _channel_vector(0.0 if bias is None else bias, n, "bias", device)
    if bn is None:
        return alpha, b
    if not (isinstance(bn, (tuple, list)) and len(bn) == 5):
        raise ValueError("bn must be (mean, var, gamma, beta, eps); use mul_add=(mul, add) if folded")
    mean, var, gamma, beta, eps = bn
    mean = _channel_vector(mean, n, "bn mean", device)
    var = _channel_vector(var, n, "bn var", device)
    gamma = _channel_vector(gamma, n, "bn gamma", device)
    beta = _channel_vector(beta, n, "bn beta", device)
    if bool(((var + float(eps)) <= 0).any()):
        raise ValueError("bn var + eps must be positive")
    inv = torch.rsqrt(var + float(eps))
    return gamma * alpha * inv, gamma * (b - mean) * inv + beta


def check_sign_pack_params(mul: torch.Tensor, add: torch.Tensor) -> None:
    """ValueError unless every ``mul[n]`` and ``add[n]`` is finite (the only way to a NaN ``y``).

    The one decision both devices share for ``sign_pack=True`` (see the module docstring).
    """
    for name, t in (("mul", mul), ("add", add)):
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            channel = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"sign_pack needs finite per-channel {name}; channel {channel} is {float(t[channel])} "
                "(a NaN output has no sign: check the scale, bias and BatchNorm statistics)"
            )


def epilogue(
    acc: torch.Tensor,
    scale=None,
    bias=None,
    bn=None,
    *,
    mul_add=None,
    sign_pack: bool = False,
) -> torch.Tensor:
    """``y = acc * mul + add`` per output channel (last dim), optionally sign-and-packed.

    Give either ``scale`` / ``bias`` / ``bn=(mean, var, gamma, beta, eps)`` (folded by
    :func:`fold_bn`) or an already folded ``mul_add=(mul, add)``.  Returns float32 ``y`` with
    acc's shape, or with ``sign_pack=True`` int64 words ``[..., ceil(N/64)]`` of ``sign(y)``
    (bit 1 where y < 0; ValueError for non-finite mul / add).  Never requires grad.
    """
    if not isinstance(acc, torch.Tensor) or acc.dtype != torch.int32:
        raise ValueError(f"acc must be an int32 tensor (a packed matmul output), "
                         f"got {getattr(acc, 'dtype', type(acc))}")
    if acc.dim() < 1 or acc.shape[-1] == 0:
        raise ValueError(f"acc needs a non-empty channel (last) dim, got shape {tuple(acc.shape)}")
    n = acc.shape[-1]
    if mul_add is not None:
        if scale is not None or bias is not None or bn is not None:
            raise ValueError("give either mul_add or scale/bias/bn, not both")
        mul = _channel_vector(mul_add[0], n, "mul", acc.device)
        add = _channel_vector(mul_add[1], n, "add", acc.device)
    else:
        mul, add = fold_bn(n, scale, bias, bn, device=acc.device)
    if sign_pack:
        check_sign_pack_params(mul, add)
    acc = acc.contiguous()
    if acc.is_cuda:
        return _epilogue_cuda(acc, mul, add, sign_pack)
    return _epilogue_cpu(acc, mul, add, sign_pack)


def _epilogue_cpu(acc: torch.Tensor, mul: torch.Tensor, add: torch.Tensor, sign_pack: bool):
    if sign_pack:
        y = acc.to(torch.float64) * mul
        return pack_bits(y + add)
    y = acc.to(torch.float32) * mul.to(torch.float32)
    return y + add.to(torch.float32)


def _epilogue_cuda(acc: torch.Tensor, mul: torch.Tensor, add: torch.Tensor, sign_pack: bool):
    from . import cuda_runtime

    n = acc.shape[-1]
    rows = acc.numel() // n
    device = acc.device.index
    if sign_pack:
        words = packed_words(n)
        out = torch.empty((*acc.shape[:-1], words), dtype=torch.int64, device=acc.device)
        total_words = rows * words
        cuda_runtime.launch(
            "epilogue.cu",
            "epilogue_sign_pack",
            device,
            (-(-total_words // 8),),
            (256,),
            (acc, mul.contiguous(), add.contiguous(), out, rows, n, words),
        )
        return out
    out = torch.empty(acc.shape, dtype=torch.float32, device=acc.device)
    blocks = min(-(-acc.numel() // 256), 32 * cuda_runtime.device_sm_count(device))
    cuda_runtime.launch(
        "epilogue.cu",
        "epilogue_affine",
        device,
        (blocks,),
        (256,),
        (acc, mul.float().contiguous(), add.float().contiguous(), out, np.int64(acc.numel()), n),
    )
    return out
