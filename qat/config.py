"""Config helpers: OmegaConf resolvers, start-of-run validation, plain-dict conversion.

Resolvers (registered on import, used by `configs/`):
  ${weights_only_method:<method>}  the method whose weights match <method> but whose inputs stay
      float: xnor -> bwn, fda -> bwn, any other method -> itself. `mnist_bnn` uses it for the first
      layer, so `quant=<m>` swaps keep "binary weights everywhere, float input to the first layer".
  ${activation_for:<method>}  hardtanh for methods with binary inputs (xnor, fda), relu otherwise.
      After a ReLU every input of a binary conv is >= 0 and sign() would be +1 everywhere; hardtanh
      keeps the sign (IR-Net's choice). The CIFAR model configs use it so quant= swaps stay sound.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

WEIGHTS_ONLY_METHOD = {"xnor": "bwn", "fda": "bwn"}


def weights_only_method(method: str) -> str:
    return WEIGHTS_ONLY_METHOD.get(method, method)


BINARY_INPUT_METHODS = ("xnor", "fda")


def activation_for(method: str) -> str:
    return "hardtanh" if method in BINARY_INPUT_METHODS else "relu"


def register_resolvers() -> None:
    for name, function in (("weights_only_method", weights_only_method),
                           ("activation_for", activation_for)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


register_resolvers()


class ConfigError(ValueError):
    """A config value that cannot work, caught before training starts."""


def as_path(value: str | os.PathLike) -> Path:
    """An absolute path; relative paths are taken from the directory the command was launched in."""
    path = Path(os.path.expanduser(str(value)))
    if path.is_absolute():
        return path
    try:
        from hydra.utils import get_original_cwd

        return Path(get_original_cwd()) / path
    except (ValueError, ImportError):  # Hydra not initialised (tests, library use)
        return Path.cwd() / path


def to_plain(cfg: Any) -> Any:
    """A resolved plain dict/list copy of an OmegaConf node (plain values pass through)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_list(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Fail at start, naming the bad value, for settings that would only fail (or mislead) later."""
    problems = []
    if not cfg.optim.lr > 0:
        problems.append(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if cfg.optim.get("weight_decay", 0) < 0:
        problems.append(f"optim.weight_decay must be >= 0, got {cfg.optim.weight_decay}")
    if not (isinstance(cfg.trainer.epochs, int) and cfg.trainer.epochs >= 1):
        problems.append(f"trainer.epochs must be an int >= 1, got {cfg.trainer.epochs}")
    max_steps = cfg.trainer.get("max_steps")
    if max_steps is not None and not (isinstance(max_steps, int) and max_steps >= 1):
        problems.append(f"trainer.max_steps must be null or an int >= 1, got {max_steps}")
    for key in ("batch_size", "eval_batch_size"):
        if not cfg.data[key] >= 1:
            problems.append(f"data.{key} must be >= 1, got {cfg.data[key]}")
    if cfg.data.get("num_workers", 0) < 0:
        problems.append(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    warmup = cfg.sched.get("warmup_epochs", 0)
    if warmup < 0:
        problems.append(f"sched.warmup_epochs must be >= 0, got {warmup}")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
