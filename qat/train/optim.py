"""Optimizers (adam, adamw, sgd; bop routed with adam) and per-step learning-rate schedules
(cosine, step, constant, warm-up).

`optimizer_for(cfg, model)` is a run's optimizer: adam / adamw / sgd over `qat.latent.param_groups`
(binary latent weights without weight decay), or for `bop` a `CaseOptimizer` of Adam (lr, betas,
eps, weight_decay of the config) over everything but the binary weights and Bop (`qat.train.bop`,
optim.gamma and optim.threshold) over those. A schedule scales every group's `lr`: Adam's learning
rate and Bop's gamma.

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

import qat.latent
from qat.train import bop

OPTIMIZERS = ("adam", "adamw", "sgd")  # over parameter groups (build_optimizer)
ROUTED_OPTIMIZERS = ("bop",)           # over a model's weights, routed by kind (optimizer_for)
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


def optimizer_for(cfg: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.name` over `model`'s parameters (module docstring)."""
    name = cfg.name
    weight_decay = float(cfg.get("weight_decay", 0.0))
    if name in OPTIMIZERS:
        return build_optimizer(cfg, qat.latent.param_groups(model, weight_decay))
    if name != "bop":
        raise ValueError(f"unknown optim.name {name!r}; valid: {', '.join(OPTIMIZERS + ROUTED_OPTIMIZERS)}")
    binary = bop.prepare_binary_weights(model)
    members: list[torch.optim.Optimizer] = []
    rest = qat.latent.param_groups(model, weight_decay, exclude=binary)
    if rest:
        members.append(torch.optim.Adam(rest, lr=cfg.lr, betas=tuple(cfg.get("betas", (0.9, 0.999))),
                                        eps=cfg.get("eps", 1e-8)))
    members.append(bop.Bop(binary, **bop.bop_config(cfg)))
    return CaseOptimizer(*members)


class CaseOptimizer(torch.optim.Optimizer):
    """Optimizers over disjoint parameter sets stepped as one (Larq's CaseOptimizer).

    `param_groups` is the members' groups in order (so one LR scheduler scales them all), `step`,
    `zero_grad`, `state_dict` and `load_state_dict` go to each member in order; the state_dict is
    {"members": [member state_dict, ...]}. `Optimizer.__init__` is not called: the members own the
    parameters and their state."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        seen: set[int] = set()
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError(f"a parameter of shape {tuple(p.shape)} is claimed by two optimizers")
                    seen.add(id(p))
        self.optimizers = list(optimizers)
        self.defaults: dict[str, Any] = {}

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for optimizer in self.optimizers for p, s in optimizer.state.items()}

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"members": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        members = state_dict.get("members") if isinstance(state_dict, dict) else None
        if not isinstance(members, list) or len(members) != len(self.optimizers):
            raise ValueError(f"optimizer state holds {len(members) if isinstance(members, list) else 'no'} member "
                             f"optimizer(s), this run has {len(self.optimizers)} "
                             f"({', '.join(type(o).__name__ for o in self.optimizers)})")
        for optimizer, member in zip(self.optimizers, members, strict=True):
            optimizer.load_state_dict(member)

    def step_metrics(self) -> dict[str, float]:
        return {k: v for optimizer in self.optimizers for k, v in step_metrics(optimizer).items()}


def step_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Per-step figures an optimizer reports (Bop: its flip ratio), for the step log; {} for most."""
    report = getattr(optimizer, "step_metrics", None)
    return report() if callable(report) else {}


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
