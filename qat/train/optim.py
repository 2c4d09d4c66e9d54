"""Optimizers (adam, adamw, sgd) and per-step learning-rate schedules (cosine, step, constant, warm-up).

Schedules are LambdaLR multipliers of the base lr evaluated at the optimizer step s (0-based),
with W = warmup_epochs * steps_per_epoch warm-up steps and T total steps:
  warm-up (s < W):  f(s) = (s + 1) / W                       (linear ramp up to the base lr)
  cosine:           f(s) = final + (1 - final) * (1 + cos(pi * (s - W) / (T - W))) / 2
  step:             f(s) = gamma ** (number of milestones m with s >= m * steps_per_epoch)
  constant:         f(s) = 1
`final` is `sched.final_lr_fraction` (0 = anneal to zero, as in IR-Net / BiBench).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")


def build_optimizer(cfg: Any, param_groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.name` over `param_groups` (which carry their own weight decay)."""
    name = cfg.name
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.get("momentum", 0.9),
                               nesterov=cfg.get("nesterov", False))
    if name in ("adam", "adamw"):
        optimizer_class = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return optimizer_class(param_groups, lr=cfg.lr, betas=tuple(cfg.get("betas", (0.9, 0.999))),
                               eps=cfg.get("eps", 1e-8))
    raise ValueError(f"unknown optim.name {name!r}; valid: {', '.join(OPTIMIZERS)}")


def lr_multiplier(cfg: Any, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """f(step) as in the module docstring."""
    name = cfg.name
    if name not in SCHEDULES:
        raise ValueError(f"unknown sched.name {name!r}; valid: {', '.join(SCHEDULES)}")
    warmup = int(round(cfg.get("warmup_epochs", 0) * steps_per_epoch))
    final = float(cfg.get("final_lr_fraction", 0.0))
    milestones = [int(m * steps_per_epoch) for m in cfg.get("milestones", [])]
    gamma = float(cfg.get("gamma", 0.1))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if name == "cosine":
            span = max(1, total_steps - warmup)
            progress = min(1.0, (step - warmup) / span)
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
        if name == "step":
            return gamma ** sum(step >= m for m in milestones)
        return 1.0

    return multiplier


def build_scheduler(cfg: Any, optimizer, steps_per_epoch: int, total_steps: int):
    """A LambdaLR stepped once per optimizer step; its state_dict holds only numbers."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, steps_per_epoch, total_steps))
