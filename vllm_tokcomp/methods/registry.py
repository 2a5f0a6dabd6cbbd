"""One registry of compressors by lower-case name, with their capabilities."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, TypeVar

from .base import Compressor
from .knobs import knob_specs, quote

_NAME = re.compile(r"^[a-z][a-z0-9_+]*$")
_REGISTRY: dict[str, type[Compressor]] = {}

C = TypeVar("C", bound=type[Compressor])


def register(cls: C) -> C:
    """Class decorator: add a method under its ``name`` (lower-case, unique)."""
    name = cls.name
    if not _NAME.match(name or ""):
        raise ValueError(f"method name {name!r} of {cls.__qualname__} must be lower-case [a-z0-9_+]")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__qualname__} must be a dataclass (its fields are the method's knobs)")
    knob_specs(cls)  # every knob declares its type and bounds
    _REGISTRY[name] = cls
    return cls


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Compressor]:
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def get_method(name: str, **knobs: Any) -> Compressor:
    """Instantiate a method by name; unknown knobs raise ``ValueError`` naming them."""
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((quote(k) for k in set(knobs) - fields), key=len)
    if unknown:
        raise ValueError(
            f"method {name!r} has no knob(s) {', '.join(unknown[:3])}; its knobs: {', '.join(sorted(fields)) or 'none'}"
        )
    return cls(**knobs)


def describe(name: str) -> dict[str, Any]:
    """Capabilities and knob defaults of one method, for docs and ``tokcomp info``."""
    cls = method_class(name)
    return {
        "name": cls.name,
        "family": cls.family,
        "paper": cls.paper,
        "needs_cls_attention": cls.needs_cls_attention,
        "needs_layer_cls_attention": cls.needs_layer_cls_attention,
        "needs_keys": cls.needs_keys,
        "needs_text": cls.needs_text,
        "needs_text_attention": cls.needs_text_attention,
        "uses_keys": cls.uses_keys,
        "uses_text_attention": cls.uses_text_attention,
        "selects_by_content": cls.selects_by_content,
        "prunes": cls.prunes,
        "merges": cls.merges,
        "order_preserving": cls.order_preserving,
        "supports_fixed_budget": cls.supports_fixed_budget,
        "adaptive": cls.adaptive,
        "knobs": {
            f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(cls)
        },
        "knob_ranges": {name: spec.describe() for name, spec in knob_specs(cls).items()},
    }


def _load_builtin_methods() -> None:
    from . import builtin  # noqa: F401 - importing registers the built-in methods


def knob_table() -> str:
    """Every method's knobs with their defaults and accepted values, as a markdown table (docs/configuration.md's)."""
    rows = ["| method | knob | default | accepted |", "|---|---|---|---|"]
    for name in available_methods():
        cls = method_class(name)
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for knob_name, spec in knob_specs(cls).items():
            default = json.dumps(defaults[knob_name])
            rows.append(f"| `{name}` | `{knob_name}` | `{default}` | {spec.describe()} |")
    return "\n".join(rows)
