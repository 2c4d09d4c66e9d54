"""Float model definitions and their registry.

The models know nothing of quantization: `qat.quantize_model` swaps their `nn.Conv2d` /
`nn.Linear` modules afterwards. Every builder takes `num_classes` and `in_channels` plus its own
keyword options, and `build(name, ...)` is the only way configs reach them (no Hydra `_target_`).
`build` records what it built on the model (`architecture_of(model)`), so a packed export of it
can be rebuilt later without being told the architecture.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

from qat.models.gpt import gpt
from qat.models.mnist_cnn import mnist_cnn
from qat.models.resnet_cifar import resnet18_cifar, resnet20
from qat.models.resnet_imagenet import resnet18_imagenet
from qat.models.vgg_small import vgg_small
from qat.models.vit import vit

ModelBuilder = Callable[..., nn.Module]

MODELS: dict[str, ModelBuilder] = {
    "resnet18": resnet18_cifar,
    "resnet18_imagenet": resnet18_imagenet,
    "resnet20": resnet20,
    "vgg_small": vgg_small,
    "mnist_cnn": mnist_cnn,
    "vit": vit,
    "gpt": gpt,
}


def names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def build(name: str, num_classes: int, in_channels: int = 3, **options) -> nn.Module:
    """Build the float model registered as `name`.

    Raises ValueError naming the bad name and the valid ones, or the bad option.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(names())}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    try:
        model = MODELS[name](num_classes=num_classes, in_channels=in_channels, **options)
    except TypeError as error:
        raise ValueError(f"bad options for model {name!r}: {error}") from error
    setattr(model, ARCHITECTURE_ATTRIBUTE, {"name": name, "num_classes": num_classes, "in_channels": in_channels,
                                            **options})
    return model


ARCHITECTURE_ATTRIBUTE = "qat_architecture"


def architecture_of(model: nn.Module) -> dict | None:
    """The architecture dict ``build`` recorded on ``model`` (a copy), or None for a model it did
    not build. A plain attribute: it survives ``quantize_model`` (in place), ``copy.deepcopy`` and
    ``qat.export.pack_model``, and is not part of the state dict."""
    recorded = getattr(model, ARCHITECTURE_ATTRIBUTE, None)
    return dict(recorded) if isinstance(recorded, dict) else None


def architecture(model_cfg, num_classes: int, in_channels: int) -> dict:
    """The plain ``{"name": ..., "num_classes": ..., "in_channels": ..., **options}`` a model config
    describes: what ``build_architecture`` takes and what packed model files record."""
    from qat.plain import to_plain

    options = dict(to_plain(model_cfg))
    return {"name": options.pop("name"), "num_classes": int(num_classes), "in_channels": int(in_channels), **options}


def complete_architecture(arch: dict) -> dict:
    """``arch`` with every option its builder has but ``arch`` leaves out set to the builder's default:
    two architectures build the same model iff their completions are equal (an option added to a
    builder later, with a default that keeps the old model, leaves older records equal to new ones)."""
    builder = MODELS.get(arch.get("name"))
    if builder is None:
        return dict(arch)
    defaults = {name: p.default for name, p in inspect.signature(builder).parameters.items()
                if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD}
    return {**defaults, **arch}


def build_architecture(arch: dict) -> nn.Module:
    """``build`` from an ``architecture`` dict (the dict is not modified)."""
    options = dict(arch)
    return build(options.pop("name"), **options)


__all__ = ["MODELS", "architecture", "architecture_of", "build", "build_architecture", "complete_architecture",
           "names"]
