"""``to_plain``: an OmegaConf node as plain Python containers, so the library takes configs and
plain dicts alike (omegaconf is a dependency, but nothing here needs Hydra)."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def to_plain(cfg: Any) -> Any:
    """A resolved plain dict/list copy of an OmegaConf node (plain values pass through)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_list(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
