"""The estimator base class and the autograd bridge every estimator uses.

An estimator is one surrogate derivative for the sign function. Forward is always the exact
quantizer (sign with sign(0) = +1, or whatever quantizer a caller hands in); backward multiplies
the incoming gradient by the estimator's pure ``grad(x)``:

    forward:  y = Q(x)
    backward: dL/dx = dL/dy * grad(x)

Estimators are ``nn.Module``s without parameters so that they show up in ``model.modules()``,
print in the model's repr, and receive the training progress through ``set_progress`` (see
``qat.set_progress``). No estimator keeps a global clock.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) in {-1, +1} with sign(0) = +1 (and sign(-0.0) = +1); never ``torch.sign``.

    Computed as copysign(1, x + 0.0): IEEE addition turns -0.0 into +0.0, and copysign is one
    vectorised pass (``torch.where`` with scalar operands is ~10x slower on CPU).
    """
    out = x + 0.0
    return torch.copysign(x.new_ones(()), out, out=out)


class _SurrogateQuantize(torch.autograd.Function):
    """y = quantize(x); dL/dx = dL/dy * estimator.grad(x)."""

    @staticmethod
    def forward(ctx, x, estimator, quantize):  # noqa: D401 - autograd signature
        ctx.save_for_backward(x)
        ctx.estimator = estimator
        with torch.no_grad():
            return quantize(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return ctx.estimator.backward(x, grad_output), None, None


#: name -> estimator class, filled by ``@register`` as the estimator modules are imported.
REGISTRY: dict[str, type["Estimator"]] = {}


def register(cls: type["Estimator"]) -> type["Estimator"]:
    """Class decorator: make ``cls`` selectable as ``estimators.get(cls.name)`` and from configs
    (``quant.estimator=<name>``). Adding an estimator is this decorator on its class plus
    ``configs/estimator/<name>.yaml``; nothing else lists estimators."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"estimator {cls.__name__}: name {cls.name!r} is empty or already registered")
    REGISTRY[cls.name] = cls
    return cls


class Estimator(nn.Module):
    """Base class: ``forward(x)`` is sign(x) with ``grad(x)`` as its backward.

    Subclasses implement ``grad(x)`` (a pure function of x and the hyperparameters) and, when a
    hyperparameter follows a schedule, ``set_progress(p)`` with p in [0, 1].
    """

    name: str = ""
    scheduled: bool = False
    #: What ``grad(x)`` needs of x, for layers that store less than x for backward
    #: (``layers.quantized``, compressed activations): ``"none"`` when grad(x) == 1 everywhere,
    #: ``"zeros"`` when grad(x) is 1 except on a set Z where it is 0 (one bit per element,
    #: ``zeros(x)``), ``"value"`` when the derivative is smooth and needs x itself (no exact
    #: compression: x is kept).
    needs: str = "value"

    def grad(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, x: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        """dL/dx = dL/dy * grad(x); an estimator may override it with a fused equivalent."""
        return self.grad(x).to(grad_output.dtype).mul_(grad_output)

    def zeros(self, x: torch.Tensor) -> torch.Tensor:
        """Bool mask of Z for ``needs == "zeros"`` estimators: grad(x) = 0 on Z, 1 elsewhere."""
        raise NotImplementedError(f"estimator {self.name!r} has a smooth derivative (needs={self.needs!r})")

    def zeros_comparison(self, dtype: torch.dtype) -> tuple[str, float, bool] | None:
        """(op, threshold, absolute) when ``zeros(x)`` is the single comparison op(|x| or x, threshold)
        for x of ``dtype`` (op "lt", "le" or "ge"): a saver can then compare and pack in one pass
        (``layers.bitpack.pack_compare``); None when it is not."""
        return None

    def backward_from_zeros(self, zeros: torch.Tensor | None, grad_output: torch.Tensor) -> torch.Tensor:
        """``backward(x, g)`` from ``zeros(x)`` alone (None for ``needs == "none"``), bit for bit:
        g, with +0.0 on Z (what ``backward`` gives, NaN inputs included). May write into g."""
        if self.needs == "none":
            return self.backward(grad_output, grad_output)  # grad(.) == 1: x's values are not read
        if self.needs != "zeros":
            raise NotImplementedError(f"estimator {self.name!r} needs x itself (needs={self.needs!r})")
        return grad_output.masked_fill_(zeros, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(x, sign)

    def quantize(self, x: torch.Tensor, quantizer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Apply any quantizer in forward with this estimator's derivative in backward."""
        return _SurrogateQuantize.apply(x, self, quantizer)

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1]; estimators without a schedule only validate it."""
        check_progress(progress)

    def hyperparameters(self) -> dict:
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in self.hyperparameters().items())


def check_progress(progress: float) -> float:
    if not 0.0 <= float(progress) <= 1.0:
        raise ValueError(f"training progress must be in [0, 1], got {progress!r}")
    return float(progress)


def require(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless condition holds (hyperparameter validation)."""
    if not condition:
        raise ValueError(message)
