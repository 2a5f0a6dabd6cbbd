"""The plugin's configuration: parsed once into a frozen spec, validated with errors naming the field.

Configuration travels through vLLM's ``mm_processor_kwargs`` channel, which
reaches both the front-end processor and the model:

* engine-wide: ``--mm-processor-kwargs '{"tokcomp_method": "tome", "tokcomp_budget": 64}'``
* per request: ``extra_body={"mm_processor_kwargs": {"tokcomp_budget": 32}}`` (needs
  ``--trust-request-mm-kwargs``); request values override engine values.

The token budget of an item is either a count (``tokcomp_budget``: the same for every image) or a
share (``tokcomp_ratio``: ``ceil(ratio * N)`` of an item's ``N`` tokens, the natural unit for
dynamic-resolution models); one level (engine or request) gives one of the two, and a request's
choice replaces the engine's.

``tokcomp_method: "none"`` switches compression off. No ``tokcomp_*`` key at
engine level means the plugin is inert unless a request opts in.

Trained connectors (:mod:`vllm_tokcomp.connectors`) are listed engine-wide only
(``"tokcomp_connectors": [STEM, ...]``); a request then picks one as ``tokcomp_method`` (its
kind, e.g. ``c_abstractor``) with ``tokcomp_budget`` (its count).
No vLLM import here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .connectors import Connector, counts_of, is_connector_method, read_catalog
from .errors import ConfigError
from .methods import available_methods, get_method, method_class

METHOD_KEY = "tokcomp_method"
BUDGET_KEY = "tokcomp_budget"
OPTIONS_KEY = "tokcomp_options"
RATIO_KEY = "tokcomp_ratio"
PLUGIN_KEYS = (METHOD_KEY, BUDGET_KEY, RATIO_KEY, OPTIONS_KEY)
CONNECTORS_KEY = "tokcomp_connectors"  # engine-wide only: the trained connector files the server loads
ENGINE_KEYS = (*PLUGIN_KEYS, CONNECTORS_KEY)
OFF = "none"
AUTO = "auto"  # per-image budget estimated from the pixels (MustDrop-style spatial redundancy)
DEFAULT_BUDGET = 64

# Signals the vLLM integration hands to methods: the vision tower's CLS attention and keys,
# the prompt's text embedded by the LM, and text->vision attention from an LM probe.
INTEGRATION_SIGNALS = frozenset({"cls_attention", "keys", "text_embeds", "text_attention"})
# Internal key: the prompt's text token ids, injected by the processor for text-guided methods
# (so they are part of vLLM's multimodal hash). Never accepted from a request.
QUERY_KEY = "tokcomp_query"


@dataclass(frozen=True)
class CompressionSpec:
    """What to do with every image of a request: keep ``budget`` tokens chosen by ``method``."""

    method: str
    budget: int | str | None  # a token count, AUTO until the processor resolves it per image, None with a ratio
    options: tuple[tuple[str, Any], ...] = ()  # the method's knobs, sorted by name
    ratio: float | None = None  # share of each item's tokens to keep, instead of a count

    def to_dict(self) -> dict[str, Any]:
        data = {METHOD_KEY: self.method, BUDGET_KEY: self.budget, OPTIONS_KEY: dict(self.options)}
        if self.ratio is not None:
            data[RATIO_KEY] = self.ratio
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionSpec:
        options = tuple(sorted(dict(data.get(OPTIONS_KEY) or {}).items()))
        return cls(data[METHOD_KEY], data[BUDGET_KEY], options, data.get(RATIO_KEY))

    def for_item(self, num_tokens: int) -> CompressionSpec:
        """This spec with a ratio turned into the item's token count (what the processor hands on)."""
        if self.ratio is None:
            return self
        return dataclasses.replace(self, budget=ratio_count(self.ratio, num_tokens), ratio=None)


def ratio_count(ratio: float, num_tokens: int) -> int:
    """Tokens kept of ``num_tokens`` at ``ratio``: ``ceil(ratio * N)``, at least 1. Rounded first so
    that e.g. 0.1 * 30 keeps 3, not 4."""
    return max(1, math.ceil(round(ratio * num_tokens, 6)))


def plugin_keys_in(kwargs: Mapping[str, object] | None) -> dict[str, object]:
    """The ``tokcomp_*`` entries of a kwargs mapping."""
    return {k: v for k, v in (kwargs or {}).items() if isinstance(k, str) and k.startswith("tokcomp_")}


def method_reads_text(method: str) -> bool:
    """Whether the method uses the prompt's text (embeddings or text->vision attention)."""
    if is_connector_method(method):
        return False
    cls = method_class(method)
    return cls.needs_text or cls.needs_text_attention or getattr(cls, "uses_text_attention", False)


def without_plugin_keys(kwargs: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in kwargs.items() if not (isinstance(k, str) and k.startswith("tokcomp_"))}


def servable_methods() -> list[str]:
    """Methods that fit a fixed budget and need only signals the integration provides."""
    return [name for name in available_methods() if _unservable_reason(name) is None]


def _unservable_reason(name: str) -> str | None:
    cls = method_class(name)
    if not cls.supports_fixed_budget:
        return "it has no fixed-budget form (vLLM needs the token count before the encoder runs)"
    missing = set(cls.required_signals()) - INTEGRATION_SIGNALS
    if missing:
        return f"it needs {', '.join(sorted(missing))}, which the vLLM integration does not provide yet"
    return None


def engine_connectors(engine_kwargs: Mapping[str, object] | None) -> dict[tuple[str, int], Connector]:
    """The trained connectors the server lists (``{(method, tokens): Connector}``), checked; empty if none."""
    if not engine_kwargs or CONNECTORS_KEY not in engine_kwargs:
        return {}
    return read_catalog(engine_kwargs[CONNECTORS_KEY], f"mm_processor_kwargs.{CONNECTORS_KEY}")


def _check_method(value: object, field: str, connectors: Mapping[tuple[str, int], Connector]) -> str:
    if not isinstance(value, str):
        raise ConfigError(field, f"must be a method name (string), got {type(value).__name__} {value!r}")
    if value == OFF:
        return value
    if is_connector_method(value):
        if not counts_of(connectors, value):
            raise ConfigError(field, f"{value!r} is a trained connector: the server must list its files in "
                                     f"--mm-processor-kwargs {CONNECTORS_KEY}")
        return value
    if value not in available_methods():
        served = [OFF, *servable_methods(), *sorted({method for method, _ in connectors})]
        raise ConfigError(field, f"unknown method {value!r}; available: {', '.join(served)}")
    reason = _unservable_reason(value)
    if reason:
        raise ConfigError(field, f"method {value!r} cannot be served: {reason}")
    return value


def _check_budget(value: object, field: str) -> int | str:
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int):
        kind = type(value).__name__
        raise ConfigError(field, f"must be a positive integer token count or {AUTO!r}, got {kind} {value!r}")
    if value < 1:
        raise ConfigError(field, f"must be a positive integer token count, got {value}")
    return value


def _check_ratio(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(field, f"must be a number in (0, 1], the share of each item's tokens to keep, got {value!r}")
    if not 0 < value <= 1:
        raise ConfigError(field, f"must be in (0, 1] (the share of each item's tokens to keep), got {value}")
    return float(value)


def _check_amount(kwargs: Mapping[str, object], where: str) -> tuple[int | str | None, float | None] | None:
    """(budget, ratio) given at one level, or None when it gives neither; both at once is an error."""
    if RATIO_KEY in kwargs and BUDGET_KEY in kwargs:
        raise ConfigError(
            f"{where}.{RATIO_KEY}", f"give either {BUDGET_KEY} (a count) or {RATIO_KEY} (a share), not both"
        )
    if RATIO_KEY in kwargs:
        return None, _check_ratio(kwargs[RATIO_KEY], f"{where}.{RATIO_KEY}")
    if BUDGET_KEY in kwargs:
        return _check_budget(kwargs[BUDGET_KEY], f"{where}.{BUDGET_KEY}"), None
    return None


def _check_options(method: str, value: object, field: str) -> tuple[tuple[str, Any], ...]:
    """Knobs for ``method``, validated by instantiating it (unknown knob or bad value: error naming it)."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise ConfigError(field, f"must be an object of {method!r} knobs, got {type(value).__name__} {value!r}")
    try:
        get_method(method, **value)
    except (ValueError, TypeError) as error:
        raise ConfigError(field, str(error)) from None
    return tuple(sorted(value.items()))


def _check_keys(kwargs: Mapping[str, object], where: str, known: tuple[str, ...] = PLUGIN_KEYS) -> None:
    if CONNECTORS_KEY in kwargs and CONNECTORS_KEY not in known:
        raise ConfigError(f"{where}.{CONNECTORS_KEY}", "is set by the server (engine-wide), not by requests")
    unknown = sorted(set(plugin_keys_in(kwargs)) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}", f"unknown tokcomp setting; known: {', '.join(known)}"
        )


def _connector_spec(
    method: str, amount: tuple[int | str | None, float | None] | None, options: object,
    connectors: Mapping[tuple[str, int], Connector], where: str,
) -> CompressionSpec:
    """A connector's spec: its count is one of the listed connectors' (the only one when none is given)."""
    counts = counts_of(connectors, method)
    if options:
        raise ConfigError(f"{where}.{OPTIONS_KEY}", f"trained connector {method!r} takes no options, got {options!r}")
    budget, ratio = amount if amount is not None else (None, None)
    if ratio is not None:
        raise ConfigError(f"{where}.{RATIO_KEY}", f"trained connector {method!r} has fixed counts: give "
                                                  f"{BUDGET_KEY} ({', '.join(map(str, counts))})")
    if budget is None and len(counts) == 1:
        budget = counts[0]
    if budget not in counts:
        raise ConfigError(f"{where}.{BUDGET_KEY}", f"trained connector {method!r} is loaded for "
                                                   f"{', '.join(map(str, counts))} tokens, got {budget!r}")
    return CompressionSpec(method=method, budget=budget)


def parse_engine_config(mm_processor_kwargs: Mapping[str, object] | None) -> CompressionSpec | None:
    """Engine-wide spec from ``--mm-processor-kwargs``; ``None`` means no compression by default."""
    where = "mm_processor_kwargs"
    kwargs = plugin_keys_in(mm_processor_kwargs)
    _check_keys(kwargs, where, ENGINE_KEYS)
    connectors = engine_connectors(kwargs)
    if not set(kwargs) - {CONNECTORS_KEY}:
        return None  # nothing, or connectors that requests may opt into
    if METHOD_KEY not in kwargs:
        given = next(k for k in PLUGIN_KEYS if k in kwargs)
        raise ConfigError(f"{where}.{METHOD_KEY}", f"is required when {given} is set")
    method = _check_method(kwargs[METHOD_KEY], f"{where}.{METHOD_KEY}", connectors)
    if is_connector_method(method):
        return _connector_spec(method, _check_amount(kwargs, where), kwargs.get(OPTIONS_KEY), connectors, where)
    budget, ratio = _check_amount(kwargs, where) or (DEFAULT_BUDGET, None)
    if method == OFF:
        return None
    options = _check_options(method, kwargs.get(OPTIONS_KEY), f"{where}.{OPTIONS_KEY}")
    return CompressionSpec(method=method, budget=budget, options=options, ratio=ratio)


def is_engine_configured(mm_processor_kwargs: Mapping[str, object] | None) -> bool:
    """True when the server owner put any tokcomp key in ``--mm-processor-kwargs`` (even ``none``)."""
    return bool(plugin_keys_in(mm_processor_kwargs))


def resolve_request(
    engine_kwargs: Mapping[str, object] | None, request_kwargs: Mapping[str, object] | None
) -> CompressionSpec | None:
    """The spec for one request: request values override the engine's, ``none`` switches off."""
    where = "mm_processor_kwargs"
    request = plugin_keys_in(request_kwargs)
    _check_keys(request, where)
    engine_keys = plugin_keys_in(engine_kwargs)
    engine_method = engine_keys.get(METHOD_KEY)
    connectors = engine_connectors(engine_keys)
    method = request.get(METHOD_KEY, engine_method)
    if METHOD_KEY in request:
        method = _check_method(method, f"{where}.{METHOD_KEY}", connectors)
    if isinstance(method, str) and is_connector_method(method):
        # The engine's count belongs to the engine's method; another method's 64 is no connector's count.
        amount = _check_amount(request, where) or (_check_amount(engine_keys, where) if method == engine_method
                                                    else None)
        return _connector_spec(method, amount, request.get(OPTIONS_KEY), connectors, where)
    # A request's count or share replaces the engine's (which were validated at startup: checking them again
    # cannot fail, it only turns them into the same (budget, ratio) pair).
    budget, ratio = _check_amount(request, where) or _check_amount(engine_keys, where) or (DEFAULT_BUDGET, None)
    if method is None:
        if request:
            given = ", ".join(sorted(request))
            raise ConfigError(
                f"{where}.{METHOD_KEY}", f"is required: the server has no default method (got only {given})"
            )
        return None
    if method == OFF:
        return None
    # Engine knobs belong to the engine's method; a request that picks another method starts from defaults.
    options = dict(engine_keys.get(OPTIONS_KEY) or {}) if method == engine_method else {}
    if OPTIONS_KEY in request:
        if not isinstance(request[OPTIONS_KEY], Mapping):
            options = request[OPTIONS_KEY]  # let _check_options name the type error
        else:
            options.update(request[OPTIONS_KEY])
    checked = _check_options(method, options, f"{where}.{OPTIONS_KEY}")
    return CompressionSpec(method=method, budget=budget, options=checked, ratio=ratio)
