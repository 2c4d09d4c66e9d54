"""``replace_submodule``: put a module in place of another, named by its dotted path."""
from __future__ import annotations

from torch import nn


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Set the submodule called ``name`` ("layer1.0.conv1") of ``model`` to ``new`` and return the
    model; the empty name is the model itself, so ``new`` is returned in its place."""
    if name == "":
        return new
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return model
