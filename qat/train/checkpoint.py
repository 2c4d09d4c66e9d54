"""Checkpoints that load with `torch.load(path, weights_only=True)`: no code runs from a checkpoint.

A checkpoint is a dict of tensors, numbers, strings and lists only:
  format_version, model (state_dict), optimizer (state_dict), scheduler (state_dict),
  epoch (completed epochs), step (optimizer steps), batch_in_epoch (batches of `epoch` already done,
  > 0 only for a mid-epoch save such as Ctrl-C), train_sums (the interrupted epoch's metric sums),
  best_val_acc1 (best_val_bpb for a language model: the task's best validation figure), train_seconds,
  config_yaml (the run's resolved config as YAML text),
  identity {model, method, data, num_classes}, rng {torch, cuda, numpy_*, python} as tensors,
  init_from (the record of trainer.init_from, or None; qat.train.init_from).

`config_differences` compares a checkpoint's config_yaml with the config of the run resuming it,
leaving out the settings that may legitimately change on resume (RESUME_FREE_KEYS).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from omegaconf import OmegaConf

FORMAT_VERSION = 1
IDENTITY_KEYS = ("model", "method", "data", "num_classes")
# Dotted config keys (a key covers everything under it) a resumed run may change without changing
# what is trained: where to resume from and where to stop, how progress and logs are shown, where
# the data lives and how it is loaded, threads and device, the evaluation batch size, the run's label;
# trainer.init_from / init_strict act only when a run starts (its checkpoint holds the loaded weights).
RESUME_FREE_KEYS = ("trainer.resume", "trainer.init_from", "trainer.init_strict", "trainer.max_steps",
                    "trainer.progress_bar", "trainer.progress_interval",
                    "trainer.progress_log_interval", "trainer.threads", "logger", "device", "experiment_name",
                    "data.root", "data.source", "data.imagefolder", "data.download", "data.cache",
                    "data.num_workers", "data.pin_memory", "data.eval_batch_size")
ABSENT = "(absent)"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that belongs to a different model / setup."""


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the training loop touches, as tensors (numpy's and Python's tuples unpacked)."""
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_position": int(position), "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gauss": float(cached_gauss),
        "python_version": int(python_version),
        "python_state": torch.tensor(python_state, dtype=torch.int64),
        "python_gauss": python_gauss,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_position"], state["numpy_has_gauss"],
                         state["numpy_cached_gauss"]))
    random.setstate((state["python_version"], tuple(state["python_state"].tolist()),
                     state["python_gauss"]))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) so an interrupted save never leaves a corrupt file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **payload}, temporary)
    os.replace(temporary, path)


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory (its checkpoints/last.pt or last.pt)."""
    return _checkpoint_in(path, ("last.pt",))


def trained_model_path(path: str | os.PathLike) -> Path:
    """The checkpoint holding a run's trained network, for reuse of its weights (trainer.init_from,
    distill.teacher): a checkpoint file as given, or in a run directory its best.pt (the network
    chosen on validation), else its last.pt (checkpoints/ first, then the directory itself)."""
    return _checkpoint_in(path, ("best.pt", "last.pt"))


def _checkpoint_in(path: str | os.PathLike, names: tuple[str, ...]) -> Path:
    """``path`` if it is a checkpoint file; in a run directory the first of ``names`` found in
    checkpoints/, then in the directory itself; else CheckpointError."""
    path = Path(path)
    if path.is_dir():
        for name in names:
            for candidate in (path / "checkpoints" / name, path / name):
                if candidate.is_file():
                    return candidate
        raise CheckpointError(f"no {' or '.join(names)} in run directory {path} (looked in checkpoints/ and "
                              f"the directory itself)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; unreadable files raise CheckpointError."""
    path = resolve_checkpoint_path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # corrupt zip, truncated file, pickle with code in it, ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or not a checkpoint "
                              f"of this framework ({type(error).__name__}: {first_line})") from error
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        version = payload.get("format_version") if isinstance(payload, dict) else None
        raise CheckpointError(f"{path} is not a checkpoint of this framework (format_version "
                              f"{version!r}, expected {FORMAT_VERSION})")
    return payload


def check_identity(payload: dict[str, Any], expected: dict[str, Any], path: Any) -> None:
    """Raise when the checkpoint was written for another model, method, dataset or class count."""
    stored = payload.get("identity", {})
    differences = [f"{key}: checkpoint has {stored.get(key)!r}, this run has {expected[key]!r}"
                   for key in IDENTITY_KEYS if stored.get(key) != expected[key]]
    if differences:
        raise CheckpointError(f"checkpoint {path} belongs to a different setup: " + "; ".join(differences))


def state_differences(own: Mapping[str, Any], state: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mismatched) between a model's state_dict `own` and a loaded `state`:
    keys only the model has, keys only the state has, and "key (state shape) vs (model shape)"."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    return missing, unexpected, mismatched


def describe_differences(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    """The differences of `state_differences` in one line, at most five names of each kind."""
    def head(items):
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
    return "; ".join(part for part in (
        f"missing keys: {head(missing)}" if missing else "",
        f"unexpected keys: {head(unexpected)}" if unexpected else "",
        f"shape mismatches (checkpoint vs model): {head(mismatched)}" if mismatched else "",
    ) if part)


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Any, hint: str = "") -> None:
    """load_state_dict(strict=True) with a message listing what does not fit (then `hint`)."""
    differences = state_differences(model.state_dict(), state)
    if any(differences):
        raise CheckpointError(f"checkpoint {path} does not fit this model: {describe_differences(*differences)}"
                              + (f"; {hint}" if hint else ""))
    model.load_state_dict(state, strict=True)


def flatten_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value} of nested mappings (lists are leaves)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten_config(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _is_free(key: str) -> bool:
    return any(key == free or key.startswith(free + ".") for free in RESUME_FREE_KEYS)


def config_differences(saved_yaml: str | None, current: Mapping) -> dict[str, dict[str, Any]]:
    """{key: {"checkpoint": value, "run": value}} for every training setting that differs between a
    checkpoint's config_yaml and the resolved config `current` of the run resuming it; a key present
    on one side only shows ABSENT on the other. RESUME_FREE_KEYS are left out."""
    if not saved_yaml:
        return {}
    saved = flatten_config(OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=True))
    now = flatten_config(current)
    return {key: {"checkpoint": saved.get(key, ABSENT), "run": now.get(key, ABSENT)}
            for key in sorted(set(saved) | set(now))
            if not _is_free(key) and saved.get(key, ABSENT) != now.get(key, ABSENT)}
