"""``summary(model, input_size)``: per-layer precision, size and MACs of a (quantized) model.

Counting is kept apart from printing (as in Larq's ``models.py``): ``LayerProfile`` counts one
layer, ``ModelSummary`` adds them up, ``str(summary)`` renders the table.

Size conventions (state them with any ratio):
- fp32_bytes: every parameter at 32 bits (the float model of the same architecture).
- quantized_bytes: binary weights at 1 bit, ternary at 2 bits (dense packing, rounded up to whole
  bytes per layer), 8-bit weights and quantized embedding tables (method ``int8``) at 8 bits,
  2:4-sparse ternary (a quantizer with ``packed_format = "ternary24"``) at the
  bytes of its packed format (``kernels.ternary24_nbytes``: 4/3 bits per weight, each output
  channel rounded up to whole 16-bit units of 12 weights), their scales (one per output channel,
  one per layer for per-layer TWN) and every float parameter (biases, float layers, BatchNorm
  affine) at 32 bits. BatchNorm running statistics are buffers and are not counted; training-only
  modules (FDA's noise adaptation) are not counted either, since the trained network does not
  use them.
- entropy_coded_bytes: as quantized_bytes, but ternary layers at their zeroth-order entropy
  -sum_s p_s log2 p_s bits per weight over the symbols {-1, 0, +1} (the size a sparse ternary code
  reaches with an ideal entropy coder); 2:4 ternary layers, once their weight is 2:4, over the
  symbols their format codes, the 33 group codes of 4 weights (``kernels.sparse24.group_codes``):
  -sum_c p_c log2 p_c per group, at most log2(33) / 4 = 1.26 bits per weight, never above the
  format's fixed 4/3.
MACs come from one forward pass of a single sample (batch 1) and are split by precision:
binary (1-bit weights x 1-bit inputs), low-bit weight (1/2-bit weights, or 8-bit ones of the int8
and multibit methods, x float or 8-bit inputs: BitNet's int8 activations are not binary; the
"W bits" and "A bits" columns tell them apart) and float. Embedding lookups are gathers: no MACs.
Attention's two products (``F.scaled_dot_product_attention``: q k^T and the weighted sum of v,
L * S * (E + E_v) MACs per head for L queries, S keys, E/E_v features) have no weights of their own
and are float; they are counted on a row of their own for the module that calls the function
(e.g. ``blocks.0.attn``, kind ``Attention``, no parameters). A causal mask does not halve them:
the dense product is what runs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import kernels
from kernels.sparse24 import group_codes, tap_major
from layers import QuantizedEmbedding, QuantizedLayer

#: modules whose weight is stored quantized (their quantizer children are training machinery)
QUANTIZED_MODULES = (QuantizedLayer, QuantizedEmbedding)


@dataclass
class LayerProfile:
    name: str
    kind: str
    weight_bits: int = 32
    input_bits: int = 32
    params: int = 0
    quantized_weights: int = 0  # weights stored at weight_bits
    float_values: int = 0  # parameters and scales stored at 32 bits
    macs: int = 0
    entropy_bits_per_weight: float | None = None  # ternary layers only
    weight_bytes: int | None = None  # the packed format's bytes, where it is not weight_bits per weight

    @property
    def packed_weight_bytes(self) -> int:
        if self.weight_bytes is not None:
            return self.weight_bytes
        return math.ceil(self.quantized_weights * self.weight_bits / 8)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight: 8 * packed_weight_bytes / quantized_weights."""
        return (8 * self.packed_weight_bytes / self.quantized_weights if self.quantized_weights
                else float(self.weight_bits))

    @property
    def packed_bytes(self) -> int:
        return self.packed_weight_bytes + 4 * self.float_values

    @property
    def entropy_coded_bytes(self) -> float:
        if self.entropy_bits_per_weight is None:
            return float(self.packed_bytes)
        return self.quantized_weights * self.entropy_bits_per_weight / 8 + 4 * self.float_values

    @property
    def precision(self) -> str:
        if self.weight_bits == 32:
            return "float"
        return "binary" if self.weight_bits == 1 and self.input_bits == 1 else "low_bit_weight"

    def macs_by_precision(self) -> dict[str, int]:
        out = {"binary": 0, "low_bit_weight": 0, "float": 0}
        out[self.precision] = self.macs
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "packed_bytes": self.packed_bytes, "bits_per_weight": self.bits_per_weight,
                "entropy_coded_bytes": self.entropy_coded_bytes, "macs_by_precision": self.macs_by_precision()}


def ternary_entropy_bits(quantized_weight: torch.Tensor) -> float:
    """Zeroth-order entropy in bits per weight of the symbols sign(q) in {-1, 0, +1}."""
    symbols = torch.sign(quantized_weight.detach()).flatten()
    counts = torch.stack([(symbols == s).sum() for s in (-1, 0, 1)]).double()
    p = counts[counts > 0] / symbols.numel()
    return float(-(p * p.log2()).sum())


def sparse24_entropy_bits(quantized_weight: torch.Tensor) -> float:
    """Zeroth-order entropy of the 2:4 group codes of sign(q) along its tap-major rows, in bits
    per weight: -sum_c p_c log2 p_c times groups / weights."""
    codes = group_codes(tap_major(torch.sign(quantized_weight.detach())))
    p = torch.bincount(codes.flatten().cpu()).double()
    p = p[p > 0] / codes.numel()
    return float(-(p * p.log2()).sum()) * codes.numel() / quantized_weight.numel()


def profile_layer(name: str, module: nn.Module) -> LayerProfile:
    own = [p for p in module.parameters(recurse=False)]
    params = sum(p.numel() for p in own)
    if not isinstance(module, QUANTIZED_MODULES):
        return LayerProfile(name, type(module).__name__, params=params, float_values=params)
    weight = module.weight
    profile = LayerProfile(name, type(module).__name__, module.weight_bits, module.input_bits, params,
                           quantized_weights=weight.numel(),
                           float_values=params - weight.numel() + module.weight_quantizer.scale_count(weight))
    sparse24 = getattr(module.weight_quantizer, "packed_format", None) == "ternary24"
    if sparse24:
        profile.weight_bytes = kernels.ternary24_nbytes(weight.shape[0], weight[0].numel())
    if module.weight_bits == 2:
        with torch.no_grad():
            quantized = module.quantized_weight()
        # before its prune_at a 2:4 layer is dense ternary: then its weights' own entropy
        entropy = sparse24_entropy_bits if sparse24 and module.weight_quantizer.pruned else ternary_entropy_bits
        profile.entropy_bits_per_weight = entropy(quantized)
    return profile


def _counted_modules(model: nn.Module):
    """Quantized layers (whose children are training machinery) and other modules owning parameters."""
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, QUANTIZED_MODULES):
            skip_prefixes.append(f"{name}." if name else "")
            yield name, module
        elif isinstance(module, (nn.Conv2d, nn.Linear)) or any(True for _ in module.parameters(recurse=False)):
            yield name, module


def _count_macs(model: nn.Module, input_size, targets: dict[str, nn.Module],
                input_dtype: torch.dtype | None = None) -> dict[str, int]:
    macs: dict[str, int] = {}
    handles = []

    def hook_for(name):
        def hook(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            else:
                per_output = module.in_features
            macs[name] = macs.get(name, 0) + output.numel() // output.shape[0] * per_output
        return hook

    for name, module in targets.items():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook_for(name)))
    calling = AttentionMacs(macs)
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(calling.enter(name)))
        handles.append(module.register_forward_hook(calling.leave))
    reference = next(model.parameters(), None)
    if input_dtype is None and reference is not None:
        input_dtype = reference.dtype
    x = torch.zeros(1, *input_size, device=reference.device if reference is not None else None, dtype=input_dtype)
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), calling:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in was_training.items():
            m.training = mode
    return macs


class AttentionMacs(TorchFunctionMode):
    """Adds the MACs of every ``F.scaled_dot_product_attention`` call to ``macs[<calling module>]``
    (the innermost module whose forward is running, tracked by the pre/post hooks ``enter``/``leave``)."""

    def __init__(self, macs: dict[str, int]):
        super().__init__()
        self.macs = macs
        self.stack: list[str] = []

    def enter(self, name: str):
        def hook(module, inputs):
            self.stack.append(name)
        return hook

    def leave(self, module, inputs, output):
        self.stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.stack:
            query, key, value = (kwargs[n] if n in kwargs else args[i] for i, n in enumerate(("query", "key", "value")))
            heads = math.prod(query.shape[:-2])  # batch 1: the heads
            count = heads * query.shape[-2] * key.shape[-2] * (query.shape[-1] + value.shape[-1])
            self.macs[self.stack[-1]] = self.macs.get(self.stack[-1], 0) + count
        return func(*args, **kwargs)


@dataclass
class ModelSummary:
    layers: list[LayerProfile] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.params

    @property
    def quantized_bytes(self) -> int:
        return sum(layer.packed_bytes for layer in self.layers)

    @property
    def entropy_coded_bytes(self) -> float:
        return sum(layer.entropy_coded_bytes for layer in self.layers)

    @property
    def compression(self) -> float:
        return self.fp32_bytes / self.quantized_bytes if self.quantized_bytes else 1.0

    @property
    def macs(self) -> dict[str, int]:
        total = {"binary": 0, "low_bit_weight": 0, "float": 0}
        for layer in self.layers:
            for k, v in layer.macs_by_precision().items():
                total[k] += v
        return total

    @property
    def binary_mac_share(self) -> float:
        """Share of all MACs that are binary (1-bit weights x 1-bit inputs)."""
        macs = self.macs
        total = sum(macs.values())
        return macs["binary"] / total if total else 0.0

    def to_dict(self) -> dict:
        return {"params": self.params, "fp32_bytes": self.fp32_bytes, "quantized_bytes": self.quantized_bytes,
                "entropy_coded_bytes": self.entropy_coded_bytes, "compression": self.compression,
                "binary_mac_share": self.binary_mac_share, "macs": self.macs,
                "layers": [layer.to_dict() for layer in self.layers]}

    def __str__(self) -> str:
        header = ("layer", "kind", "W bits", "A bits", "params", "packed bytes", "MACs binary", "MACs lowbit-W",
                  "MACs float")

        def bits(layer):
            return str(layer.weight_bits) if layer.weight_bytes is None else f"{layer.bits_per_weight:.3g}"

        rows = [(layer.name or "(model)", layer.kind, bits(layer), str(layer.input_bits), f"{layer.params:,}",
                 f"{layer.packed_bytes:,}", *(f"{v:,}" for v in layer.macs_by_precision().values()))
                for layer in self.layers]
        macs = self.macs
        rows.append(("total", "", "", "", f"{self.params:,}", f"{self.quantized_bytes:,}",
                     *(f"{v:,}" for v in macs.values())))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(r):
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=False)))

        rule = "-" * len(line(header))
        footer = (f"float32 size: {self.fp32_bytes:,} B | quantized size: {self.quantized_bytes:,} B "
                  f"(entropy-coded {self.entropy_coded_bytes:,.0f} B) | compression: {self.compression:.2f}x "
                  f"| binary MAC share: {self.binary_mac_share:.1%}")
        return "\n".join([line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1]), footer])


def summary(model: nn.Module, input_size, input_dtype: torch.dtype | None = None) -> ModelSummary:
    """Profile ``model`` for inputs of ``input_size`` = (C, H, W), (features,) or (tokens,), without batch
    dim; ``input_dtype``: the inputs' dtype where it is not the parameters' (``torch.long`` token ids)."""
    input_size = tuple(int(s) for s in input_size)
    targets = dict(_counted_modules(model))
    macs = _count_macs(model, input_size, targets, input_dtype)
    profiles = []
    for name, module in targets.items():
        profile = profile_layer(name, module)
        profile.macs = macs.get(name, 0)
        profiles.append(profile)
    # modules without parameters of their own that called attention (its float products)
    profiles += [LayerProfile(name, type(model.get_submodule(name)).__name__, macs=count)
                 for name, count in macs.items() if name not in targets]
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    return ModelSummary(sorted(profiles, key=lambda profile: order[profile.name]))
