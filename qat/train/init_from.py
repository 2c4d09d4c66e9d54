"""trainer.init_from: start a new run from another run's network weights, and nothing else.

`trainer.resume` continues a run (model, optimizer and schedule state, step, RNG). `trainer.init_from`
starts a new one: only the model state_dict of the source checkpoint is copied into the freshly built
(and already quantized) model, before the optimizer exists; optimizer, schedule, step and epoch start
from zero. It is the second stage of two-stage recipes (ReActNet: stage 2 starts from stage 1; NVIDIA
ASP: dense, then prune, then retrain) and fine-tuning from a float run.

Source: a .pt checkpoint of this framework, or a run directory (its best.pt, else last.pt:
`checkpoint.trained_model_path`). Keys are matched by name. A float layer and a quantized layer of
the same model have the same keys (weight, bias; BN keeps its own), so an fp, bwn or xnor run loads
into any other of them; a method with extra parameters (FDA's noise-adaptation module) or a different
class count does not fit key for key.
  trainer.init_strict=true (default): every model key must be in the source with the same shape and
      the source may hold no other key; otherwise one CheckpointError line names what does not fit.
  trainer.init_strict=false: the keys present in both with equal shapes load; the others keep their
      fresh initialisation and are listed (summary.json `init_from`). A source sharing no key with
      the model is still an error.
The method or model of the source is not checked (loading across methods is the point); the
checkpoint's identity is recorded instead.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

from qat.train import checkpoint as ckpt

log = logging.getLogger(__name__)


def init_from(model: torch.nn.Module, source: str | os.PathLike, strict: bool) -> dict[str, Any]:
    """Load the network weights of `source` into `model` as the module docstring says; returns the
    record for summary.json: {checkpoint, source_identity, loaded, missing, unexpected, mismatched}."""
    path = ckpt.trained_model_path(source)
    payload = ckpt.load_checkpoint(path)
    state = payload["model"]
    own = model.state_dict()
    missing, unexpected, mismatched = ckpt.state_differences(own, state)
    if strict:
        ckpt.load_model_state(model, state, path, hint="trainer.init_strict=false loads only the keys that fit")
        loaded = len(own)
    else:
        fitting = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
        if not fitting:
            raise ckpt.CheckpointError(f"checkpoint {path} shares no key of equal shape with this model: "
                                       f"{ckpt.describe_differences(missing, unexpected, mismatched)}")
        model.load_state_dict(fitting, strict=False)
        loaded = len(fitting)
        if missing or unexpected or mismatched:
            log.warning(f"trainer.init_from={path}: loaded {loaded} of {len(own)} model keys; kept the fresh "
                        f"initialisation of the rest: {ckpt.describe_differences(missing, unexpected, mismatched)}")
    return {"checkpoint": str(path), "source_identity": payload.get("identity", {}), "loaded": loaded,
            "missing": missing, "unexpected": unexpected, "mismatched": mismatched}
