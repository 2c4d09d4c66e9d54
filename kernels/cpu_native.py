r"""Torch-facing operations of the native CPU engine (:mod:`kernels.native`): packing, prepacked
weights, the binary convolution / matmul with fused output transform, and the ternary matmul.

Everything is exact: the integer accumulators equal :mod:`kernels.cpu_matmul`'s NumPy reference,
the float output equals ``kernels.epilogue``'s, bit for bit.

Weights are prepacked once (:func:`prepack_linear`, :func:`prepack_conv`) into panels of 8 output
channels, word-interleaved, the layout the kernels' register blocking reads (see
``native_src/isa_kernels.cpp``), plus, for convolutions, the per-tap weight sums
``S[g, t, o] = sum_c w[o, c, t]`` that make zero padding exact:

    dot[p, o] = T C - 2 sum_t popc(x[p, t] ^ w[o, t]) - sum_{t padded at p} S[o, t]

(a padded tap reads all-zero bits = +1 and so adds ``S[o, t]``, which is then removed).

Activations are packed NHWC, per group: pixel ``p`` holds ``groups * ceil(C/groups / 64)`` words,
group ``g``'s channels in words ``[g gw, (g+1) gw)``.  A matmul ``A[M, K] @ B[N, K]^T`` is the
same kernel with a 1x1 kernel over M pixels.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from . import native
from .packing import packed_words

__all__ = [
    "Prepacked",
    "prepack_linear",
    "prepack_conv",
    "pack_rows",
    "pack_pixels",
    "conv",
    "linear",
    "linear_plan",
    "conv_plan",
    "PlanCache",
    "maxpool_bits",
    "MaxPoolBitsPlan",
    "PoolChain",
    "affine_sign_pack",
    "FloatConvSign",
    "ternary_prepack",
    "ternary_matmul",
    "peak_bitmacs_per_s",
    "TernaryI8Weights",
    "ternary_i8_prepack",
    "binary_i8_prepack",
    "ternary_i8_matmul",
    "TernaryI8LutWeights",
    "ternary_i8_lut_prepack",
    "ternary_i8_lut_matmul",
    "quantize_i8",
    "ternary_i8_linear",
    "TernaryI8Linear",
    "COMPARISONS",
    "pack_compare",
    "scaled_to_i16",
    "i16_to_scaled",
    "zero_where_",
    "quantize_groups",
    "dequantize_groups",
]

PANEL = 8


class PlanCache(dict):
    """Call plans (pointers into this process's tensors), so a copy or a pickle starts empty."""

    def __deepcopy__(self, memo):
        return PlanCache()

    def __reduce__(self):
        return (PlanCache, ())


@dataclass(frozen=True)
class Prepacked:
    """Weights in the kernels' panel layout.

    ``panels``: int64 ``[groups, ceil(out_per_group/8), taps * group_words, 8]``;
    ``tap_sums``: int32 ``[groups, taps, out_per_group]`` (None for a matmul: nothing is padded).
    """

    panels: torch.Tensor
    tap_sums: torch.Tensor | None
    groups: int
    out_per_group: int
    cin_per_group: int
    kernel_size: tuple[int, int]
    #: :func:`conv`'s call plans for these weights, by input geometry and output transform
    plans: dict = field(default_factory=lambda: PlanCache(), compare=False, repr=False)

    @property
    def taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def group_words(self) -> int:
        return packed_words(self.cin_per_group)

    @property
    def out_features(self) -> int:
        return self.groups * self.out_per_group


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()  # ctypes takes an int for a c_void_p


def _panels_of(rows: torch.Tensor) -> torch.Tensor:
    """int64 rows [n, words] -> panels [ceil(n/8), words, 8] (rows past n are zero)."""
    rows = rows.contiguous()
    n, words = rows.shape
    panels = torch.empty(((n + PANEL - 1) // PANEL, words, PANEL), dtype=torch.int64)
    native.library().bq_prepack_panels(_ptr(rows), n, words, _ptr(panels))
    return panels


def prepack_linear(b_bits: torch.Tensor, k: int) -> Prepacked:
    """Prepack packed weights ``b_bits[N, ceil(k/64)]`` (kernels.pack_bits) for :func:`linear`."""
    b_bits = b_bits.detach().cpu()
    return Prepacked(_panels_of(b_bits).unsqueeze(0), None, 1, b_bits.shape[0], k, (1, 1))


def prepack_conv(tap_bits: list[torch.Tensor] | tuple[torch.Tensor, ...], kernel_size, cin_per_group: int) -> Prepacked:
    """Prepack one ``kernels.pack_conv_weight`` result per group (``[O/G, T * ceil(C/G / 64)]``)."""
    kh, kw = kernel_size
    taps, gw = kh * kw, packed_words(cin_per_group)
    panels, sums = [], []
    for bits in tap_bits:
        bits = bits.detach().cpu().contiguous()
        if bits.shape[1] != taps * gw:
            raise ValueError(f"per-group weight bits must be [O/G, {taps} * {gw}], got {tuple(bits.shape)}")
        panels.append(_panels_of(bits))
        per_tap = bits.numpy().view(np.uint64).reshape(bits.shape[0], taps, gw)
        minus = np.bitwise_count(per_tap).sum(axis=-1, dtype=np.int32)  # -1 weights per (o, t)
        sums.append(torch.from_numpy(np.ascontiguousarray((cin_per_group - 2 * minus).T)))
    return Prepacked(torch.stack(panels), torch.stack(sums), len(tap_bits), tap_bits[0].shape[0], cin_per_group,
                     (kh, kw))


def _refuse_nan(nans: int, name: str) -> None:
    if nans:
        raise ValueError(f"{name} contains NaN; binarization of NaN is undefined")


def pack_rows(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[rows, K]`` -> int64 words ``[rows, ceil(K/64)]`` (bit = x < 0; NaN raises)."""
    x = x.contiguous()
    rows, k = x.shape
    out = torch.empty((rows, packed_words(k)), dtype=torch.int64)
    _refuse_nan(native.library().bq_pack_rows(_ptr(x), rows, k, k, _ptr(out), out.shape[1]), "x")
    return out


def pack_pixels(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """float32 NCHW (any memory format) -> int64 ``[N, H, W, groups * ceil(C/groups/64)]``.

    channels_last input is packed row by row (C contiguous per pixel); a contiguous NCHW input
    plane by plane; anything else is made channels_last first.
    """
    n, c, h, w = x.shape
    cg = c // groups
    gw = packed_words(cg)
    out = torch.empty((n, h, w, groups * gw), dtype=torch.int64)
    lib = native.library()
    if x.is_contiguous() and not (h == 1 and w == 1):
        nans = lib.bq_pack_planes(_ptr(x), n, c, h * w, groups, _ptr(out))
    else:
        rows = x.permute(0, 2, 3, 1).contiguous()  # a view for channels_last input
        nans = lib.bq_pack_rows(_ptr(rows), n * h * w * groups, cg, cg, _ptr(out), gw)
    _refuse_nan(nans, "x")
    return out


def _checked_output_size(size_hw, kernel, stride, padding, dilation, window: str = "kernel") -> tuple[int, int]:
    """:func:`_output_size`, refusing an input too small for one output pixel."""
    ho, wo = _output_size(size_hw, kernel, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"input {size_hw[0]}x{size_hw[1]} is too small for {window} {tuple(kernel)} "
                         "with this padding/dilation")
    return ho, wo


def _output_size(size_hw, kernel, stride, padding, dilation) -> tuple[int, int]:
    """(Ho, Wo) by ``kernels.conv.conv_output_size``, remembered per geometry (batch-1 layers call it often)."""
    return _output_size_of(*(tuple(int(v) for v in arg) for arg in (size_hw, kernel, stride, padding, dilation)))


@functools.lru_cache(maxsize=4096)
def _output_size_of(size_hw, kernel, stride, padding, dilation) -> tuple[int, int]:
    from .conv import conv_output_size  # here: conv.py imports this module's users

    return tuple(conv_output_size(*dims) for dims in zip(size_hw, kernel, stride, padding, dilation, strict=True))


def _output(rows: int, out_features: int, mode: int) -> torch.Tensor:
    if mode == native.OUT_INT32:
        return torch.empty((rows, out_features), dtype=torch.int32)
    if mode == native.OUT_FLOAT:
        return torch.empty((rows, out_features), dtype=torch.float32)
    return torch.empty((rows, packed_words(out_features)), dtype=torch.int64)


def _transform(mode: int, mul, add, n: int):
    """Contiguous per-channel vectors for the output mode (float32 for FLOAT, float64 for SIGN)."""
    if mode == native.OUT_INT32:
        return None, None
    dtype = torch.float32 if mode == native.OUT_FLOAT else torch.float64
    vectors = []
    for v in (mul, add):
        ready = isinstance(v, torch.Tensor) and v.dtype == dtype and v.shape == (n,) and v.is_contiguous()
        if not (ready and v.device.type == "cpu" and not v.requires_grad):
            v = torch.as_tensor(v).detach().to(device="cpu", dtype=dtype).expand(n).contiguous()
        vectors.append(v)
    return vectors


def conv(x_words: torch.Tensor, weights: Prepacked, stride=(1, 1), padding=(0, 0), dilation=(1, 1), *,
         zero_padding: bool = True, mode: int = native.OUT_INT32, mul=None, add=None, residual=None,
         clamp=None) -> torch.Tensor:
    """The binary convolution of packed NHWC ``x_words`` with prepacked ``weights``.

    Returns ``[N, Ho, Wo, O]`` (int32 dot products, or float32 ``dot * mul + add`` for
    ``mode=OUT_FLOAT``) or int64 ``[N, Ho, Wo, ceil(O/64)]`` sign bits of ``dot * mul + add``
    (float64) for ``mode=OUT_SIGN`` (groups = 1 only).  ``zero_padding=False`` pads with +1.
    With ``mode=OUT_FLOAT``, ``residual`` (float32 ``[N, Ho, Wo, O]``) is then added and
    ``clamp=(lo, hi)`` applied, each rounded as the separate float32 ops would be.

    Everything but the input, output and residual pointers is worked out once per geometry and
    output transform and kept with the weights (:class:`_ConvPlan`): at batch 1 the checks and the
    argument block cost more than a small layer's kernel.
    """
    x_words = x_words.contiguous()
    return conv_plan(x_words.shape, weights, stride, padding, dilation, zero_padding=zero_padding, mode=mode, mul=mul,
                     add=add, with_residual=residual is not None, clamp=clamp).run(x_words, residual)


def conv_plan(x_shape, weights: Prepacked, stride=(1, 1), padding=(0, 0), dilation=(1, 1), *,
              zero_padding: bool = True, mode: int = native.OUT_INT32, mul=None, add=None,
              with_residual: bool = False, clamp=None) -> _ConvPlan:
    """The checked call of :func:`conv` for inputs of shape ``x_shape``: ``plan.run(x_words,
    residual)`` is ``conv(x_words, ...)`` without the per-call work (a caller that runs the same
    layer many times, as a fused chain does at batch 1, keeps the plan)."""
    key = (tuple(x_shape), tuple(stride), tuple(padding), tuple(dilation), bool(zero_padding), mode,
           _identity(mul), _identity(add), bool(with_residual), None if clamp is None else tuple(clamp))
    return _cached_plan(weights, key, lambda: _ConvPlan(weights, key[0], key[1], key[2], key[3], zero_padding, mode,
                                                        mul, add, bool(with_residual), clamp))


def _cached_plan(weights: Prepacked, key, make) -> _ConvPlan:
    """``weights.plans[key]``, made by ``make()`` and kept if it may be (``_ConvPlan.cacheable``)."""
    plan = weights.plans.get(key)
    if plan is None:
        plan = make()
        if plan.cacheable:
            if len(weights.plans) >= 64:  # a bound for callers that pass new mul / add tensors every time
                weights.plans.clear()
            weights.plans[key] = plan
    return plan


def _identity(v):
    """A cache key for ``mul`` / ``add``: a tensor by identity, storage and version (in-place
    changes count; an inference tensor has no version: see ``_ConvPlan.cacheable``)."""
    if isinstance(v, torch.Tensor):
        return (id(v), v.data_ptr(), -1 if v.is_inference() else v._version)
    return v if v is None or isinstance(v, (int, float)) else (id(v),)  # never cached (see cacheable)


class _ConvPlan:
    """One geometry and output transform of :func:`conv`: checked once, its ``ConvArgs`` built once.

    It holds ``mul`` and ``add`` themselves, so their ids (in the cache key) stay theirs while cached.
    """

    def __init__(self, weights: Prepacked, shape, stride, padding, dilation, zero_padding, mode, mul, add,
                 with_residual: bool, clamp):
        n, h, w, pixel_words = shape
        if pixel_words != weights.groups * weights.group_words:
            raise ValueError(f"x has {pixel_words} words per pixel, the weights need "
                             f"{weights.groups} groups x {weights.group_words}")
        if mode == native.OUT_SIGN and weights.groups != 1:
            raise ValueError("a sign-packed output needs groups = 1")
        if (with_residual or clamp is not None) and mode != native.OUT_FLOAT:
            raise ValueError("residual and clamp go with mode=OUT_FLOAT")
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = weights.kernel_size, stride, padding, dilation
        ho, wo = _checked_output_size((h, w), weights.kernel_size, stride, padding, dilation)
        self.keep = (mul, add)
        self.x_shape, self.with_residual = torch.Size(shape), with_residual
        self.mul_t, self.add_t = _transform(mode, mul, add, weights.out_features)
        # A converted copy would not see in-place changes that the key cannot tell: those of an
        # inference tensor (no version counter) or of a list / array.  Such plans are not cached.
        self.cacheable = all(v is None or isinstance(v, (int, float))
                             or (isinstance(v, torch.Tensor) and (t is v or not v.is_inference()))
                             for v, t in ((mul, self.mul_t), (add, self.add_t)))
        self.sums = weights.tap_sums if zero_padding and (ph or pw) else None
        out_features = weights.out_features
        template = _output(0, out_features, mode)
        self.cols, self.dtype = template.shape[1], template.dtype
        # allocated in this shape: a reshape per call costs as much as a batch-1 layer's kernel
        self.final_shape, self.residual_shape = (n, ho, wo, self.cols), (n, ho, wo, out_features)
        lo, hi = clamp if clamp is not None else (0.0, 0.0)
        float_out, sign_out = mode == native.OUT_FLOAT, mode == native.OUT_SIGN
        self.args = native.ConvArgs(
            None, n, h, w, pixel_words, weights.group_words, weights.cin_per_group,
            _ptr(weights.panels), _ptr(self.sums), weights.groups, weights.out_per_group,
            kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, mode, None, self.cols,
            _ptr(self.mul_t) if float_out else None, _ptr(self.add_t) if float_out else None,
            _ptr(self.mul_t) if sign_out else None, _ptr(self.add_t) if sign_out else None,
            None, out_features, int(clamp is not None), lo, hi)

    def run(self, x_words: torch.Tensor, residual: torch.Tensor | None = None,
            pools: PoolChain | None = None) -> torch.Tensor:
        """The output for ``x_words``; with ``pools`` (sign output only) the pooled output, in the same call."""
        if x_words.shape != self.x_shape or x_words.dtype != torch.int64 or not x_words.is_contiguous():
            raise ValueError(f"this plan takes contiguous int64 words of shape {tuple(self.x_shape)}, "
                             f"got {x_words.dtype} {tuple(x_words.shape)}")
        if (residual is not None) != self.with_residual:
            raise ValueError("this plan was made " + ("with" if self.with_residual else "without") + " a residual")
        args = native.ConvArgs.from_buffer_copy(self.args)
        args.x = x_words.data_ptr()
        if pools is not None:
            if self.args.mode != native.OUT_SIGN:
                raise ValueError("pools follow a sign output (mode=OUT_SIGN) only")
            native.sync_threads()
            return pools.call(native.library().bq_conv_pooled, args, self.final_shape)[0]
        out = torch.empty(self.final_shape, dtype=self.dtype)
        args.out = out.data_ptr()
        if residual is not None:
            if residual.shape != self.residual_shape:
                raise ValueError(f"residual must be [N, Ho, Wo, O] = {self.residual_shape}, "
                                 f"got {tuple(residual.shape)}")
            residual = residual.to(torch.float32).contiguous()
            args.residual = residual.data_ptr()
        native.sync_threads()
        native.library().bq_conv(ctypes.byref(args))
        return out


def linear(a_words: torch.Tensor, weights: Prepacked, *, mode: int = native.OUT_INT32, mul=None,
           add=None) -> torch.Tensor:
    """``A @ B^T`` of packed rows ``a_words[M, W]`` and prepacked weights, in ``mode``'s output."""
    m, words = a_words.shape
    if weights.taps != 1 or weights.groups != 1 or words != weights.group_words:
        raise ValueError(f"a has {words} words per row, the weights need {weights.group_words} (one group, 1x1)")
    return linear_plan(m, weights, mode=mode, mul=mul, add=add).run(a_words.contiguous())


def linear_plan(m: int, weights: Prepacked, *, mode: int = native.OUT_INT32, mul=None, add=None) -> _ConvPlan:
    """The checked call of :func:`linear` for ``m`` rows: ``plan.run(a_words)`` takes contiguous
    ``a_words[M, W]`` and returns ``[M, N]`` (or ``[M, words]`` of sign bits) as they are, with no
    reshape on either side (the 1x1 conv over M pixels reads and writes the same memory)."""
    key = ("linear", m, mode, _identity(mul), _identity(add))

    def make():
        plan = _ConvPlan(weights, (1, 1, m, weights.group_words), (1, 1), (0, 0), (1, 1), True, mode, mul, add,
                         False, None)
        plan.x_shape, plan.final_shape = torch.Size((m, weights.group_words)), (m, plan.cols)
        return plan

    return _cached_plan(weights, key, make)


def maxpool_bits(bits: torch.Tensor, and_mask: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """Max-pool of signs on packed NHWC words ``[N, H, W, words]``: per channel the AND (bit 1 in
    ``and_mask[words]``) or the OR of the window's bits; out-of-range taps are skipped."""
    bits = bits.contiguous()
    return MaxPoolBitsPlan(bits.shape, and_mask, kernel_size, stride, padding, dilation).run(bits)


class MaxPoolBitsPlan:
    """:func:`maxpool_bits` for one input shape, its geometry checked and its arguments converted once."""

    def __init__(self, shape, and_mask: torch.Tensor, kernel_size, stride, padding, dilation):
        n, h, w, words = shape
        ho, wo = _checked_output_size((h, w), kernel_size, stride, padding, dilation, "pooling window")
        if tuple(and_mask.shape) != (words,):
            raise ValueError(f"and_mask must have {words} words, got {tuple(and_mask.shape)}")
        # kept with the plan: the call reads its pointer
        ready = and_mask.dtype == torch.int64 and and_mask.is_contiguous() and not and_mask.requires_grad
        self.and_mask = and_mask if ready else and_mask.detach().to(torch.int64).contiguous()
        self.x_shape, self.out_shape = torch.Size(shape), (n, ho, wo, words)
        geometry = [int(v) for pair in (kernel_size, stride, padding, dilation) for v in pair]
        self.args = native.MaxPoolArgs(n, h, w, words, *geometry, ho, wo, _ptr(self.and_mask))

    def run(self, bits: torch.Tensor) -> torch.Tensor:
        if bits.shape != self.x_shape or bits.dtype != torch.int64 or not bits.is_contiguous():
            raise ValueError(f"this plan takes contiguous int64 words of shape {tuple(self.x_shape)}, "
                             f"got {bits.dtype} {tuple(bits.shape)}")
        out = torch.empty(self.out_shape, dtype=torch.int64)
        native.library().bq_maxpool_bits(bits.data_ptr(), ctypes.byref(self.args), out.data_ptr())
        return out


class PoolChain:
    """Bit max-pools that run inside the call of the sign-output kernel before them
    (``_ConvPlan.run(x, pools=chain)``, ``FloatConvSign.run(x, pools=chain)``): one native call
    and one output tensor instead of one per pool, which at batch 1 cost more than the pooling.
    ``plans``: :class:`MaxPoolBitsPlan` of consecutive shapes (each one's input the last one's output)."""

    def __init__(self, plans):
        self.plans = tuple(plans)  # they hold the and_masks the arguments point into
        if not self.plans:
            raise ValueError("a pool chain needs at least one pool")
        for before, after in zip(self.plans, self.plans[1:], strict=False):
            if tuple(after.x_shape) != tuple(before.out_shape):
                raise ValueError(f"pool input {tuple(after.x_shape)} does not follow pool output {before.out_shape}")
        self.x_shape, self.out_shape = tuple(self.plans[0].x_shape), self.plans[-1].out_shape
        self.args = (native.MaxPoolArgs * len(self.plans))(*(plan.args for plan in self.plans))

    def call(self, entry, args, kernel_shape) -> tuple[torch.Tensor, int]:
        """(output, result) of ``entry(args, pools)`` (a ``bq_*_pooled`` entry point) for a kernel whose
        own output would be ``kernel_shape``; ``args.out`` is set to the returned tensor."""
        if tuple(kernel_shape) != self.x_shape:
            raise ValueError(f"the pools take {self.x_shape}, the kernel gives {tuple(kernel_shape)}")
        out = torch.empty(self.out_shape, dtype=torch.int64)
        args.out = out.data_ptr()
        result = entry(ctypes.byref(args), self.args, len(self.plans))
        if result < 0:
            raise MemoryError("no memory for the pooling's intermediate buffers")
        return out, result


def affine_sign_pack(x: torch.Tensor, mul: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """int64 ``[N, H, W, ceil(C/64)]``: the packed signs of ``x * mul[c] + add[c]`` for float32
    NCHW ``x`` in any memory format (read through its strides, no copy), computed in float64 with
    two roundings -- the rule of ``OUT_SIGN`` (``mul``, ``add``: ``[C]``, float64)."""
    n, c, h, w = x.shape
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    mul, add = (torch.as_tensor(v).detach().to(torch.float64).expand(c).contiguous() for v in (mul, add))
    out = torch.empty((n, h, w, packed_words(c)), dtype=torch.int64)
    nans = native.library().bq_affine_sign_pack(x.data_ptr(), n, c, h, w, *x.stride(), mul.data_ptr(), add.data_ptr(),
                                                out.data_ptr())
    _refuse_nan(nans, "x")
    return out


class FloatConvSign:
    """A float convolution (zero padding, groups = 1) whose output a binary layer reads only
    through its sign, computed with that sign and packed in one pass (``bq_float_conv_sign``):
    ``bits = sign(conv(x) * mul[o] + add[o])``, the conv summed in float32 in (c, i, j) order
    without FMA, the affine map in float64 with two roundings (``OUT_SIGN``'s rule).  For first
    layers of a few input channels (mnist_cnn's 1 -> 32), where a separate conv, BatchNorm and
    packing pass cost more than the arithmetic.  ``run(x)`` takes float32 NCHW ``x`` in any
    memory format and returns int64 ``[N, Ho, Wo, ceil(O/64)]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, mul, add):
        o, c, kh, kw = weight.shape
        blocks = packed_words(o)
        padded = torch.zeros(blocks * 64, c * kh * kw, dtype=torch.float32)
        padded[:o] = weight.detach().float().reshape(o, -1)
        self.weight = padded.reshape(blocks, 64, -1).transpose(1, 2).contiguous()  # [block][c*kh*kw][64]
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.mul, self.add = (torch.cat([torch.as_tensor(v).detach().double().expand(o),
                                         torch.zeros(blocks * 64 - o, dtype=torch.float64)]).contiguous()
                              for v in (mul, add))
        self.shape = (o, c, kh, kw)
        self.geometry = tuple(tuple(int(v) for v in pair) for pair in (stride, padding, dilation))
        self._plans = PlanCache()  # (shape, strides) -> (args, output shape)

    def run(self, x: torch.Tensor, pools: PoolChain | None = None) -> torch.Tensor:
        """The packed signs for ``x``; with ``pools``, pooled in the same call."""
        template, out_shape = self.plan(x)
        args = native.FloatConvSignArgs.from_buffer_copy(template)
        args.x = x.data_ptr()
        native.sync_threads()
        if pools is not None:
            out, nans = pools.call(native.library().bq_float_conv_sign_pooled, args, out_shape)
        else:
            out = torch.empty(out_shape, dtype=torch.int64)
            args.out = out.data_ptr()
            nans = native.library().bq_float_conv_sign(ctypes.byref(args))
        _refuse_nan(nans, "the convolution's output")
        return out

    def plan(self, x: torch.Tensor) -> tuple[native.FloatConvSignArgs, tuple]:
        """(argument block, output shape ``[N, Ho, Wo, words]``) for inputs shaped and strided as ``x``."""
        if x.dtype != torch.float32 or x.dim() != 4 or x.shape[1] != self.shape[1]:
            raise ValueError(f"x must be float32 [N, {self.shape[1]}, H, W], got {x.dtype} {tuple(x.shape)}")
        key = (x.shape, x.stride())
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(x)
        return plan

    def _plan(self, x):
        n, c, h, w = x.shape
        o, _, kh, kw = self.shape
        (sh, sw), (ph, pw), (dh, dw) = self.geometry
        ho, wo = _checked_output_size((h, w), (kh, kw), *self.geometry)
        args = native.FloatConvSignArgs(None, n, c, h, w, *x.stride(), _ptr(self.weight), _ptr(self.bias),
                                        o, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, _ptr(self.mul), _ptr(self.add),
                                        None)
        return args, (n, ho, wo, packed_words(o))


def ternary_prepack(b_planes, k: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(sign panels, nonzero panels, N, k) of ternary weights from ``kernels.pack_ternary``."""
    sign, nonzero = (p.detach().cpu() for p in b_planes)
    return _panels_of(sign), _panels_of(nonzero), sign.shape[0], k


def ternary_matmul(a_planes, prepacked) -> torch.Tensor:
    """int32 ``[M, N]`` = ternary ``A @ B^T``: ``popc(ma & mb) - 2 popc(ma & mb & (sa ^ sb))``."""
    sa, ma = (p.contiguous() for p in a_planes)
    sign_panels, nonzero_panels, n, _ = prepacked
    m, words = sa.shape
    if sign_panels.shape[1] != words:
        raise ValueError(f"a has {words} words per row, b {sign_panels.shape[1]}")
    out = torch.empty((m, n), dtype=torch.int32)
    native.sync_threads()
    native.library().bq_ternary_gemm(_ptr(sa), _ptr(ma), m, _ptr(sign_panels), _ptr(nonzero_panels), n, words,
                                     _ptr(out))
    return out


def peak_bitmacs_per_s(reps: int = 20000) -> float:
    """Bit-MACs per second of the current instruction set's microkernel on L1-resident data (all
    threads): the popcount ceiling the kernels are reported against."""
    native.sync_threads()
    return native.library().bq_peak_bitmacs_per_s(reps)


# ---------------------------------------------------------------------------------------------
# Ternary (or binary) weights x int8 activations: BitNet b1.58's BitLinear at inference
# ---------------------------------------------------------------------------------------------
I8_BLOCK = 128


@dataclass(frozen=True)
class TernaryI8Weights:
    """Ternary weights in the int8 kernel's layout: 2-bit codes ``q = t + 1`` in {0, 1, 2}.

    ``codes``: uint8 ``[N, Kp / 4]``, ``Kp = ceil(K / 128) * 128`` (pad codes 1, i.e. t = 0); in each
    32-byte block ``b``, bits ``2i..2i+1`` of byte ``j`` hold the weight at ``k = 128 b + 32 i + j``.
    Exactly 2 bits per weight (plus the K padding), the same as the two bit-planes it is built from.
    """

    codes: torch.Tensor
    out_features: int
    in_features: int

    @property
    def padded_in(self) -> int:
        return self.codes.shape[1] * 4

    @property
    def nbytes(self) -> int:
        return self.codes.numel()


def ternary_i8_prepack(b_planes, k: int) -> TernaryI8Weights:
    """The int8 kernel's weights from ternary planes ``(sign, nonzero)`` (``kernels.pack_ternary``)
    of a ``[N, k]`` weight (``t = m (1 - 2 s)``)."""
    from .packing import _check_planes, check_packed

    sign, nonzero = (p.detach().cpu().contiguous() for p in _check_planes(b_planes, "b_planes"))
    words = check_packed(sign, k, "b_planes")
    if sign.dim() != 2:
        raise ValueError(f"b_planes must be 2-D [N, words], got {tuple(sign.shape)}")
    n = sign.shape[0]
    padded = -(-k // I8_BLOCK) * I8_BLOCK
    codes = torch.empty((n, padded // 4), dtype=torch.uint8)
    native.library().bq_ternary_i8_prepack(_ptr(sign), _ptr(nonzero), n, k, words, _ptr(codes))
    return TernaryI8Weights(codes, n, k)


def binary_i8_prepack(b_bits: torch.Tensor, k: int) -> TernaryI8Weights:
    """The int8 kernel's weights from binary words ``b_bits[N, ceil(k/64)]`` (``kernels.pack_bits``:
    bit 1 = -1): the ternary special case with every weight nonzero."""
    from .packing import check_packed

    words = check_packed(b_bits, k, "b_bits")
    nonzero = torch.full((b_bits.shape[0], words), -1, dtype=torch.int64)  # all 64 bits set
    if k % 64:
        nonzero[:, -1] = (1 << (k % 64)) - 1
    return ternary_i8_prepack((b_bits, nonzero), k)


def _check_weights(weights) -> None:
    if not isinstance(weights, TernaryI8Weights):
        raise ValueError(f"weights must be a TernaryI8Weights (from ternary_i8_prepack), got {type(weights).__name__}")


def _rows(x: torch.Tensor, dtype: torch.dtype, k: int, name: str) -> tuple[torch.Tensor, int]:
    """``(x made contiguous, rows)`` of ``x[..., k]`` of ``dtype`` on the CPU, read as rows of k (a clear
    ValueError otherwise).  No reshape: at batch 1 each torch call costs microseconds, as much as a
    small layer's kernel."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {x.dtype}")
    if not x.is_cpu:
        raise ValueError(f"{name} must be on the CPU, got {x.device}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{name} must have last dimension {k} (the weights' in_features), got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        x = x.contiguous()
    return x, x.numel() // k


def ternary_i8_matmul(x_codes: torch.Tensor, weights: TernaryI8Weights) -> torch.Tensor:
    """Exact int32 ``acc[..., N] = x_codes[..., K] @ T[N, K]^T`` for int8 activations (any value in
    [-128, 127]) and prepacked ternary weights: ``acc = sum_k (t_k + 1) x_k - sum_k x_k``, the
    unsigned codes times the signed activations by ``maddubs`` (AVX2) or plain loops (scalar)."""
    _check_weights(weights)
    rows, m = _rows(x_codes, torch.int8, weights.in_features, "x_codes")
    out = torch.empty((*x_codes.shape[:-1], weights.out_features), dtype=torch.int32)
    native.sync_threads()
    native.library().bq_ternary_i8_gemm(rows.data_ptr(), m, weights.in_features, weights.in_features,
                                        weights.codes.data_ptr(), weights.out_features, weights.padded_in,
                                        out.data_ptr())
    return out


LUT_PANEL = 32


@dataclass(frozen=True)
class TernaryI8LutWeights:
    r"""Ternary weights in the lookup-table kernel's layout (:func:`ternary_i8_lut_matmul`).

    ``codes``: uint8 ``[ceil(N / 32), ceil(K / 9), 64]``, the bytes of little-endian 16-bit words
    ``[ceil(N / 32)][ceil(K / 9)][32]``: per panel of 32 output rows and line ``l`` of nine weights, one
    word per row, ``c0 | c1 << 5 | c2 << 10``, where ``c_g = q0 + 3 q1 + 9 q2`` (0..26, ``q = t + 1``)
    codes the three weights at ``k = 9l + 3g + (0, 1, 2)`` (pad rows and weights past K are t = 0,
    c = 13).  16 bits per 9 weights: 1.78 bits a weight, against 2 for :class:`TernaryI8Weights`.
    """

    codes: torch.Tensor
    out_features: int
    in_features: int

    def __post_init__(self):  # checked once here, not per call (the kernel reads codes through a raw pointer)
        shape = (-(-self.out_features // LUT_PANEL), -(-self.in_features // 9), 2 * LUT_PANEL)
        if not (isinstance(self.codes, torch.Tensor) and self.codes.dtype == torch.uint8 and self.codes.is_cpu
                and self.codes.is_contiguous() and tuple(self.codes.shape) == shape):
            raise ValueError(f"codes must be a contiguous CPU uint8 tensor {shape} for {self.out_features} x "
                             f"{self.in_features} weights")

    @property
    def nbytes(self) -> int:
        return self.codes.numel()


def ternary_i8_lut_prepack(b_planes, k: int) -> TernaryI8LutWeights:
    """The lookup-table kernel's weights from ternary planes ``(sign, nonzero)``
    (``kernels.pack_ternary``) of a ``[N, k]`` weight (``t = m (1 - 2 s)``)."""
    from .packing import _check_planes, check_packed

    sign, nonzero = (p.detach().cpu().contiguous() for p in _check_planes(b_planes, "b_planes"))
    words = check_packed(sign, k, "b_planes")
    if sign.dim() != 2:
        raise ValueError(f"b_planes must be 2-D [N, words], got {tuple(sign.shape)}")
    n = sign.shape[0]
    codes = torch.empty((-(-n // LUT_PANEL), -(-k // 9), 2 * LUT_PANEL), dtype=torch.uint8)
    native.library().bq_ternary_i8_lut_prepack(_ptr(sign), _ptr(nonzero), n, k, words, _ptr(codes))
    return TernaryI8LutWeights(codes, n, k)


def ternary_i8_lut_matmul(x_codes: torch.Tensor, weights: TernaryI8LutWeights) -> torch.Tensor:
    r"""Exact int32 ``acc[..., N] = x_codes[..., K] @ T[N, K]^T`` by table lookup (T-MAC, bitnet.cpp
    TL2 style), equal to :func:`ternary_i8_matmul` for every int8 input; a second kernel, measured
    against it in ``benchmarks/ternary_linear.py --lut``.

    Scheme: weights in groups of g = 3 (27 combinations, a 5-bit index; three indices share a 16-bit
    word, 1.78 bits a weight); for each activation row and group j a table of the 27 sums
    ``T_j[c] = t0(c) x[3j] + t1(c) x[3j+1] + t2(c) x[3j+2]`` (int16, ``|T| <= 384``) is built once and
    then read by every output row: ``acc[i, r] = sum_j T_j[c[r, j]]``, one lookup for three
    multiply-adds.  On AVX-512 the table is one register of 32 int16 words and ``vpermw`` (AVX512BW)
    looks up 32 rows at once, reading only the low 5 bits of each index word, so the three indices of
    a word need two shifts and no masking, and neither the low/high byte split of a 16-entry
    ``vpshufb`` table (bitnet.cpp TL1/TL2, T-MAC) nor TL2's sign trick (27 entries folded to 14 to fit
    it) is needed: per 32 rows x 9 weights one load, two shifts, three ``vpermw`` and three int16 adds,
    against nine ``maddubs`` lanes' worth of work per weight in the 2-bit kernel.  g = 3 rather than
    TL1's g = 2: a third fewer lookups and adds, and 27 entries still fit one register.  On AVX2
    ``vpshufb`` looks up 16 bytes: the int16 table is split into low and high bytes, each in two
    16-entry halves chosen by bit 4 of the index, and the bytes interleaved back into int16 (about
    the maddubs kernel's cost: measured, not switched).  Scalar builds: a plain lookup loop.  The int16
    partial sums are widened to int32 every 28 words (``28 * 9 * 128 < 32768``), so the result is exact
    for any int8 codes (-128 included) and any K.
    """
    if not isinstance(weights, TernaryI8LutWeights):
        raise ValueError("weights must be a TernaryI8LutWeights (from ternary_i8_lut_prepack), "
                         f"got {type(weights).__name__}")
    rows, m = _rows(x_codes, torch.int8, weights.in_features, "x_codes")
    out = torch.empty((*x_codes.shape[:-1], weights.out_features), dtype=torch.int32)
    native.sync_threads()
    native.library().bq_ternary_i8_lut_gemm(rows.data_ptr(), m, weights.in_features, weights.in_features,
                                            weights.codes.data_ptr(), weights.out_features, out.data_ptr())
    return out


def _rms_eps(norm_eps) -> float:
    if norm_eps is None:
        return -1.0
    if not (isinstance(norm_eps, (int, float)) and not isinstance(norm_eps, bool) and norm_eps >= 0):
        raise ValueError(f"norm_eps must be None (no normalization) or a float >= 0, got {norm_eps!r}")
    return float(norm_eps)


def _refuse_nonfinite(bad: int) -> None:
    if bad:
        raise ValueError(f"x contains {bad} NaN or infinite values; absmax quantization of them is undefined")


def quantize_i8(x: torch.Tensor, norm_eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-token absmax 8-bit quantization (BitNet b1.58's ``activation_quant``) of float32 ``x[..., K]``,
    bit for bit what the training layer computes (``layers.bitnet``: ``rms_norm``, ``absmax_codes``).

    With ``norm_eps`` (a float) the row is first normalized without parameters,
    ``n = x / sqrt(mean(x^2) + eps)``: float32 squares summed in float64 and rounded once to float32
    (``layers.bitnet.mean_square``), the float32 add of ``eps``, the correctly rounded float32 square
    root, a float32 division. Then, in float32 with round half to even,

        step = max(max_k |n_k|, 1e-5) / 127,   codes = clamp(round(n / step), -128, 127),

    so ``n ~ codes * step``. Returns ``(codes int8 [..., K], step float32 [...])``. NaN or infinite
    inputs raise ValueError.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a float32 tensor [..., K]")
    k = x.shape[-1]
    rows, m = _rows(x, torch.float32, k, "x")
    codes = torch.empty(x.shape, dtype=torch.int8)
    steps = torch.empty(x.shape[:-1], dtype=torch.float32)
    bad = native.library().bq_quantize_i8(rows.data_ptr(), m, k, k, _rms_eps(norm_eps), codes.data_ptr(), k,
                                          steps.data_ptr())
    _refuse_nonfinite(bad)
    return codes, steps


class TernaryI8Linear:
    r"""A packed BitLinear at inference, prepared once: ``layer(x)`` maps float32 ``x[..., K]`` to
    ``y[..., N]`` in one native call,

        codes, step = quantize_i8(x, norm_eps)               (per token, in C++)
        acc = codes @ T^T                                     (exact int32)
        y = float(acc) * (step * weight_scale) (+ bias)       (float32: a product per row, then
                                                               two roundings per output, no FMA)

    the training layer's ``op(codes, code) * (step * s) + b`` (``layers.quantized._IntegerInputOp``)
    with the same roundings, so the output is bit-identical to it (and to ``qat.export``'s
    ``PackedLayer.int8_forward``).

    ``weight_scale`` is the dequantization multiplier of the weights (BitNet b1.58: ``mean|W|``, so
    ``W ~ weight_scale * T``); ``bias`` an optional ``[N]``; ``norm_eps`` (a float) puts the
    parameter-free RMSNorm ``x / sqrt(mean(x^2) + eps)`` first.  Everything but ``x`` is held in a
    native struct, so a call converts four arguments (the per-call cost matters at batch 1).
    Immutable after construction, so one layer may be called from several threads.
    """

    def __init__(self, weights: TernaryI8Weights, weight_scale: float, bias=None, norm_eps: float | None = None):
        _check_weights(weights)
        n = weights.out_features
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (n,):
                raise ValueError(f"bias must be a tensor [{n}], got {getattr(bias, 'shape', type(bias).__name__)}")
            bias = bias.detach().to(device="cpu", dtype=torch.float32).contiguous()
        self.weights, self.bias, self.weight_scale, self.norm_eps = weights, bias, float(weight_scale), norm_eps
        self._args = ctypes.pointer(native.I8Layer(weights.codes.data_ptr(), n, weights.in_features,
                                                   weights.padded_in, self.weight_scale, _rms_eps(norm_eps),
                                                   None if bias is None else bias.data_ptr()))
        self._call = native.library().bq_ternary_i8_layer

    def __getstate__(self):  # the native struct holds raw pointers: pickle what it is built from
        return {"weights": self.weights, "weight_scale": self.weight_scale, "bias": self.bias,
                "norm_eps": self.norm_eps}

    def __setstate__(self, state):
        self.__init__(state["weights"], state["weight_scale"], state["bias"], state["norm_eps"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weights.in_features
        if type(x) is torch.Tensor and x.dtype is torch.float32 and x.is_cpu and x.dim() and x.shape[-1] == k \
                and x.is_contiguous():  # the batch-1 path: each check here costs a fraction of a microsecond
            m = x.numel() // k
        else:
            x, m = _rows(x, torch.float32, k, "x")
        # ints, not a torch.Size: new_empty(Size) / empty(Size, dtype=) cost twice as much at batch 1
        out = torch.empty(*x.shape[:-1], self.weights.out_features, dtype=torch.float32)
        if native._threads != torch.get_num_threads():
            native.sync_threads()
        bad = self._call(self._args, x.data_ptr(), m, out.data_ptr())
        if bad:
            _refuse_nonfinite(bad)
        return out


def ternary_i8_linear(x: torch.Tensor, weights: TernaryI8Weights, weight_scale: float, bias=None,
                      norm_eps: float | None = None) -> torch.Tensor:
    """One call of :class:`TernaryI8Linear` (same formula, same arguments); build the layer once
    instead where it is called many times."""
    return TernaryI8Linear(weights, weight_scale, bias, norm_eps)(x)


# ------------------------------------------------------------------ what training saves for backward
#: the comparisons ``pack_compare`` makes (``native_src/saved_tensors.cpp``'s codes)
COMPARISONS = {"lt": 0, "le": 1, "ge": 2}


def pack_compare(x: torch.Tensor, op: str, threshold: float, absolute: bool = False) -> torch.Tensor:
    """int64 words [ceil(numel / 64)] of ``op(x, threshold)`` (``op(|x|, threshold)`` with
    ``absolute``) over float32 ``x`` flattened: ``layers.bitpack.pack_flags`` of the comparison, in
    one pass (NaN compares false)."""
    x = x.detach().contiguous()
    if x.dtype != torch.float32:
        raise TypeError(f"pack_compare takes float32, got {x.dtype}")
    words = torch.empty(packed_words(x.numel()), dtype=torch.int64)
    native.library().bq_pack_compare(_ptr(x), x.numel(), COMPARISONS[op], float(threshold), int(absolute),
                                     _ptr(words))
    return words


def _channel_layout(x: torch.Tensor, scale: torch.Tensor) -> tuple[int, int, int]:
    """(outer, channels, inner) of contiguous ``x`` [N, C, ...] with one scale per channel."""
    channels = x.shape[1]
    if scale.numel() != channels:
        raise ValueError(f"one scale per channel: {channels} channels, {scale.numel()} scales")
    return x.shape[0], channels, x[0, 0].numel()


def scaled_to_i16(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """int16 ``round(x * inverse_c)`` (half to even) of float32 contiguous ``x`` [N, C, ...], one
    ``inverse`` per channel: ``x.mul(inverse).round_().to(torch.int16)`` bit for bit where the
    result fits int16."""
    outer, channels, inner = _channel_layout(x, inverse)
    inverse = inverse.detach().reshape(-1).to(torch.float32).contiguous()
    out = torch.empty(x.shape, dtype=torch.int16)
    native.library().bq_scaled_to_i16(_ptr(x), outer, channels, inner, _ptr(inverse), _ptr(out))
    return out


def i16_to_scaled(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``codes * scale_c`` of contiguous int16 ``codes`` [N, C, ...]:
    ``codes.to(torch.float32).mul_(scale)`` bit for bit."""
    outer, channels, inner = _channel_layout(codes, scale)
    scale = scale.detach().reshape(-1).to(torch.float32).contiguous()
    out = torch.empty(codes.shape, dtype=torch.float32)
    native.library().bq_i16_to_scaled(_ptr(codes.contiguous()), outer, channels, inner, _ptr(scale), _ptr(out))
    return out


def zero_where_(g: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """``g.masked_fill_(flags, 0.0)`` of contiguous float32 ``g``, the flags as packed words (in place)."""
    if g.dtype != torch.float32 or not g.is_contiguous():
        raise ValueError(f"zero_where_ takes a contiguous float32 tensor, got {g.dtype}")
    words = words.contiguous()
    if words.dtype != torch.int64 or words.numel() < packed_words(g.numel()):
        raise ValueError(f"zero_where_: {g.numel()} flags need {packed_words(g.numel())} int64 words")
    native.library().bq_zero_where(_ptr(words), g.numel(), _ptr(g))
    return g


def quantize_groups(groups: torch.Tensor, seed: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes uint8 [G * size * bits / 8], low [G, 1], step [G, 1]) of float32 ``groups``
    [G, size] (size a multiple of 8), the stochastic rounding's bytes made from the 64-bit ``seed``
    as ``qat.act_compression.rounding_noise`` makes them: ``qat.act_compression``'s
    ``quantize_groups`` in one pass per group (``native_src/saved_tensors.cpp``)."""
    if bits not in (2, 4, 8) or groups.dtype != torch.float32 or groups.dim() != 2 or groups.shape[1] % 8:
        raise ValueError(f"quantize_groups: float32 [G, size] groups, size a multiple of 8, and bits 2, 4 or 8, "
                         f"got {groups.dtype} {tuple(groups.shape)} and {bits}")
    count, size = groups.shape
    groups = groups.contiguous()
    low, step = torch.empty(count, 1), torch.empty(count, 1)
    packed = torch.empty(groups.numel() * bits // 8, dtype=torch.uint8)
    native.library().bq_quantize_groups(_ptr(groups), count, size, seed % 2 ** 64, bits, _ptr(low), _ptr(step),
                                        _ptr(packed))
    return packed, low, step


def dequantize_groups(packed: torch.Tensor, low: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 [G, size] ``code * step + low`` of ``quantize_groups``' output."""
    count = low.numel()
    size = packed.numel() * 8 // bits // count
    low, step = low.contiguous(), step.contiguous()
    out = torch.empty(count, size)
    native.library().bq_dequantize_groups(_ptr(packed.contiguous()), count, size, bits, _ptr(low), _ptr(step),
                                          _ptr(out))
    return out
