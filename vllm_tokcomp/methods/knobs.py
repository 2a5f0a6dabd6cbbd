"""Declared knobs: every method field has a type and finite bounds, checked before the method runs.

A method declares each knob with :func:`knob` (a dataclass field carrying a :class:`KnobSpec`), so
the registry can check any value a client sends (type, range, choices) and turn it into one
canonical form before anything runs: an ``int`` knob accepts integers only (never ``bool``), a
``float`` knob accepts finite integers or floats and stores ``float(value) + 0.0`` (so ``1`` and
``1.0`` are the same setting and ``-0.0`` is ``0.0``), a ``bool`` knob accepts ``True``/``False``
only, a ``str`` knob one of its choices. Bounds are inclusive. Nothing here imports vLLM.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

_METADATA_KEY = "tokcomp_knob"
# Longest piece of a client's value quoted back in an error message.
QUOTE_LIMIT = 40
# Seeds are int64 in torch: keep them inside 63 bits.
MAX_SEED = 2**63 - 1


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters (a client's value is echoed, never in full)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still reported
        text = f"<{type(value).__name__}>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class KnobSpec:
    """Type and range of one knob: ``kind`` is ``int``, ``float``, ``bool`` or ``str``."""

    kind: type
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind in (int, float) and (self.low is None or self.high is None):
            raise TypeError("numeric knobs need finite low and high bounds")
        if self.kind is str and not self.choices:
            raise TypeError("string knobs need their choices")

    def describe(self) -> str:
        """The accepted values in words, e.g. ``a number in [0, 1]``."""
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        noun = "an integer" if self.kind is int else "a number"
        return f"{noun} in [{_number(self.low)}, {_number(self.high)}]"

    def check(self, name: str, value: object) -> object:
        """The canonical value, or ``ValueError`` naming the knob and its range."""
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is str:
            ok = isinstance(value, str) and value in self.choices
        elif isinstance(value, bool) or not isinstance(value, int | float):
            ok = False
        elif self.kind is int:
            ok = isinstance(value, int) and self.low <= value <= self.high
        else:
            ok = _finite(value) and self.low <= value <= self.high
        if not ok:
            raise ValueError(f"{name} must be {self.describe()}, got {quote(value)}")
        return float(value) + 0.0 if self.kind is float else value


def knob(default: Any, *, low: float | None = None, high: float | None = None,
         choices: tuple[str, ...] = ()) -> Any:
    """A method field with its declared type (that of ``default``) and inclusive bounds or choices."""
    spec = KnobSpec(type(default), low, high, tuple(choices))
    spec.check("default", default)
    return dataclasses.field(default=default, metadata={_METADATA_KEY: spec})


def knob_specs(cls: type) -> dict[str, KnobSpec]:
    """``{field name: KnobSpec}`` of a method class; a field declared without :func:`knob` is an error."""
    specs = {}
    for field in dataclasses.fields(cls):
        spec = field.metadata.get(_METADATA_KEY)
        if spec is None:
            raise TypeError(f"{cls.__qualname__}.{field.name} is not declared with knob(): its type and bounds "
                            "are unknown")
        specs[field.name] = spec
    return specs


def canonical_knobs(instance: object) -> None:
    """Check every knob of a (frozen) method instance and store its canonical value in place."""
    for name, spec in knob_specs(type(instance)).items():
        value = spec.check(name, getattr(instance, name))
        object.__setattr__(instance, name, value)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _number(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
