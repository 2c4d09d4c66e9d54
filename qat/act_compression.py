"""Compressed activations for backward: what a training step keeps between forward and backward.

    >>> compression = qat.set_act_compression(model, "int4", {"layers.3.*": "exact"})
    >>> with compression.saving():          # around the forward only
    ...     loss = loss_fn(model(images), labels)
    >>> loss.backward()

Modes (``MODES``):

``none``   every saved tensor stays as it is (PyTorch's default).
``exact``  bit-identical gradients, less memory:
           - binary-input layers save sign(x) and where their estimator's derivative is 0 as
             packed bits (``layers.quantized._PackedSignInputOp``; smooth estimators keep x);
           - the output of such a layer, y = S * alpha_c with integer |S| <= K, is saved as int16 S
             wherever the next op saves it (BatchNorm, max-pool); S * alpha_c == y bit for bit
             follows from the conv's exact integer sums, checked on a sample when packed (else kept
             as float, see ``_compress``);
           - ReLU and Hardtanh modules save one bit per element (whether the input is inside the
             linear range), all that their backward reads;
           - int64 tensors whose values fit int16 (max-pool indices) are saved as int16;
           - max-pool modules' inputs are kept as their shape only (``_ShapeOnly``): max-pool's
             backward scatters the gradient through the saved indices and reads its saved input
             for the shape alone (a test compares the gradients bit for bit, 1-d to 3-d pooling).
             Channels-last inputs keep their usual form: the backward takes its memory format
             from the input's strides.
           (8-bit-input layers, BitNet's, are not binary-input layers here: they save their input
           codes as int8 in every mode, ``layers.quantized._IntegerInputOp``.)
``int8`` / ``int4`` / ``int2``  ``exact``, plus every other float activation saved (float
           convolutions' and linears' inputs, BatchNorm, PReLU, pooling, ...; not the model's input
           batch, which the caller holds anyway) quantized per group of ``group_size`` (256)
           consecutive elements to b bits with stochastic rounding, as ActNN (Chen et al. 2021) and
           GACT (Liu et al. 2022) do:
               lo, hi = min, max of the group,  s = (hi - lo) / (2^b - 1),
               q = clamp(floor((x - lo) / s + u), 0, 2^b - 1),  u ~ U[0, 1),   x~ = lo + s q,
           unbiased (E[x~] = x, u drawn with 8 random bits: see ``rounding_noise``) with
           |x~ - x| < s. Stored: b bits per element + lo and s as float32
           per group (0.25 bit per element). Weights and parameter-derived tensors are never touched.
           BatchNorm inputs get at least ``norm_bits`` = 8 (a fixed allocation in the spirit of GACT's
           adaptive one): BN's backward multiplies the error of x_hat into every gradient upstream;
           measured on mnist_bnn (XNOR, after 30 Adam steps, batch 64), the relative error of the
           conv weight gradients is 2.2-2.3 with 2-bit BN inputs and 0.4-0.5 with 4-bit ones,
           against 0.02-0.03 with 8-bit ones (``norm_bits=None`` quantizes them like the rest).

Installed with ``torch.autograd.graph.saved_tensors_hooks``: no model changes. Per-module-name glob
overrides (``{"layers.0.*": "none"}``) set the mode for a module and everything inside it; the last
matching glob wins. The same hooks count what is saved (``record()``), which ``python -m qat.train.memory``
reports.
"""
from __future__ import annotations

import fnmatch
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kernels import cpu_native, native
from layers import QuantizedLayer
from layers.bitpack import pack_compare, pack_flags, unpack_values
from layers.quantized import INT16_MAX, INTEGER_FORM_ATTR, integer_form, is_weight_side

MODES = ("none", "exact", "int8", "int4", "int2")
INT_BITS = {"int8": 8, "int4": 4, "int2": 2}
GROUP_SIZE = 256
#: Bits for BatchNorm inputs in the int modes (at least): see the module docstring.
NORM_BITS = 8
#: Saved tensors smaller than this are kept as they are (per-channel statistics, scales).
MIN_NUMEL = 4096
_ATTR = "_qat_act_compression"


def check_mode(mode, where: str = "act_compression") -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{where}={mode!r} is not a compression mode; valid: {', '.join(MODES)}")
    return mode


# ------------------------------------------------------------------------------ packed forms
@dataclass
class _Mask:
    """An activation module's saved tensor as one bit per element: stopped[i] = its backward
    gives 0 there. Rebuilt as ``outside`` where stopped and ``inside`` elsewhere, which gives the
    module's backward the same mask (ReLU: 0.0 / 1.0; Hardtanh: max_val / the midpoint)."""
    words: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    inside: float
    outside: float

    def unpack(self) -> torch.Tensor:
        return unpack_values(self.words, self.shape, (self.inside, self.outside), self.dtype)


@dataclass
class _Integer:
    """y = S * scale stored as int16 S (exact, see ``layers.quantized.integer_form``)."""
    codes: torch.Tensor
    scale: torch.Tensor

    def unpack(self) -> torch.Tensor:
        if _native_per_channel(self.codes, self.scale):
            return cpu_native.i16_to_scaled(self.codes, self.scale)
        return self.codes.to(self.scale.dtype).mul_(self.scale)


def _native_per_channel(t: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether the native engine's one-pass int16 forms apply: contiguous ``t`` on CPU, float32
    scales varying along dim 1 only (one per channel, [C] or [1, C, 1, ...] broadcast to t)."""
    if t.device.type != "cpu" or scale.dtype != torch.float32 or t.dim() < 2 or not t.is_contiguous():
        return False
    shape = (1,) * (t.dim() - scale.dim()) + tuple(scale.shape)
    per_channel = len(shape) == t.dim() and shape[1] == t.shape[1] and all(
        size == 1 for i, size in enumerate(shape) if i != 1)
    return per_channel and native.available()


@dataclass
class _Quantized:
    """Per-group b-bit codes with stochastic rounding (module docstring, ``quantize_groups``)."""
    codes: torch.Tensor      # uint8, 8 // bits codes per byte (first code in the low bits)
    low: torch.Tensor        # [groups, 1] float32
    step: torch.Tensor       # [groups, 1] float32
    bits: int
    shape: torch.Size
    dtype: torch.dtype
    channels_last: bool

    def unpack(self) -> torch.Tensor:
        if self.codes.device.type == "cpu" and native.available():  # the same two roundings in one pass
            values = cpu_native.dequantize_groups(self.codes, self.low, self.step, self.bits)
            x = values.view(-1)[: self.shape.numel()].to(self.dtype).view(self.shape)
            return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        codes = _unpack_codes(self.codes, self.bits).view(self.low.shape[0], -1)
        if codes.device.type == "cpu":  # the same two roundings, NumPy's broadcast loops are faster here
            values = codes.numpy().astype(np.float32)
            values *= self.step.numpy()
            values += self.low.numpy()
            values = torch.from_numpy(values)
        else:
            values = codes.to(torch.float32).mul_(self.step).add_(self.low)
        x = values.view(-1)[: self.shape.numel()].to(self.dtype).view(self.shape)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


# Sub-byte codes are packed by viewing 8 / b consecutive one-byte codes as one integer word
# (little-endian). On CUDA shifted copies are OR-ed: for b = 2, byte = c0 | c1 << 2 | c2 << 4 | c3 << 6
# is the low byte of w | w >> 6 | w >> 12 | w >> 18 with w = c0 + c1 << 8 + c2 << 16 + c3 << 24,
# since every c_i < 4 (one pass over n / 4 words instead of a shift per code). On CPU one NumPy
# multiply per word gathers them (unsigned, wrapping: only bits above 31 are lost): bits 18..25 of
# w * (2^18 + 2^12 + 2^6 + 1) are that byte, c_i arriving through the term 2^(18 - 6i) and every other
# product landing in a 2-bit field of its own below bit 18 or from bit 26 up (no carries); for
# b = 4, bits 4..11 of w * 17 with w = c0 + c1 << 8. Unpacking on CPU reads a [256, 8 / b] table of
# the codes in each byte (one gather).
_WORD = {2: (torch.int32, (6, 12, 18), 0x03030303), 4: (torch.int16, (4,), 0x0F0F)}
_GATHER = {2: (np.uint32, (1 << 18) + (1 << 12) + (1 << 6) + 1, 18), 4: (np.uint16, 17, 4)}
_CODE_TABLES = {bits: ((np.arange(256)[:, None] >> np.arange(0, 8, bits)[None, :]) & (2 ** bits - 1)).astype(np.uint8)
                for bits in (2, 4)}


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes
    if codes.device.type == "cpu":
        dtype, multiplier, shift = _GATHER[bits]
        words = codes.numpy().view(dtype)
        return torch.from_numpy(((words * dtype(multiplier)) >> dtype(shift)).astype(np.uint8))
    dtype, shifts, _ = _WORD[bits]
    w = codes.view(dtype)
    packed = w.clone()
    for shift in shifts:
        packed.bitwise_or_(w >> shift)
    return packed.to(torch.uint8)  # the low byte


def _unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    if packed.device.type == "cpu":
        return torch.from_numpy(np.take(_CODE_TABLES[bits], packed.numpy(), axis=0).reshape(-1))
    dtype, shifts, mask = _WORD[bits]
    w = packed.to(dtype)
    words = w.clone()
    for shift in shifts:
        words.bitwise_or_(w << shift)
    return words.bitwise_and_(mask).view(torch.uint8)


def quantize_groups(t: torch.Tensor, bits: int, group_size: int = GROUP_SIZE,
                    generator: torch.Generator | None = None) -> _Quantized:
    """``t`` as per-group ``bits``-bit codes with stochastic rounding (module docstring).

    The rounding noise is u = (r + 1/2) / 256 with r a uniform random byte (``rounding_noise``: 8
    bits per element from one 64-bit seed drawn from ``generator``), so E[x~] = x up to 1/512 of a
    step. ``group_size``: a positive multiple of 8 (whole noise words, whole bytes of codes)."""
    if group_size < 8 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size}")
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    flat = t.detach().reshape(-1)
    pad = (-flat.numel()) % group_size
    if pad:  # the last group is padded with copies of its first element: no wider range
        flat = torch.cat([flat, flat[-group_size + pad:][:1].expand(pad)])
    groups = flat.view(-1, group_size).to(torch.float32)
    seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64, device=groups.device, generator=generator)
    if groups.device.type == "cpu" and native.available():  # the same noise, ranges and codes, one pass per group
        packed, low, step = cpu_native.quantize_groups(groups, int(seed), bits)
        return _Quantized(packed, low, step, bits, t.shape, t.dtype, channels_last)
    noise = rounding_noise(int(seed) if groups.device.type == "cpu" else seed, groups.numel(), groups.device)
    noise = noise.view(groups.shape)
    low, high = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    levels = 2 ** bits - 1
    step = (high - low).div_(levels)
    inverse = torch.where(step > 0, step.reciprocal(), torch.zeros((), device=step.device))
    rounding = _round_groups_numpy if groups.device.type == "cpu" else _round_groups
    codes = rounding(groups, low, inverse, noise, levels)
    return _Quantized(_pack_codes(codes.view(-1), bits), low, step, bits, t.shape, t.dtype, channels_last)


# SplitMix64 (Steele, Lea and Flood 2014, as java.util.SplittableRandom): its increment and output mixers
_SPLITMIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def rounding_noise(seed: int | torch.Tensor, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [n] (n a multiple of 8): the stochastic rounding's random bytes, bytes 0..7 (little-endian)
    of word k = 0, 1, ... being SplitMix64's output for counter k:

        z = seed + (k + 1) * 0x9E3779B97F4A7C15            (mod 2^64)
        z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9;  z = (z ^ z >> 27) * 0x94D049BB133111EB;  z ^ z >> 31

    A counter-based generator: the native quantization (``kernels/native_src/saved_tensors.cpp``)
    computes the same bytes inside its pass instead of reading them, where drawing them with
    ``torch.randint`` cost more than the quantization itself (1.3 ms against 1.1 ms per 2M elements
    on the 2-core AMD EPYC). ``seed``: a Python int on CPU (NumPy, wrapping uint64), an int64 tensor
    of one element elsewhere (torch's int64 arithmetic wraps the same way; ``>>`` is made logical
    by masking), so no device synchronisation."""
    words = n // 8
    if not isinstance(seed, torch.Tensor):
        increment, mix1, mix2 = (np.uint64(c) for c in _SPLITMIX)
        z = np.arange(1, words + 1, dtype=np.uint64) * increment + np.uint64(seed % 2 ** 64)
        for shift, multiplier in ((30, mix1), (27, mix2)):
            z ^= z >> np.uint64(shift)
            z *= multiplier
        z ^= z >> np.uint64(31)
        return torch.from_numpy(z.view(np.uint8)).to(device)
    increment, mix1, mix2 = (c - 2 ** 64 for c in _SPLITMIX)  # the same bits as int64

    def logical_shift(v, shift):
        return (v >> shift) & ((1 << (64 - shift)) - 1)

    z = torch.arange(1, words + 1, dtype=torch.int64, device=seed.device).mul_(increment).add_(seed)
    for shift, multiplier in ((30, mix1), (27, mix2)):
        z = (z ^ logical_shift(z, shift)).mul_(multiplier)
    return (z ^ logical_shift(z, 31)).view(torch.uint8)


def _round_groups(groups, low, inverse, noise, levels: int) -> torch.Tensor:
    """``quantize_groups``' codes clamp(floor((x - lo) / s + u), 0, levels) as uint8, u = (r + 1/2) / 256."""
    scaled = (groups - low).mul_(inverse).add_(noise, alpha=1 / 256).add_(1 / 512)
    return scaled.clamp_(0, levels).to(torch.uint8)  # truncation of values >= 0 = floor


def _round_groups_numpy(groups, low, inverse, noise, levels: int) -> torch.Tensor:
    """``_round_groups`` on CPU: the same float32 operations in the same order, so the same codes
    (r / 256 is exact, and PyTorch's add with alpha rounds once), in NumPy, whose one-thread loops
    took about half the time of PyTorch's broadcast and mixed-dtype ones here. NaN gives 0."""
    scaled = np.subtract(groups.numpy(), low.numpy())
    np.multiply(scaled, inverse.numpy(), out=scaled)
    u = noise.numpy().astype(np.float32)
    u *= np.float32(1 / 256)
    scaled += u
    scaled += np.float32(1 / 512)
    np.clip(scaled, 0, levels, out=scaled)
    with np.errstate(invalid="ignore"):
        return torch.from_numpy(scaled.astype(np.uint8))  # truncation of values >= 0 = floor


@dataclass
class _Narrowed:
    """An int64 tensor (max-pool indices) whose values fit int16: stored as int16, exact."""
    values: torch.Tensor

    def unpack(self) -> torch.Tensor:
        return self.values.to(torch.int64)


@dataclass
class _ShapeOnly:
    """A max-pool's saved input, of which its backward reads the shape only (module docstring):
    rebuilt as zeros expanded to the shape (one element of memory, contiguous strides' layout)."""
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def unpack(self) -> torch.Tensor:
        return torch.zeros((), dtype=self.dtype, device=self.device).expand(self.shape)


def _narrow(t: torch.Tensor):
    low, high = torch.aminmax(t)
    if int(low) >= -INT16_MAX and int(high) <= INT16_MAX:
        return _Narrowed(t.to(torch.int16))
    return t


def packed_nbytes(packed) -> int:
    """Bytes held by a packed form (or a plain tensor)."""
    if isinstance(packed, torch.Tensor):
        return packed.numel() * packed.element_size()
    return sum(v.numel() * v.element_size() for v in vars(packed).values() if isinstance(v, torch.Tensor))


# ------------------------------------------------------------------------------ accounting
@dataclass
class SavedBytes:
    """What one step saved for backward, counted by the pack hook.

    ``saved``: every save, as stored (a tensor saved by two ops counts twice), parameters and
    buffers excluded (they exist anyway); ``held``: the distinct storages those saves keep alive
    (a tensor saved by two ops counts once): the memory a step holds for backward;
    ``binary_inputs``: the saves made inside binary-input layers (their input x, sign(x), masks),
    weights excluded; ``count``: number of saves."""
    saved: int = 0
    held: int = 0
    binary_inputs: int = 0
    count: int = 0
    _seen: set = field(default_factory=set, repr=False)

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


# ------------------------------------------------------------------------------ the hooks
@dataclass
class _Frame:
    mode: str
    kind: str            # "relu" | "hardtanh" | "binary" | "norm" | "max_pool" | "module"
    module: nn.Module


class ActCompression:
    """The hooks of one model; built by ``set_act_compression``. ``saving()`` wraps a forward."""

    def __init__(self, model: nn.Module, mode: str = "none", overrides: dict | None = None,
                 group_size: int = GROUP_SIZE, min_numel: int = MIN_NUMEL, norm_bits: int | None = NORM_BITS):
        self.mode = check_mode(mode)
        self.overrides = {str(k): check_mode(v, f"act_compression override {k!r}")
                          for k, v in (overrides or {}).items()}
        self.group_size, self.min_numel = int(group_size), int(min_numel)
        self.norm_bits = norm_bits
        self.model = model
        self._local = threading.local()
        self._handles = []
        self.stats: SavedBytes | None = None
        names = [name for name, _ in model.named_modules()]
        for glob in self.overrides:
            if not any(fnmatch.fnmatchcase(name, glob) for name in names):
                shown = ", ".join(n for n in names[:12] if n)
                raise ValueError(f"act_compression override {glob!r} matches no module; module names: {shown}, ...")
        modes = {"": self._mode_of("", self.mode)}
        for name, module in model.named_modules():
            if name:
                modes[name] = self._mode_of(name, modes[name.rpartition(".")[0]])
            if isinstance(module, QuantizedLayer):
                module.act_compression = "exact" if modes[name] != "none" else "none"
            kind = self._kind(module)
            parent = modes[name.rpartition(".")[0]] if name else self.mode
            if kind != "module" or modes[name] != parent:
                frame = _Frame(modes[name], kind, module)
                self._handles.append(module.register_forward_pre_hook(self._enter(frame)))
                self._handles.append(module.register_forward_hook(self._leave, always_call=True))
            if isinstance(module, nn.MaxPool2d) and modes[name] != "none":
                self._handles.append(module.register_forward_hook(self._max_pool_keeps_integer_form))
        self._handles.append(model.register_forward_pre_hook(self._keep_inputs))
        setattr(model, _ATTR, self)

    def _keep_inputs(self, module, args):
        """The model's input batch is held by the caller through backward anyway: saves of it
        are kept as they are (compressing them would add memory and error, and save nothing)."""
        if hasattr(self, "_kept"):
            self._kept |= {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}

    @staticmethod
    def _max_pool_keeps_integer_form(module, args, output):
        """max over a window of S_i * s_c (s_c >= 0, one channel) is (max S_i) * s_c: the pooled
        output of a binary layer is in integer form too (checked again when packed)."""
        form = integer_form(args[0]) if args and isinstance(args[0], torch.Tensor) else None
        if form is not None and isinstance(output, torch.Tensor) and bool((form[0] >= 0).all()):
            setattr(output, INTEGER_FORM_ATTR, (form[0], form[1], output._version))

    def _mode_of(self, name: str, inherited: str) -> str:
        mode = inherited
        for glob, value in self.overrides.items():
            if fnmatch.fnmatchcase(name, glob):
                mode = value
        return mode

    @staticmethod
    def _kind(module: nn.Module) -> str:
        if isinstance(module, nn.ReLU):
            return "relu"
        if isinstance(module, nn.Hardtanh):  # ReLU6 too
            return "hardtanh"
        if isinstance(module, QuantizedLayer) and module.input_bits == 1:  # not BitNet's int8 inputs
            return "binary"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return "norm"
        if isinstance(module, nn.modules.pooling._MaxPoolNd):
            return "max_pool"
        return "module"

    # -------------------------------------------------------------------- module context
    def _stack(self) -> list:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _enter(self, frame: _Frame):
        def hook(module, args):
            self._stack().append(frame)
        return hook

    def _leave(self, module, args, output):
        stack = self._stack()
        if stack:
            stack.pop()

    # -------------------------------------------------------------------- pack / unpack
    @contextmanager
    def saving(self):
        """Compress what the forward run inside saves for backward (unpacked during backward)."""
        self._kept = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        self._kept |= {b.untyped_storage().data_ptr() for b in self.model.buffers()}
        self._stack().clear()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self

    @contextmanager
    def record(self):
        """Count what the forward(s) inside save (``self.stats``, a ``SavedBytes``)."""
        stats = self.stats = SavedBytes()
        try:
            yield stats
        finally:
            stats._seen.clear()
            self.stats = None

    def _pack(self, t: torch.Tensor):
        stack = self._stack()
        frame = stack[-1] if stack else None
        mode = frame.mode if frame else self.mode
        packed = t
        kept = t.untyped_storage().data_ptr() in self._kept
        if mode != "none" and t.numel() >= self.min_numel and not kept:
            if t.is_floating_point() and not is_weight_side(t):
                packed = self._compress(t, mode, frame)
            elif t.dtype == torch.int64 and (frame is None or frame.kind != "binary"):
                packed = _narrow(t)
        if self.stats is not None:
            self._count(t, packed, frame, kept)
        return packed

    def _compress(self, t: torch.Tensor, mode: str, frame: _Frame | None):
        if frame is not None and frame.kind in ("relu", "hardtanh"):
            return self._mask(t, frame.module)
        if frame is not None and frame.kind == "max_pool" and t.is_contiguous():
            return _ShapeOnly(t.shape, t.dtype, t.device)
        if mode in INT_BITS:
            bits = INT_BITS[mode]
            if frame is not None and frame.kind == "norm" and self.norm_bits:
                bits = max(bits, self.norm_bits)
            return quantize_groups(t, bits, self.group_size)
        form = integer_form(t)
        if form is not None and form[1] <= INT16_MAX:
            scale = form[0]
            # |S| <= K < 2^15 and y = fl(S * s) is within 2^-24 relative of S * s, so
            # round(y * (1 / s)) is S exactly. That y really is S * s (the conv summed the +-1
            # products exactly, as float32 sums of integers below 2^24 do in any order; a
            # Winograd or FFT backend would not) is checked on the first example of the batch:
            # such a backend is inexact almost everywhere, so a sample finds it, at 1/N of a pass.
            if t.dtype == torch.float32 and _native_per_channel(t, scale):
                codes = cpu_native.scaled_to_i16(t, scale.reciprocal())  # the same codes in one pass
            else:
                codes = t.mul(scale.reciprocal()).round_().to(torch.int16)
            if torch.equal(codes[:1].to(t.dtype).mul_(scale), t[:1]):
                return _Integer(codes, scale)
        return t

    @staticmethod
    def _mask(t: torch.Tensor, module: nn.Module) -> _Mask:
        if isinstance(module, nn.ReLU):  # threshold_backward(g, y, 0): 0 where y <= 0
            return _Mask(pack_compare(t, "le", 0.0), t.shape, t.dtype, 1.0, 0.0)
        low, high = float(module.min_val), float(module.max_val)  # 0 where x <= min or x >= max
        if low == -high:
            words = pack_compare(t, "ge", high, absolute=True)
        else:
            words = pack_flags(torch.le(t, low).logical_or_(torch.ge(t, high)))
        return _Mask(words, t.shape, t.dtype, (low + high) / 2, high)

    @staticmethod
    def _unpack(packed):
        return packed if isinstance(packed, torch.Tensor) else packed.unpack()

    def _count(self, t: torch.Tensor, packed, frame: _Frame | None, kept: bool) -> None:
        stats = self.stats
        if kept:
            return
        stored = packed_nbytes(packed)
        stats.count += 1
        stats.saved += stored
        key = t.untyped_storage().data_ptr() if packed is t else id(packed)
        if key not in stats._seen:
            stats._seen.add(key)
            stats.held += stored
        if frame is not None and frame.kind == "binary" and not is_weight_side(t):
            stats.binary_inputs += stored

    def describe(self) -> dict:
        return {"mode": self.mode, "overrides": dict(self.overrides), "group_size": self.group_size,
                "norm_bits": self.norm_bits}

    def remove(self) -> None:
        """Take the hooks off and put binary layers back to float saves."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self.model.modules():
            if isinstance(module, QuantizedLayer):
                module.act_compression = "none"
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)


def set_act_compression(model: nn.Module, mode: str = "none", overrides: dict | None = None,
                        **options) -> ActCompression:
    """Install compressed saving on ``model`` (replacing an earlier one) and return its handle;
    use ``handle.saving()`` (or ``qat.act_compression.saving(model)``) around each forward."""
    previous = getattr(model, _ATTR, None)
    if previous is not None:
        previous.remove()
    return ActCompression(model, mode, overrides, **options)


def saving(model: nn.Module):
    """The ``saving()`` context of the compression installed on ``model``, else a no-op."""
    installed = getattr(model, _ATTR, None)
    return installed.saving() if installed is not None else nullcontext()

