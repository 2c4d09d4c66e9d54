"""Selecting the width of a model's vertical-layered multi-bit layers (``layers.multibit``).

    >>> qat.multibit.set_bits(model, 4)          # every multi-bit layer now computes 4-bit weights
    >>> with qat.multibit.bits(model, "ternary"):
    ...     logits = model(x)                    # ternary inside, the previous width after

The width lives on each layer's quantizer (``MultiBitWeight.width``) and nowhere else: these
functions only walk the model, so two models never share a width.

Per-width BatchNorm statistics ("switchable BN": slimmable networks, Yu et al. ICLR 2019; Any-Precision
DNNs, Yu et al. AAAI 2021). ``per_width_batchnorm(model)`` gives every BatchNorm of a multi-bit model
its own running statistics per width: buffers ``running_mean_<w>``, ``running_var_<w>``,
``num_batches_tracked_<w>`` (w = 8b, 4b, 2b, ternary, 1b; these are the state-dict keys), of which
the active width's stand as the module's ``running_mean`` / ``running_var`` / ``num_batches_tracked``
(the same tensors, so BatchNorm's in-place updates in training reach that width's buffers). The
BatchNorm follows ``set_bits`` (which sets it with the quantizers) and, before every forward, re-selects
its width's buffers (a pre-hook: safe after ``.to(device)``, which copies aliases apart). The affine
gamma and beta stay shared by all widths (docs/multibit_notes.md: why), unless
``per_width_batchnorm(model, affine=True)`` (``multibit.bn: per_width_affine``) makes them private
too: parameters ``weight_<w>``, ``bias_<w>``, the active width's standing as ``weight`` / ``bias``
and saved once, under the width's name, as the statistics are. Without ``per_width_batchnorm``
(``multibit.bn: shared``) a model is exactly as before: one set of statistics updated by every width.
``keep_active_width(model)`` turns the BatchNorms back into plain ones holding the active width's
statistics (what a packed export of one width stores).

BatchNorm calibration ("BN calibration" of universally slimmable networks, Yu & Huang ICCV 2019):
``calibrate_batchnorm(model, inputs, widths)`` re-estimates the running statistics at the model's
current weights, which a training run's momentum averages lag behind (docs/multibit_notes.md).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from layers.multibit import WIDTHS, MultiBitWeight, parse_width, width_label

__all__ = ["WIDTHS", "BN_MODES", "bits", "set_bits", "multibit_quantizers", "active_width", "parse_width",
           "width_label", "per_width_batchnorm", "per_width_batchnorms", "keep_active_width", "stored_batchnorm_mode",
           "calibrate_batchnorm"]

#: multibit.bn: private running statistics per width (default), statistics and gamma / beta per width, or one
#: set shared by all widths
BN_MODES = ("per_width", "per_width_affine", "shared")
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
#: a BatchNorm's affine parameters, private per width with ``per_width_batchnorm(model, affine=True)``
AFFINE = ("weight", "bias")
#: the attribute holding a per-width BatchNorm's active width (set only by set_bits / the pre-hook's owner)
WIDTH_ATTRIBUTE = "multibit_width"


def multibit_quantizers(model: nn.Module) -> list[MultiBitWeight]:
    return [m for m in model.modules() if isinstance(m, MultiBitWeight)]


def set_bits(model: nn.Module, width) -> None:
    """Make every multi-bit layer of ``model`` compute its weights at ``width`` (8, 4, 2, "ternary", 1).
    ValueError when the width is unknown or the model has no multi-bit layer."""
    width = parse_width(width)
    quantizers = multibit_quantizers(model)
    if not quantizers:
        raise ValueError("the model has no multi-bit layers (quant.method=multibit); a width cannot be chosen")
    for quantizer in quantizers:
        quantizer.set_width(width)
    for bn in per_width_batchnorms(model):
        _select(bn, width)


def active_width(model: nn.Module):
    """The width every multi-bit layer (and per-width BatchNorm) of ``model`` computes at (ValueError
    if they differ or there are none)."""
    widths = {q.width for q in multibit_quantizers(model)}
    if widths:
        widths |= {getattr(bn, WIDTH_ATTRIBUTE) for bn in per_width_batchnorms(model)}
    if len(widths) != 1:
        raise ValueError(f"expected one active multi-bit width, found {sorted(map(str, widths)) or 'none'}")
    return widths.pop()


@contextmanager
def bits(model: nn.Module, width):
    """``set_bits(model, width)`` inside the block; each layer's previous width is restored after it."""
    quantizers, norms = multibit_quantizers(model), per_width_batchnorms(model)
    previous = [q.width for q in quantizers]
    previous_norms = [getattr(bn, WIDTH_ATTRIBUTE) for bn in norms]
    set_bits(model, width)
    try:
        yield
    finally:
        for quantizer, old in zip(quantizers, previous, strict=True):
            quantizer.set_width(old)
        for bn, old in zip(norms, previous_norms, strict=True):
            _select(bn, old)


# ------------------------------------------------------------------ per-width BatchNorm statistics

def _width_name(name: str, width) -> str:
    """A per-width copy's name: ``running_mean_4b``, ``bias_ternary``."""
    return f"{name}_{width_label(width)}"


def _select(bn: nn.Module, width) -> None:
    """Stand ``width``'s statistics as ``bn``'s running_mean / running_var / num_batches_tracked (and,
    where they are private, its gamma and beta as ``bn.weight`` / ``bn.bias``)."""
    setattr(bn, WIDTH_ATTRIBUTE, width)
    for store, names in _per_width_entries(bn):
        for name in names:
            store[name] = store[_width_name(name, width)]


def _per_width_entries(bn: nn.Module) -> tuple:
    """((the module's dict, the names it keeps per width), ...): the statistics among the buffers, and
    gamma / beta among the parameters where they are private."""
    return (bn._buffers, STATISTICS), (bn._parameters, _private_affine(bn))


def _private_affine(bn: nn.Module) -> tuple[str, ...]:
    """The affine parameters ``bn`` keeps per width (none, or weight and bias)."""
    return AFFINE if _width_name(AFFINE[0], WIDTHS[0]) in bn._parameters else ()


def _save_affine_once(bn: nn.Module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: the active width's gamma / beta are saved under their width's name only."""
    for name in _private_affine(bn):
        state_dict.pop(prefix + name, None)


def _load_affine_alias(bn: nn.Module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: ``weight`` / ``bias`` (the active width's, not saved) read from that width's key."""
    for name in _private_affine(bn):
        key = prefix + _width_name(name, getattr(bn, WIDTH_ATTRIBUTE))
        if key in state_dict:
            state_dict.setdefault(prefix + name, state_dict[key])


def _select_before_forward(bn: nn.Module, args) -> None:
    _select(bn, getattr(bn, WIDTH_ATTRIBUTE))


def per_width_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorms of ``model`` that ``per_width_batchnorm`` gave per-width statistics."""
    return [m for m in model.modules() if hasattr(m, WIDTH_ATTRIBUTE)]


def per_width_batchnorm(model: nn.Module, affine: bool = False) -> int:
    """Give every BatchNorm (with running statistics) of multi-bit ``model`` private running statistics
    per width, each starting as a copy of the current ones, the active width selected; return how many
    BatchNorms. With ``affine`` (``multibit.bn: per_width_affine``), also a private gamma and beta per
    width (parameters ``weight_<w>``, ``bias_<w>``, copies of the current ones, trained only by their
    width's loss; Any-Precision DNNs' switchable BatchNorm). Idempotent. ValueError for a model
    without multi-bit layers."""
    width = active_width(model)  # raises for a model without multi-bit layers
    count = 0
    for bn in model.modules():
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
            continue
        count += 1
        if not hasattr(bn, WIDTH_ATTRIBUTE):
            for statistic in STATISTICS:
                current = getattr(bn, statistic)
                for w in WIDTHS:
                    bn.register_buffer(_width_name(statistic, w), current.detach().clone())
                bn._non_persistent_buffers_set.add(statistic)  # saved once, under the width's name
            bn.register_forward_pre_hook(_select_before_forward)
        if affine and bn.affine and not _private_affine(bn):
            for name in AFFINE:
                current = bn._parameters[name]
                for w in WIDTHS:
                    bn.register_parameter(_width_name(name, w), nn.Parameter(current.detach().clone(),
                                                                               requires_grad=current.requires_grad))
            bn.register_state_dict_post_hook(_save_affine_once)
            bn.register_load_state_dict_pre_hook(_load_affine_alias)
        _select(bn, getattr(bn, WIDTH_ATTRIBUTE, width))
    return count


def keep_active_width(model: nn.Module) -> nn.Module:
    """Make every per-width BatchNorm of ``model`` a plain one (in place) holding the active width's
    statistics, as persistent buffers; the other widths' are dropped. Returns ``model``."""
    for bn in per_width_batchnorms(model):
        _select(bn, getattr(bn, WIDTH_ATTRIBUTE))
        for store, names in _per_width_entries(bn):
            for name in names:
                kept = store[name]
                for w in WIDTHS:
                    del store[_width_name(name, w)]
                store[name] = kept
        bn._non_persistent_buffers_set.difference_update(STATISTICS)
        for hooks in (bn._forward_pre_hooks, bn._state_dict_hooks, bn._load_state_dict_pre_hooks):
            for key, hook in list(hooks.items()):
                if getattr(hook, "hook", hook) in (_select_before_forward, _save_affine_once, _load_affine_alias):
                    del hooks[key]
        delattr(bn, WIDTH_ATTRIBUTE)
    return model


def stored_batchnorm_mode(state_dict: dict) -> str:
    """"per_width_affine" when a state dict holds per-width BatchNorm gamma / beta (``weight_8b``),
    "per_width" when per-width statistics only (``running_mean_8b``), else "shared": what a
    checkpoint's model needs before it loads (``per_width_batchnorm(model, affine=...)``)."""
    def holds(name):
        marker = "." + _width_name(name, WIDTHS[0])
        return any(key.endswith(marker) or key == marker[1:] for key in state_dict)

    if holds(AFFINE[0]) or holds(AFFINE[1]):
        return "per_width_affine"
    return "per_width" if holds("running_mean") else "shared"


# ------------------------------------------------------------------ BatchNorm calibration

def calibrate_batchnorm(model: nn.Module, inputs: Iterable, widths) -> int:
    """Re-estimate the BatchNorm running statistics of multi-bit ``model`` at ``widths`` from the
    batches ``inputs`` (each one the model's input) at the current weights; return the number of batches.

    Every tracked BatchNorm's statistics are reset (mean 0, variance 1, count 0; with per-width
    BatchNorms, those of each width in ``widths``; others keep theirs) and then, for each batch x_k
    (k = 1..N) and each width b, the model runs x_k at b with BatchNorm in training mode and
    momentum None, which is PyTorch's cumulative moving average:

        mu_b    = (1/N) sum_k mean_k          (mean_k: the batch's per-channel mean at width b)
        sigma_b = (1/N) sum_k var_k           (var_k:  its per-channel unbiased variance)

    With statistics shared by all widths (no ``per_width_batchnorm``) the one set is the average over
    all N x |widths| forward passes. Nothing else changes: no gradient, no weight update, every other
    module in eval mode (dropout off), and afterwards every module's training flag, each BatchNorm's
    momentum and the active width are restored. ValueError for no batches, or a model without
    multi-bit layers or with an unknown width (``set_bits``)."""
    widths = [parse_width(w) for w in widths]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or not widths:
        return 0
    first = active_width(model)
    training = {module: module.training for module in model.modules()}
    momenta = [bn.momentum for bn in norms]
    count = 0
    try:
        model.eval()
        for bn in norms:
            bn.train()
            bn.momentum = None
        for width in widths if per_width_batchnorms(model) else widths[:1]:
            set_bits(model, width)
            for bn in norms:
                bn.reset_running_stats()  # in place: the active width's buffers
        with torch.no_grad():
            for x in inputs:
                for width in widths:
                    set_bits(model, width)
                    model(x)
                count += 1
    finally:
        for module, mode in training.items():
            module.training = mode
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        set_bits(model, first)
    if not count:
        raise ValueError("BatchNorm calibration got no batch: its statistics were reset and not re-estimated")
    return count
