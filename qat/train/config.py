"""Config helpers: OmegaConf resolvers, start-of-run validation, plain-dict conversion.

Resolvers (registered on import, used by `configs/`):
  ${weights_only_method:<method>}  the method whose weights match <method> but whose inputs stay
      float, from the method table (`layers.methods`): xnor -> bwn, irnet -> irnet_w, a method with
      float inputs -> itself. `mnist_bnn` uses it for the first layer, so `quant=<m>` swaps keep
      "binary weights everywhere, float input to the first layer".
  ${activation_for:<method>}  hardtanh for methods with binary inputs (the table's
      `binary_inputs`: xnor, fda, irnet, reactnet, ...), relu otherwise.
      After a ReLU every input of a binary conv is >= 0 and sign() would be +1 everywhere; hardtanh
      keeps the sign (IR-Net's choice). The CIFAR model configs use it so quant= swaps stay sound.
  ${runs_root:}  the output root of run directories: env QAT_RUNS, else `runs`.
  ${run_name:<experiment_name>}  the name itself, after `check_run_name`: the run directory
      `<QAT_RUNS>/<name>/...` may not escape the output root.
  ${resume_run_dir:<trainer.resume>,<new run dir>}  the directory of the run a resume continues
      (`resumed_run_dir`), else the new run directory: a resumed run writes into its own directory.
  ${hydra_output_subdir:<trainer.resume>,<time stamp>}  where Hydra saves the launch's config files:
      `.hydra`, or `.hydra/resume-<time>` when resuming into an existing run, so the resume does not
      overwrite the original launch's `.hydra/overrides.yaml`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from layers import binary_inputs, weights_only_method
from qat.plain import to_plain  # noqa: F401  (re-exported: the trainer's modules take it from here)
from qat.train.errors import ConfigError  # noqa: F401  (re-exported: the trainer's modules take it from here)


def activation_for(method: str) -> str:
    return "hardtanh" if binary_inputs(method) else "relu"


# The output_subdir of a launch that resumes into an existing run directory: `.hydra/resume-<time>`.
RESUME_SUBDIR_PREFIX = "resume-"
# One path component of a run name: starts with a letter, digit or '_' (so never '.' or '..').
RUN_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def runs_root() -> str:
    return os.environ.get("QAT_RUNS") or "runs"


def check_run_name(name: Any) -> str:
    """`name` if it is a safe experiment_name (run directories go to <QAT_RUNS>/<name>/...), else
    ConfigError: '/'-separated parts of letters, digits and `_ . + -`, none of them starting with '.',
    not absolute, so the run directory stays inside the output root."""
    text = str(name)
    parts = text.split("/")
    if name is None or not text or not all(RUN_NAME_PART.fullmatch(part) for part in parts):
        raise ConfigError(
            f"experiment_name={text!r} is not allowed: use letters, digits, '_', '-', '+' and '.' "
            f"(optionally sub/folders separated by '/'), no '..', no leading '/' or '.', so the run "
            f"stays under the output root (e.g. experiment_name=mnist_try2); to write elsewhere set "
            f"QAT_RUNS or hydra.run.dir")
    return text


def resumed_run_dir(resume: Any) -> Path | None:
    """The run directory `trainer.resume` continues, or None (nothing to resume, path missing, or a
    checkpoint file outside any run directory: then the resumed run gets a new directory).

    A directory is taken as the run directory itself (it holds checkpoints/last.pt or last.pt); a
    file `<run>/checkpoints/<name>.pt` or `<run>/<name>.pt` belongs to `<run>` when that folder is a
    run directory (it holds `.hydra/` or `summary.json`).
    """
    if resume is None or str(resume) == "":
        return None
    path = as_path(resume)
    if path.is_dir():
        return path
    if not path.is_file():
        return None
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run if (run / ".hydra").is_dir() or (run / "summary.json").is_file() else None


def resume_run_dir(resume: Any, new_run_dir: str) -> str:
    run = resumed_run_dir(resume)
    return new_run_dir if run is None else str(run)


def hydra_output_subdir(resume: Any, stamp: str) -> str:
    return ".hydra" if resumed_run_dir(resume) is None else f".hydra/{RESUME_SUBDIR_PREFIX}{stamp}"


def register_resolvers() -> None:
    for name, function in (("weights_only_method", weights_only_method),
                           ("activation_for", activation_for), ("runs_root", runs_root), ("run_name", check_run_name),
                           ("resume_run_dir", resume_run_dir), ("hydra_output_subdir", hydra_output_subdir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


register_resolvers()


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(cfg: DictConfig) -> None:
    """Fail at start, naming the bad value, for settings that would only fail (or mislead) later.

    Type-checked as well as range-checked: `optim.lr=abc` reports the value instead of failing
    later with "'>' not supported between 'str' and 'int'"."""
    problems = []

    def check(key: str, value: Any, ok: bool, rule: str) -> None:
        if not ok:
            problems.append(f"{key} must be {rule}, got {value!r}")

    lr = cfg.optim.lr
    check("optim.lr", lr, _is_number(lr) and lr > 0, "> 0")
    decay = cfg.optim.get("weight_decay", 0)
    check("optim.weight_decay", decay, _is_number(decay) and decay >= 0, ">= 0")
    epochs = cfg.trainer.epochs
    check("trainer.epochs", epochs, _is_int(epochs) and epochs >= 1, "an int >= 1")
    max_steps = cfg.trainer.get("max_steps")
    check("trainer.max_steps", max_steps, max_steps is None or (_is_int(max_steps) and max_steps >= 1),
          "null or an int >= 1")
    strict = cfg.trainer.get("init_strict", True)
    check("trainer.init_strict", strict, isinstance(strict, bool), "true or false")
    release = cfg.trainer.get("return_freed_memory", False)
    check("trainer.return_freed_memory", release, isinstance(release, bool), "true or false")
    check("seed", cfg.get("seed", 0), _is_int(cfg.get("seed", 0)), "an int")
    for key in ("batch_size", "eval_batch_size"):
        value = cfg.data[key]
        check(f"data.{key}", value, _is_int(value) and value >= 1, "an int >= 1")
    workers = cfg.data.get("num_workers", 0)
    check("data.num_workers", workers, _is_int(workers) and workers >= 0, "an int >= 0")
    warmup = cfg.sched.get("warmup_epochs", 0)
    check("sched.warmup_epochs", warmup, _is_number(warmup) and warmup >= 0, ">= 0")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
