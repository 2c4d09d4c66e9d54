"""Gradient estimators: what backward uses in place of d sign/dx.

    >>> import estimators
    >>> est = estimators.get("fourier", terms=9)
    >>> y = est(x)          # exactly sign(x) in {-1, +1}, sign(0) = +1
    >>> est.grad(x)         # the surrogate derivative backward multiplies by

``estimators.get(name, **hyperparameters)`` builds one; ``estimators.NAMES`` lists the registry.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping

from .base import REGISTRY, Estimator, check_progress, register, sign
from .surrogates import ApproxSign, ClippedSTE, ErrorDecay, Fourier, Identity, SwishSign

# Every module of this package registers its estimators on import: a new estimator is a new (or
# existing) module with an ``@register`` class, found here without being listed.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

#: Every registered estimator's name.
NAMES = tuple(REGISTRY)


def get(name, **hyperparameters) -> Estimator:
    """Build the estimator registered as ``name`` with ``hyperparameters``.

    ``name`` may also be an ``Estimator`` (returned as is) or a mapping ``{"name": ..., **hp}``.
    Raises ValueError naming the bad value and the valid choices.
    """
    if isinstance(name, Estimator):
        if hyperparameters:
            raise ValueError(f"hyperparameters {sorted(hyperparameters)} given with an estimator object {name!r}")
        return name
    if isinstance(name, Mapping):
        spec = dict(name)
        if "name" not in spec:
            raise ValueError(f"an estimator mapping needs a 'name' key (one of {', '.join(NAMES)}), got {spec!r}")
        return get(spec.pop("name"), **{**spec, **hyperparameters})
    if name not in REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; valid estimators: {', '.join(NAMES)}")
    cls = REGISTRY[name]
    try:
        return cls(**hyperparameters)
    except TypeError as error:
        raise ValueError(f"estimator {name!r} got invalid hyperparameters {hyperparameters}: {error}") from None


__all__ = ["Estimator", "REGISTRY", "NAMES", "get", "register", "sign", "check_progress",
           "Identity", "ClippedSTE", "ApproxSign", "SwishSign", "ErrorDecay", "Fourier"]
