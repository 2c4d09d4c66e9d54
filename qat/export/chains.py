r"""Binary chains pass bits: a packed model rewritten so that a binary layer whose output only
feeds another binary layer's sign emits the packed signs itself (``fuse_binary_chains``).

A binary-input layer needs only ``sign(x)`` of its input.  When the path from a binary layer P to
the next binary layer C is made of ops that keep or transform that sign exactly, P's kernel can
emit C's packed input in its output pass (``kernels.cpu_native`` OUT_SIGN) and C can skip its own
packing: no float tensor is written or read between them.  The ops allowed on the path:

* per-channel affine maps ``z = s y + t``: a folded or eval-mode BatchNorm (and P's own
  ``scale * acc + bias``) compose into one ``z = acc * M + A`` (float64, then the sign);
* sign-keeping ops: ``Identity``, ``FoldedBatchNorm``, ``Dropout`` (eval), ``Hardtanh`` with
  ``min_val < 0 <= max_val`` (then no affine map may follow it: a shift after a clamp does not
  keep the sign);
* ``MaxPool2d``, computed on bits.  For a per-channel map ``g`` applied after the pool,
  ``g(max_i y_i) = max_i g(y_i)`` when ``g`` is non-decreasing and ``min_i g(y_i)`` when it is
  decreasing (exact, rounding included, as ``g`` is monotone); with bit 1 = negative, the pooled
  bit is the **AND** of the window's bits in the first case and the **OR** in the second.
  Padding reads the neutral element (1 for AND, 0 for OR), as max-pool's ``-inf`` padding does;
* ``Flatten`` before a binary ``Linear``: the linear over NCHW-flattened features is a
  convolution whose kernel covers the whole ``H x W`` map, so its weights are used as such.

A binary conv whose float output only goes into a residual add (``y + identity``, then perhaps a
``Hardtanh``), as in a ResNet block, adds the identity and clamps as it writes its output: the same
float32 operations in the same order, so bit-identical, without the two passes over the tensor.

Where a *float* layer's output reaches a binary conv through such a chain holding a BatchNorm or a
max-pool, a ``SignPacker`` takes the chain's place: ``sign(y * M + A)`` packed, then the same bit
pools (e.g. mnist_cnn's float first conv -> max-pool -> BatchNorm -> binary conv).  When that float
layer is a small ``nn.Conv2d`` (at most ``SMALL_CONV_TAPS`` = C x kh x kw, groups 1, zero padding)
used only there, or a packed conv of that size with float input (binary weights on float pixels,
Larq's BNN's first layer: its float weights ``scale * code``), the sign packer computes the conv too
(``cpu_native.FloatConvSign``) and pools in the same call: the float output is never written.
Its float32 sum runs in (c, i, j) order, which may differ from torch's conv in the last bit --
again only a value within a rounding of the sign threshold can change.

Each fused layer keeps its kernel call plans per input shape (at batch 1 the per-call checks cost
more than mnist_cnn's kernels); a state-dict load empties them.

What changes: the sign is taken of ``acc * M + A`` computed in float64, where the float model
rounds each step in float32 -- the same kind of difference BatchNorm folding makes (a value
within a rounding of 0 may take the other sign).  The result is for CPU inference with the
native engine; it shares the packed model's layers and is not meant for ``save_packed`` (save the
model ``pack_model`` returned and fuse after loading).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

import kernels
from kernels import cpu_native, native

from .packed import FoldedBatchNorm, PackedConv2d, PackedLayer, PackedLinear

__all__ = ["fuse_binary_chains", "PackedMaxPool2d", "FusedBinaryLayer", "SignPacker"]


class PackedMaxPool2d(nn.Module):
    """Max-pool of signs on packed NHWC words: per channel the AND (bit 1 where ``and_mask``) or
    the OR of the window's bits; out-of-range taps are skipped (the neutral element)."""

    def __init__(self, pool: nn.MaxPool2d, and_mask: torch.Tensor):
        super().__init__()
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        self.kernel_size, self.stride = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size)
        self.padding, self.dilation = pair(pool.padding), pair(pool.dilation)
        self.register_buffer("and_mask", and_mask)
        self._plans = cpu_native.PlanCache()  # input shape -> MaxPoolBitsPlan

    def plan(self, shape) -> cpu_native.MaxPoolBitsPlan:
        plan = self._plans.get(shape)
        if plan is None or plan.and_mask is not self.and_mask:  # a new buffer (a load, .to()) gets a new plan
            plan = self._plans[shape] = cpu_native.MaxPoolBitsPlan(shape, self.and_mask, self.kernel_size,
                                                                   self.stride, self.padding, self.dilation)
        return plan

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        return self.plan(bits.shape).run(bits.contiguous())


@dataclass
class Emit:
    """How a producer turns its accumulator into the consumer's packed input."""

    mul: torch.Tensor  # float64 [O]: z = acc * mul + add
    add: torch.Tensor
    pools: list = field(default_factory=list)  # PackedMaxPool2d, applied in order


class FusedBinaryLayer(nn.Module):
    """A packed binary layer that may take packed bits as input and/or emit packed bits."""

    def __init__(self, layer: PackedLayer, takes_bits: bool, emit: Emit | None, flattened_input: bool = False):
        super().__init__()
        self.layer, self.takes_bits, self.flattened_input = layer, takes_bits, flattened_input
        self.emits = emit is not None
        if emit is not None:  # buffers, so that a state dict carries them
            self.register_buffer("emit_mul", emit.mul.double().contiguous())
            self.register_buffer("emit_add", emit.add.double().contiguous())
        self.pools = nn.ModuleList(emit.pools if emit else [])
        self.clamp = None  # (lo, hi): a Hardtanh after the residual add, applied as the output is written
        self._as_conv = {}  # flattened-input linear: spatial size -> prepacked conv weights
        # (input shape, with residual) -> _Step; at batch 1 the per-call checks cost more than the kernels.
        # Emptied by a state-dict load; an in-place edit of the buffers is not seen.
        self._steps = cpu_native.PlanCache()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._as_conv, self._steps = {}, cpu_native.PlanCache()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        native_weights = self.layer.native_weights()
        step = self._steps.get((x.shape, residual is None))
        if step is None or step.native_weights is not native_weights or step.clamp != self.clamp:
            step = self._steps[x.shape, residual is None] = self._step(x, residual, native_weights)
        return step.run(x, residual)

    def _step(self, x, residual, native_weights) -> _Step:
        layer = self.layer
        weights, mul, add = native_weights
        if self.emits:
            mode, mul, add = native.OUT_SIGN, self.emit_mul, self.emit_add
        else:
            mode = native.OUT_FLOAT
        if self.takes_bits:
            x_bits, padding = x, layer._explicit_padding() if isinstance(layer, PackedConv2d) else None
        else:  # float input: the layer packs it itself
            x_bits, padding = layer.native_input(x)
        output = {"mode": mode, "mul": mul, "add": add}
        if self.flattened_input:  # bits [N, H, W, words] of the map the linear reads flattened
            plan = cpu_native.conv_plan(x_bits.shape, self._conv_weights(x_bits.shape[1:3]), **output)
        elif isinstance(layer, PackedConv2d):
            s = layer.spec
            plan = cpu_native.conv_plan(x_bits.shape, weights, s.stride, padding, s.dilation, **output,
                                        with_residual=residual is not None, clamp=self.clamp)
        else:  # a linear: a 1x1 conv over the rows
            plan = cpu_native.conv_plan((1, 1, *x_bits.shape), weights, **output)
        pools = _pool_chain(self.pools, plan.final_shape)
        if self.flattened_input or not isinstance(layer, PackedConv2d):
            layout, rows = "rows", x_bits.shape[0]  # [N, features] / the linear's [M, features]
        else:
            layout, rows = ("bits" if self.emits else "nchw"), None
        return _Step(native_weights, self.clamp, None if self.takes_bits else layer.native_input, plan, pools,
                     layout, rows)

    def _conv_weights(self, size):
        size = tuple(int(s) for s in size)
        if size not in self._as_conv:
            spec = self.layer.spec
            channels = spec.in_features // (size[0] * size[1])
            codes = self.layer.codes().reshape(spec.out_features, channels, *size)  # NCHW flatten order
            self._as_conv[size] = cpu_native.prepack_conv([kernels.pack_conv_weight(codes)], size, channels)
        return self._as_conv[size]


@dataclass
class _Step:
    """One input shape of a :class:`FusedBinaryLayer`: the packing, the kernel's call plan, the bit
    pools and the output's layout, worked out once."""

    native_weights: tuple
    clamp: tuple | None
    pack: object  # the layer's native_input for float input; None when it takes bits
    plan: object  # cpu_native conv plan
    pools: cpu_native.PoolChain | None  # run by the plan's call (a sign output's bit pools)
    layout: str  # "bits": packed NHWC words; "nchw": a channels_last float view; "rows": [rows, features]
    rows: int | None

    def run(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        bits = x.contiguous() if self.pack is None else self.pack(x)[0]
        if bits.dim() == 2:  # a linear's rows
            bits = bits.view(1, 1, *bits.shape)
        y = self.plan.run(bits, None if residual is None else residual.permute(0, 2, 3, 1), self.pools)
        if self.layout == "nchw":
            return y.permute(0, 3, 1, 2)  # channels_last, the layout of the packed pipeline
        return y.reshape(self.rows, -1) if self.layout == "rows" else y


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualified_name):
        return isinstance(m, PackedLayer) or super().is_leaf_module(m, qualified_name)


def _binary(module) -> bool:
    """A binary-input packed layer whose inputs are plain signs (no K map, no RSign threshold)."""
    return (isinstance(module, PackedLayer) and module.spec.binary_input and not module.spec.activation_scale
            and not module.spec.input_threshold)


def _can_emit(module) -> bool:
    return _binary(module) and module.spec.groups == 1


def _can_take_bits(module) -> bool:
    if not _binary(module):
        return False
    spec = module.spec
    if isinstance(module, PackedConv2d):
        per_group = spec.in_features // spec.groups
        return (spec.groups == 1 or per_group % 64 == 0) and (spec.padding_mode == "zeros"
                                                              or max(module._explicit_padding()) == 0)
    return True


def _bn_affine(bn) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats and not bn.training):
        return None
    inv = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(inv)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(inv)
    scale = gamma * inv
    return scale, beta - bn.running_mean.double() * scale


def _is_flatten(node, modules) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if node.op == "call_function" and node.target is torch.flatten:
        return tuple(node.args[1:2]) == (1,) and len(node.args) <= 2 and not node.kwargs
    return node.op == "call_method" and node.target == "flatten" and tuple(node.args[1:]) == (1,)


# The modules a path between two binary layers may hold (each checked further by _emit_for).
PATH_MODULES = (nn.Identity, FoldedBatchNorm, nn.Dropout, nn.Hardtanh, nn.MaxPool2d, nn.modules.batchnorm._BatchNorm)


def _sign_path(node, modules):
    """(chain nodes, consumer node, flattened) when ``node``'s value reaches a binary layer that
    can take packed input through single-user ops of the module docstring's list; else None."""
    chain, flattened = [], False
    while len(node.users) == 1:
        nxt = next(iter(node.users))
        if nxt.op == "call_module" and isinstance(modules[nxt.target], PackedLayer):
            ok = _can_take_bits(modules[nxt.target]) and len(nxt.args) == 1 and nxt.args[0] is node
            return (chain, nxt, flattened) if ok else None
        if _is_flatten(nxt, modules):
            if flattened:
                return None
            flattened = True
        elif nxt.op != "call_module" or flattened or not isinstance(modules[nxt.target], PATH_MODULES):
            return None
        chain.append(nxt)
        node = nxt
    return None


def _emit_for(chain, modules, mul: torch.Tensor, add: torch.Tensor) -> Emit | None:
    """Compose ``z = y * mul + add`` with the chain's affine maps and turn its max-pools into bit
    pools (AND or OR per channel); None when an op of the chain does not keep the sign."""
    pools, directions, affine_allowed = [], [], True
    for node in chain:
        if _is_flatten(node, modules):
            continue
        m = modules[node.target]
        affine = _bn_affine(m)
        if isinstance(m, (nn.Identity, FoldedBatchNorm, nn.Dropout)):
            continue
        if affine is not None and affine_allowed:
            scale, shift = affine
            mul, add = mul * scale, add * scale + shift
            directions = [d * torch.sign(scale) for d in directions]
        elif isinstance(m, nn.Hardtanh) and m.min_val < 0 <= m.max_val:
            affine_allowed = False
        elif isinstance(m, nn.MaxPool2d) and not m.ceil_mode and not m.return_indices:
            pools.append(m)
            directions.append(torch.ones(mul.shape[0], dtype=torch.float64))
        else:
            return None
    # AND where the map after the pool is non-decreasing (bit 1 in the mask), else OR
    bit_pools = [PackedMaxPool2d(pool, kernels.pack_bits(torch.where(d < 0, 1.0, -1.0).unsqueeze(0))[0])
                 for pool, d in zip(pools, directions, strict=True)]
    return Emit(mul, add, bit_pools)


def _follow(producer, modules):
    """(chain nodes, consumer node, Emit, flattened) for a fusable path from a binary layer, or None."""
    layer = modules[producer.target]
    path = _sign_path(producer, modules)
    if path is None:
        return None
    chain, consumer_node, flattened = path
    consumer = modules[consumer_node.target]
    conv_to_conv = isinstance(layer, PackedConv2d) and isinstance(consumer, PackedConv2d) and not flattened
    to_linear = isinstance(consumer, PackedLinear) and (flattened == isinstance(layer, PackedConv2d))
    if not (conv_to_conv or to_linear):
        return None
    _, mul, add = layer.native_weights()
    emit = _emit_for(chain, modules, mul.double().clone(), add.double().clone())
    return None if emit is None else (chain, consumer_node, emit, flattened)


class SignPacker(nn.Module):
    """Packs the signs of a float layer's output for a binary layer, in place of the BatchNorms,
    sign-keeping activations and max-pools between them: ``bits = sign(y * mul + add)`` per
    channel (float64, two roundings, as a binary layer's ``OUT_SIGN``), then the bit pools, in one
    native pass over ``y`` plus one per pool."""

    def __init__(self, emit: Emit, conv: nn.Conv2d | None = None):
        super().__init__()
        self.register_buffer("mul", emit.mul.double().contiguous())
        self.register_buffer("add", emit.add.double().contiguous())
        self.pools = nn.ModuleList(emit.pools)
        self.conv = conv  # taken in: its output is read only through the sign
        self._conv_sign = None
        self._pool_chains = cpu_native.PlanCache()  # the conv's input shape -> its pools' PoolChain

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            bits = cpu_native.affine_sign_pack(y, self.mul, self.add)
            for pool in self.pools:
                bits = pool(bits)
            return bits
        # y is the conv's input: the conv, its signs and the pools in one call
        if self._conv_sign is None:
            c = self.conv
            self._conv_sign = cpu_native.FloatConvSign(c.weight, c.bias, c.stride, c.padding, c.dilation,
                                                       self.mul, self.add)
        key = (y.shape, y.stride())
        if key not in self._pool_chains:
            self._pool_chains[key] = _pool_chain(self.pools, self._conv_sign.plan(y)[1])
        return self._conv_sign.run(y, self._pool_chains[key])

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._conv_sign, self._pool_chains = None, cpu_native.PlanCache()


def _pool_chain(pools, shape) -> cpu_native.PoolChain | None:
    """The :class:`PackedMaxPool2d` modules ``pools`` as one chain for a first input of ``shape``."""
    plans = []
    for pool in pools:
        plans.append(pool.plan(shape))
        shape = plans[-1].out_shape
    return cpu_native.PoolChain(plans) if plans else None


# A float conv folds into the sign packer that follows it when its taps are this few (C x kh x kw):
# there the separate conv, BatchNorm and packing passes cost more than the arithmetic.
SMALL_CONV_TAPS = 32


def _small_float_conv(node, modules) -> nn.Conv2d | None:
    """The float ``nn.Conv2d`` computing ``node`` when the sign packer can compute it itself: a
    small ``nn.Conv2d``, or a small packed conv with float input (binary or ternary weights on
    float pixels, as the first layer of Larq's BNN) as the ``nn.Conv2d`` of what its forward
    convolves with, ``scale * code`` (:func:`_float_conv_of`)."""
    module = modules.get(node.target) if node.op == "call_module" else None
    if not (len(node.users) == 1 and len(node.args) == 1 and not node.kwargs):
        return None
    if isinstance(module, PackedConv2d) and module.spec.input_bits == 32 and module.spec.padding_mode == "zeros" \
            and _taps(module.spec.in_features, module.spec.kernel_size) <= SMALL_CONV_TAPS:
        module = _float_conv_of(module)
    if type(module) is not nn.Conv2d:
        return None
    small = _taps(module.in_channels, module.kernel_size) <= SMALL_CONV_TAPS
    plain = module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return module if small and plain and module.weight.dtype == torch.float32 else None


def _taps(channels: int, kernel_size) -> int:
    return channels * kernel_size[0] * kernel_size[1]


@torch.no_grad()
def _float_conv_of(layer: PackedConv2d) -> nn.Conv2d:
    """An ``nn.Conv2d`` with a float-input packed conv's weights ``scale * code`` and bias: the
    convolution its forward runs (``float_op``), for a sign packer to compute."""
    s = layer.spec
    conv = nn.Conv2d(s.in_features, s.out_features, s.kernel_size, s.stride, layer._explicit_padding(), s.dilation,
                     s.groups, bias=layer.bias is not None)
    conv.weight.copy_(layer.float_weight(torch.float32))
    if layer.bias is not None:
        conv.bias.copy_(layer.bias.float())
    return conv.eval()


def _float_feeds(graph_module, modules, fused_consumers):
    """(start node, chain, consumer node, Emit) for each binary conv fed by a float value through a
    chain that holds a BatchNorm or a max-pool (work a sign packer saves)."""
    found = []
    for node in graph_module.graph.nodes:
        if not (node.op == "call_module" and node.target not in fused_consumers
                and isinstance(modules[node.target], PackedConv2d) and _can_take_bits(modules[node.target])):
            continue
        chain, start = [], node.args[0] if len(node.args) == 1 else None
        while isinstance(start, torch.fx.Node) and start.op == "call_module" and len(start.users) == 1 \
                and isinstance(modules[start.target], PATH_MODULES) and len(start.args) == 1:
            chain.insert(0, start)
            start = start.args[0]
        useful = any(isinstance(modules[n.target], (nn.MaxPool2d, nn.modules.batchnorm._BatchNorm)) for n in chain)
        if (not (chain and useful and isinstance(start, torch.fx.Node))
                or _sign_path(start, modules) != (chain, node, False)):
            continue
        channels = modules[node.target].spec.in_features
        emit = _emit_for(chain, modules, torch.ones(channels, dtype=torch.float64),
                         torch.zeros(channels, dtype=torch.float64))
        if emit is not None:
            found.append((start, chain, node, emit))
    return found


def _residual_tails(graph_module, modules):
    """(layer node, chain, add node, other operand, Hardtanh node or None) where a fused conv's float
    output goes, through sign-neutral modules, only into ``+ other`` (then maybe a Hardtanh): the
    residual add and the clamp then happen as the conv writes its output, in the same float32 order."""
    order = {node: i for i, node in enumerate(graph_module.graph.nodes)}
    found = []
    for node in graph_module.graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not (isinstance(layer, FusedBinaryLayer) and not layer.emits and isinstance(layer.layer, PackedConv2d)):
            continue
        chain, value = [], node
        while len(value.users) == 1:
            nxt = next(iter(value.users))
            if nxt.op == "call_module" and isinstance(modules[nxt.target], (nn.Identity, FoldedBatchNorm, nn.Dropout)):
                chain.append(nxt)
                value = nxt
                continue
            if nxt.op == "call_function" and nxt.target in (operator.add, torch.add) and len(nxt.args) == 2 \
                    and not nxt.kwargs and value in nxt.args and nxt.args[0] is not nxt.args[1]:
                other = nxt.args[1] if nxt.args[0] is value else nxt.args[0]
                if isinstance(other, torch.fx.Node) and order[other] < order[node]:
                    user = next(iter(nxt.users)) if len(nxt.users) == 1 else None
                    clamp = user if (user is not None and user.op == "call_module"
                                     and isinstance(modules[user.target], nn.Hardtanh)) else None
                    found.append((node, chain, nxt, other, clamp))
            break
    return found


def fuse_binary_chains(packed: nn.Module, inplace: bool = False) -> nn.Module:
    """A packed model (``pack_model``'s result, eval mode) in which binary layers pass packed bits to
    each other (see the module docstring).  Works on a copy unless ``inplace`` (then the returned
    model shares ``packed``'s layers, and ``packed`` should no longer be used).  Needs the native
    engine; returns the model unfused where it is unavailable or cannot be traced."""
    model = (packed if inplace else copy.deepcopy(packed)).eval()
    if not native.available():
        return model
    try:
        graph_module = torch.fx.GraphModule(model, _Tracer().trace(model))
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: nothing to fuse
        return model
    modules = dict(graph_module.named_modules())
    edges = []
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and _can_emit(modules.get(node.target)):
            found = _follow(node, modules)
            if found:
                edges.append((node, *found))
    feeds = _float_feeds(graph_module, modules, {consumer.target for _, _, consumer, _, _ in edges})
    if not edges and not feeds:
        return model
    emits = {producer.target: emit for producer, _, _, emit, _ in edges}
    takes = {consumer.target: flattened for _, _, consumer, _, flattened in edges}
    takes.update({consumer.target: False for _, _, consumer, _ in feeds})
    for index, name in enumerate(sorted(set(emits) | set(takes))):
        fused = FusedBinaryLayer(modules[name], name in takes, emits.get(name), takes.get(name, False))
        graph_module.add_submodule(f"fused_{index}", fused)
        for node in graph_module.graph.nodes:
            if node.op == "call_module" and node.target == name:
                node.target = f"fused_{index}"
    for producer, chain, consumer, _, _ in edges:
        consumer.args = (producer,)
        for node in reversed(chain):
            graph_module.graph.erase_node(node)
    for index, (start, chain, consumer, emit) in enumerate(feeds):
        conv = _small_float_conv(start, modules)
        graph_module.add_submodule(f"sign_packer_{index}", SignPacker(emit, conv))
        with graph_module.graph.inserting_after(start):
            packer = graph_module.graph.call_module(f"sign_packer_{index}", start.args if conv else (start,))
        consumer.args = (packer,)
        for node in reversed(chain):
            graph_module.graph.erase_node(node)
        if conv is not None:
            graph_module.graph.erase_node(start)
    modules = dict(graph_module.named_modules())
    for node, chain, add_node, other, clamp_node in _residual_tails(graph_module, modules):
        last = clamp_node or add_node
        if clamp_node is not None:
            hardtanh = modules[clamp_node.target]
            modules[node.target].clamp = (float(hardtanh.min_val), float(hardtanh.max_val))
        node.args = (node.args[0], other)
        last.replace_all_uses_with(node)
        for dead in ([clamp_node] if clamp_node is not None else []) + [add_node, *reversed(chain)]:
            graph_module.graph.erase_node(dead)
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module
