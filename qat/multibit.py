"""Selecting the width of a model's vertical-layered multi-bit layers (``layers.multibit``).

    >>> qat.multibit.set_bits(model, 4)          # every multi-bit layer now computes 4-bit weights
    >>> with qat.multibit.bits(model, "ternary"):
    ...     logits = model(x)                    # ternary inside, the previous width after

The width lives on each layer's quantizer (``MultiBitWeight.width``) and nowhere else: these
functions only walk the model, so two models never share a width.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from layers.multibit import WIDTHS, MultiBitWeight, parse_width, width_label

__all__ = ["WIDTHS", "bits", "set_bits", "multibit_quantizers", "active_width", "parse_width", "width_label"]


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


def active_width(model: nn.Module):
    """The width every multi-bit layer of ``model`` computes at (ValueError if they differ or there are none)."""
    widths = {q.width for q in multibit_quantizers(model)}
    if len(widths) != 1:
        raise ValueError(f"expected one active multi-bit width, found {sorted(map(str, widths)) or 'none'}")
    return widths.pop()


@contextmanager
def bits(model: nn.Module, width):
    """``set_bits(model, width)`` inside the block; each layer's previous width is restored after it."""
    quantizers = multibit_quantizers(model)
    previous = [q.width for q in quantizers]
    set_bits(model, width)
    try:
        yield
    finally:
        for quantizer, old in zip(quantizers, previous, strict=True):
            quantizer.set_width(old)
