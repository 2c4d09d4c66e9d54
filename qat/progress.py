"""``set_progress``: hand the training progress p in [0, 1] to every scheduled part of a model.

The walk calls ``set_progress`` on the outermost modules that define it (a quantized layer passes
it on to its quantizers, a quantizer to its estimator), so each object is updated once per call
and a layer can act on the result (HQ's reinitialisation of latent weights).
"""
from __future__ import annotations

from torch import nn

from estimators import check_progress


def set_progress(model: nn.Module, progress: float) -> None:
    p = check_progress(progress)

    def visit(module: nn.Module) -> None:
        if callable(getattr(module, "set_progress", None)):
            module.set_progress(p)
            return
        for child in module.children():
            visit(child)

    visit(model)
