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
  bitnet_two_stage: with H = round(stage_split * T) (stage 2 starts at step H),
                    s < H:  f(s) = 1 + (stage1_final - 1) * (s - W) / (H - W)      (stage 1: linear from the peak)
                    s >= H: f(s) = stage2 + (final - stage2) * (s - H) / (T - H)   (stage 2: the sudden drop,
                                                                                    then linear to `final`)
`final` is `sched.final_lr_fraction` (0 = anneal to zero, as in IR-Net / BiBench).

Weight-decay schedule (`bitnet_two_stage` only): every group's weight decay is its configured value
(optim.weight_decay; 0 stays 0, so the latent-weight policy of `qat.latent.param_groups` holds) times

    g(s) = (1 + cos(pi * s / H)) / 2   for s < H,        g(s) = 0   for s >= H,

set before step s. BitNet b1.58's recipe ("The Era of 1-bit LLMs: Training Tips, Code and FAQ",
Ma et al. 2024, section 2): a two-stage learning rate, high at first and decayed sharply half-way
(its Table 2: 1.5e-3 then 1e-3 for 700M parameters, i.e. stage2 = 2/3), and weight decay on a
cosine schedule with peak 0.1 in the first stage, disabled in the second. The FAQ does not give
the shape of each stage's lr decay or the cosine's phase; here each stage decays linearly, stage 1
from the peak to `stage1_final_fraction` (default 1: it keeps the peak), and the weight decay starts
at its peak and follows a half cosine to 0 at the stage boundary.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

import qat.latent
from qat.train import bop

OPTIMIZERS = ("adam", "adamw", "sgd")  # over parameter groups (build_optimizer)
ROUTED_OPTIMIZERS = ("bop",)           # over a model's weights, routed by kind (optimizer_for)
SCHEDULES = ("cosine", "step", "constant", "bitnet_two_stage")
#: schedules that also set each group's weight decay (`weight_decay_multiplier`)
WEIGHT_DECAY_SCHEDULES = ("bitnet_two_stage",)


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
    boundary = stage_boundary(cfg, total_steps)
    stage1_final = float(cfg.get("stage1_final_fraction", 1.0))
    stage2 = float(cfg.get("stage2_fraction", 2 / 3))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if name == "cosine":
            span = max(1, total_steps - warmup)
            progress = min(1.0, (step - warmup) / span)
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
        if name == "step":
            return gamma ** sum(step >= m for m in milestones)
        if name == "bitnet_two_stage":
            if step < boundary:
                return 1.0 + (stage1_final - 1.0) * (step - warmup) / max(1, boundary - warmup)
            return stage2 + (final - stage2) * min(1.0, (step - boundary) / max(1, total_steps - boundary))
        return 1.0

    return multiplier


def stage_boundary(cfg: Any, total_steps: int) -> int:
    """The first step of BitNet's second stage: round(sched.stage_split * total_steps)."""
    split = cfg.get("stage_split", 0.5)
    if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 < split <= 1:
        raise ValueError(f"sched.stage_split must be a fraction in (0, 1], got {split!r}")
    return int(round(split * total_steps))


def weight_decay_multiplier(cfg: Any, steps_per_epoch: int, total_steps: int) -> Callable[[int], float] | None:
    """g(step) of the weight-decay schedule (module docstring), or None for a schedule without one."""
    if cfg.name not in WEIGHT_DECAY_SCHEDULES:
        return None
    boundary = stage_boundary(cfg, total_steps)

    def multiplier(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * step / boundary)) if step < boundary else 0.0

    return multiplier


class LrWeightDecayScheduler(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR that also sets every group's weight_decay = initial_weight_decay * g(step) at each step
    (the group's configured decay is kept as `initial_weight_decay`, as LambdaLR keeps `initial_lr`).
    Its state is LambdaLR's: g is a function of the step it counts."""

    def __init__(self, optimizer, lr_lambda: Callable[[int], float], wd_lambda: Callable[[int], float]):
        for group in optimizer.param_groups:
            group.setdefault("initial_weight_decay", group["weight_decay"])
        self.wd_lambda = wd_lambda
        super().__init__(optimizer, lr_lambda)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("wd_lambda", None)  # a function of the config, rebuilt with the scheduler
        return state

    def step(self, epoch=None):
        super().step() if epoch is None else super().step(epoch)
        factor = self.wd_lambda(self.last_epoch)
        for group in self.optimizer.param_groups:
            group["weight_decay"] = group["initial_weight_decay"] * factor


def build_scheduler(cfg: Any, optimizer, steps_per_epoch: int, total_steps: int):
    """A LambdaLR stepped once per optimizer step (for a schedule with a weight-decay part, an
    `LrWeightDecayScheduler`); its state_dict holds only numbers."""
    lr_lambda = lr_multiplier(cfg, steps_per_epoch, total_steps)
    wd_lambda = weight_decay_multiplier(cfg, steps_per_epoch, total_steps)
    if wd_lambda is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    return LrWeightDecayScheduler(optimizer, lr_lambda, wd_lambda)
