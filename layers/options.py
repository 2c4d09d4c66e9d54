"""Declared options: the hyperparameters a quantizer (or a layer) takes, each with its type, default,
a rule it must satisfy and a line of documentation.

A quantizer lists its options in ``options``; the method table (``layers.methods``) gathers them
per method, the drop-in classes print them in their docstring (``help(XNORConv2d)``), and
``validate_options`` checks a whole set once, naming the bad value and what would be valid. Nothing
discovers options from constructor signatures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable


@dataclass(frozen=True)
class Option:
    name: str
    kind: type  # bool, int, float or str
    default: Any
    doc: str
    #: an extra condition on the value, and how ``rule`` states it in errors ("> 0", "in [0, 1)")
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    choices: tuple = ()

    def validate(self, value: Any, owner: str) -> Any:
        """``value`` converted to ``kind`` (an int is accepted for a float), or ValueError naming it."""
        kind_ok = (isinstance(value, bool) if self.kind is bool else
                   isinstance(value, (int, float)) and not isinstance(value, bool) if self.kind is float else
                   isinstance(value, int) and not isinstance(value, bool) if self.kind is int else
                   isinstance(value, self.kind))
        if not kind_ok:
            raise ValueError(f"{owner}: option {self.name} must be a {self.kind.__name__}, got {value!r}")
        value = self.kind(value)
        if self.choices and value not in self.choices:
            raise ValueError(f"{owner}: option {self.name} must be one of {', '.join(map(str, self.choices))}, "
                             f"got {value!r}")
        if self.check is not None and not self.check(value):
            raise ValueError(f"{owner}: option {self.name} must be {self.rule}, got {value!r}")
        return value

    def describe(self) -> str:
        rule = f", {self.rule}" if self.rule else ""
        choices = f", one of {'|'.join(map(str, self.choices))}" if self.choices else ""
        return f"{self.name} ({self.kind.__name__}, default {self.default!r}{rule}{choices}): {self.doc}"


def validate_options(declared: Iterable[Option], given: dict, owner: str) -> dict:
    """Every declared option's value: the given one, validated, or the default. An option that is
    not declared is a ValueError listing the valid names."""
    declared = {option.name: option for option in declared}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ValueError(f"{owner}: unknown option(s) {unknown}; valid options: {sorted(declared) or 'none'}")
    return {name: option.validate(given[name], owner) if name in given else option.default
            for name, option in declared.items()}
