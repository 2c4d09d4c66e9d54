"""``to_plain``: an OmegaConf node as plain Python containers, so the library takes configs and
plain dicts alike. omegaconf is imported only when present: the library runs without it (the GPU
check imports ``qat`` on a machine that may lack Hydra and OmegaConf)."""
from __future__ import annotations

from typing import Any


def to_plain(cfg: Any) -> Any:
    """A resolved plain dict/list copy of an OmegaConf node (plain values pass through)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # no omegaconf: no OmegaConf nodes either
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
