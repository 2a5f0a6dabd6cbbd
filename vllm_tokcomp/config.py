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
engine level means the plugin is inert unless a request opts in. A budget or ratio given without a
method (at either level, with no method configured above it) compresses with :data:`DEFAULT_METHOD`.

Every value has a type and finite bounds (:data:`MAX_BUDGET`, ratios in (0, 1], each method's knobs
as declared in :mod:`vllm_tokcomp.methods.knobs`), and a resolved spec has one canonical form
(:func:`canonical_spec`): what vLLM hashes for its caches, so two different settings never share an
entry and equal settings always do. The server owner may bound what clients choose with the engine-wide
``tokcomp_allowed_methods``, ``tokcomp_budget_range``, ``tokcomp_ratio_range`` and ``tokcomp_allow_off``
(:class:`Limits`).

Trained connectors (:mod:`vllm_tokcomp.connectors`) are listed engine-wide only
(``"tokcomp_connectors": [STEM, ...]``); a request then picks one as ``tokcomp_method`` (its
kind, e.g. ``c_abstractor``) with ``tokcomp_budget`` (its count).
No vLLM import here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .connectors import Connector, counts_of, is_connector_method, read_catalog
from .errors import ConfigError
from .methods import available_methods, get_method, method_class
from .methods.knobs import quote

METHOD_KEY = "tokcomp_method"
BUDGET_KEY = "tokcomp_budget"
OPTIONS_KEY = "tokcomp_options"
RATIO_KEY = "tokcomp_ratio"
PLUGIN_KEYS = (METHOD_KEY, BUDGET_KEY, RATIO_KEY, OPTIONS_KEY)
CONNECTORS_KEY = "tokcomp_connectors"  # engine-wide only: the trained connector files the server loads
# Engine-wide only: what clients may choose. Flat keys with flat values: vLLM 0.32 also hands the engine's
# mm_processor_kwargs to HF's processor factory through an lru_cache, which cannot hash a list inside a mapping.
ALLOWED_METHODS_KEY = "tokcomp_allowed_methods"
BUDGET_RANGE_KEY = "tokcomp_budget_range"
RATIO_RANGE_KEY = "tokcomp_ratio_range"
ALLOW_OFF_KEY = "tokcomp_allow_off"
LIMIT_KEYS = (ALLOWED_METHODS_KEY, BUDGET_RANGE_KEY, RATIO_RANGE_KEY, ALLOW_OFF_KEY)
ENGINE_ONLY_KEYS = (CONNECTORS_KEY, *LIMIT_KEYS)
ENGINE_KEYS = (*PLUGIN_KEYS, *ENGINE_ONLY_KEYS)
OFF = "none"
AUTO = "auto"  # per-image budget estimated from the pixels (MustDrop-style spatial redundancy)
DEFAULT_BUDGET = 64
# The method a budget or ratio given without a method compresses with: the one that keeps the most accuracy
# across budgets and model families in the project's accuracy tables (docs/benchmarks.md), and needs no signal a family
# might lack (served on LLaVA and Qwen2-VL / Qwen2.5-VL alike).
DEFAULT_METHOD = "divprune"
# Largest token count a budget may name: larger than any image or clip a served model takes, small enough that
# every count stays an ordinary integer everywhere it travels.
MAX_BUDGET = 1 << 20

# Signals the vLLM integration hands to methods: the vision tower's CLS attention (of the feature layer, or of every
# layer) and keys, the prompt's text embedded by the LM, and text->vision attention from an LM probe.
INTEGRATION_SIGNALS = frozenset({"cls_attention", "layer_cls_attention", "keys", "text_embeds", "text_attention"})
# Internal keys, set by the server and never accepted from a request: the prompt's text token ids for
# text-guided methods, and the resolved spec in canonical form (both part of vLLM's multimodal hash), and the mark
# of the preview endpoint's own rendering (integration/preview.py).
QUERY_KEY = "tokcomp_query"
CANONICAL_KEY = "tokcomp_resolved"
PREVIEW_KEY = "tokcomp_preview"
INTERNAL_KEYS = (QUERY_KEY, CANONICAL_KEY, PREVIEW_KEY)


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


def canonical_spec(spec: CompressionSpec | None) -> str:
    """One string per distinct setting (``"null"`` for off): sorted keys, canonical knob values, no spaces.

    vLLM hashes numbers by their bytes without their type (``1`` and ``5e-324`` hash alike) and mappings in
    insertion order, so the processor puts this string, not the client's values, into the multimodal hash."""
    return json.dumps(None if spec is None else spec.to_dict(), sort_keys=True, separators=(",", ":"))


def spec_from_canonical(text: str) -> CompressionSpec | None:
    data = json.loads(text)
    return None if data is None else CompressionSpec.from_dict(data)


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
    return method_class(method).reads_text()


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
        raise ConfigError(field, f"must be a method name (string), got {type(value).__name__} {quote(value)}")
    if value == OFF:
        return value
    if is_connector_method(value):
        if not counts_of(connectors, value):
            raise ConfigError(field, f"{value!r} is a trained connector: the server must list its files in "
                                     f"--mm-processor-kwargs {CONNECTORS_KEY}")
        return value
    if value not in available_methods():
        served = [OFF, *servable_methods(), *sorted({method for method, _ in connectors})]
        raise ConfigError(field, f"unknown method {quote(value)}; available: {', '.join(served)}")
    reason = _unservable_reason(value)
    if reason:
        raise ConfigError(field, f"method {value!r} cannot be served: {reason}")
    return value


def _check_budget(value: object, field: str, *, allow_auto: bool = True) -> int | str:
    if value == AUTO and allow_auto:
        return AUTO
    words = f"an integer token count in [1, {MAX_BUDGET}]" + (f" or {AUTO!r}" if allow_auto else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"must be {words}, got {type(value).__name__} {quote(value)}")
    if not 1 <= value <= MAX_BUDGET:
        raise ConfigError(field, f"must be {words}, got {quote(value)}")
    return value


def _check_ratio(value: object, field: str) -> float:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not (isinstance(value, int) or math.isfinite(value)) or not 0 < value <= 1:
        raise ConfigError(field, f"must be a number in (0, 1], the share of each item's tokens to keep, got "
                                 f"{type(value).__name__} {quote(value)}")
    return float(value) + 0.0


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
    """``method``'s knobs that differ from their defaults, canonical and sorted (unknown knob or bad value: error
    naming it): leaving a knob out and giving its default are the same setting."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(field, f"must be an object of {method!r} knobs, got {type(value).__name__} {quote(value)}")
    if not all(isinstance(key, str) for key in value):
        raise ConfigError(field, "knob names must be strings")
    try:
        instance = get_method(method, **value)
    except (ValueError, TypeError) as error:
        raise ConfigError(field, str(error)) from None
    defaults = type(instance)().knobs()
    return tuple(sorted((name, v) for name, v in instance.knobs().items() if v != defaults[name]))


def _check_no_options(method: str, value: object, field: str) -> None:
    if value is not None and value != {}:
        raise ConfigError(field, f"{method!r} takes no options, got {type(value).__name__} {quote(value)}")


def _check_keys(kwargs: Mapping[str, object], where: str, known: tuple[str, ...] = PLUGIN_KEYS) -> None:
    for engine_only in ENGINE_ONLY_KEYS:
        if engine_only in kwargs and engine_only not in known:
            raise ConfigError(f"{where}.{engine_only}", "is set by the server (engine-wide), not by requests")
    unknown = sorted(set(plugin_keys_in(kwargs)) - set(known))
    if unknown:
        raise ConfigError(f"{where}.{quote(unknown[0])[1:-1]}", f"unknown tokcomp setting; known: {', '.join(known)}")


@dataclass(frozen=True)
class Limits:
    """What clients may choose (engine-wide); ``None`` leaves that choice open.

    ``methods`` (``tokcomp_allowed_methods``): the methods a request may name; ``budget`` / ``ratio``
    (``tokcomp_budget_range`` / ``tokcomp_ratio_range``): inclusive ranges for the counts and shares a request gives
    (``auto`` is a count only the server may choose when a budget range is set); ``allow_off``
    (``tokcomp_allow_off``): whether a request may switch compression off with ``none``. The server's own settings
    must lie within them."""

    methods: tuple[str, ...] | None = None
    budget: tuple[int, int] | None = None
    ratio: tuple[float, float] | None = None
    allow_off: bool = True

    @classmethod
    def parse(cls, engine_kwargs: Mapping[str, object], connectors: Mapping[tuple[str, int], Connector]) -> Limits:
        where = "mm_processor_kwargs"
        methods = engine_kwargs.get(ALLOWED_METHODS_KEY)
        if methods is not None:
            field = f"{where}.{ALLOWED_METHODS_KEY}"
            if isinstance(methods, str) or not isinstance(methods, list | tuple) or not methods:
                raise ConfigError(field, f"must be a non-empty list of method names, got {quote(methods)}")
            for index, name in enumerate(methods):
                if _check_method(name, f"{field}[{index}]", connectors) == OFF:
                    raise ConfigError(f"{field}[{index}]", f"'none' is not a method; {ALLOW_OFF_KEY} decides whether "
                                                           "clients may switch compression off")
            methods = tuple(sorted(set(methods)))
        budget = cls._range(engine_kwargs.get(BUDGET_RANGE_KEY), f"{where}.{BUDGET_RANGE_KEY}",
                            lambda v, f: _check_budget(v, f, allow_auto=False))
        ratio = cls._range(engine_kwargs.get(RATIO_RANGE_KEY), f"{where}.{RATIO_RANGE_KEY}", _check_ratio)
        allow_off = engine_kwargs.get(ALLOW_OFF_KEY, True)
        if not isinstance(allow_off, bool):
            raise ConfigError(f"{where}.{ALLOW_OFF_KEY}", f"must be true or false, got {quote(allow_off)}")
        return cls(methods, budget, ratio, allow_off)

    @staticmethod
    def _range(bounds: object, field: str, check) -> tuple | None:  # noqa: ANN001
        if bounds is None:
            return None
        if isinstance(bounds, str) or not isinstance(bounds, list | tuple) or len(bounds) != 2:
            raise ConfigError(field, f"must be a [low, high] pair, got {quote(bounds)}")
        low, high = (check(bound, f"{field}[{index}]") for index, bound in enumerate(bounds))
        if low > high:
            raise ConfigError(field, f"low {low} is above high {high}")
        return low, high

    def check_method(self, method: str, field: str) -> None:
        if method == OFF:
            if not self.allow_off:
                raise ConfigError(field, f"this server does not let requests switch compression off "
                                         f"({ALLOW_OFF_KEY} is false)")
        elif self.methods is not None and method not in self.methods:
            raise ConfigError(field, f"method {method!r} is not allowed on this server; {ALLOWED_METHODS_KEY}: "
                                     f"{', '.join(self.methods)}")

    def check_amount(self, amount: tuple[int | str | None, float | None], where: str) -> None:
        budget, ratio = amount
        if budget is not None and self.budget is not None:
            low, high = self.budget
            if budget == AUTO or not low <= budget <= high:
                raise ConfigError(f"{where}.{BUDGET_KEY}", f"{budget!r} is outside this server's limit "
                                                           f"{BUDGET_RANGE_KEY} [{low}, {high}]")
        if ratio is not None and self.ratio is not None:
            low, high = self.ratio
            if not low <= ratio <= high:
                raise ConfigError(f"{where}.{RATIO_KEY}", f"{ratio!r} is outside this server's limit "
                                                          f"{RATIO_RANGE_KEY} [{low}, {high}]")


def engine_limits(engine_kwargs: Mapping[str, object] | None) -> Limits:
    """The client limits the server sets, checked; no limits if none."""
    engine_kwargs = plugin_keys_in(engine_kwargs)
    return Limits.parse(engine_kwargs, engine_connectors(engine_kwargs))


def _connector_spec(
    method: str, amount: tuple[int | str | None, float | None] | None, options: object,
    connectors: Mapping[tuple[str, int], Connector], where: str,
) -> CompressionSpec:
    """A connector's spec: its count is one of the listed connectors' (the only one when none is given)."""
    counts = counts_of(connectors, method)
    _check_no_options(f"trained connector {method}", options, f"{where}.{OPTIONS_KEY}")
    budget, ratio = amount if amount is not None else (None, None)
    if ratio is not None:
        raise ConfigError(f"{where}.{RATIO_KEY}", f"trained connector {method!r} has fixed counts: give "
                                                  f"{BUDGET_KEY} ({', '.join(map(str, counts))})")
    if budget is None and len(counts) == 1:
        budget = counts[0]
    if budget not in counts:
        raise ConfigError(f"{where}.{BUDGET_KEY}", f"trained connector {method!r} is loaded for "
                                                   f"{', '.join(map(str, counts))} tokens, got {quote(budget)}")
    return CompressionSpec(method=method, budget=budget)


def _engine_method(kwargs: Mapping[str, object]) -> object | None:
    """The engine's method as given, :data:`DEFAULT_METHOD` when only a budget or ratio is given, else None."""
    if METHOD_KEY in kwargs:
        return kwargs[METHOD_KEY]
    if BUDGET_KEY in kwargs or RATIO_KEY in kwargs:
        return DEFAULT_METHOD
    return None


def parse_engine_config(mm_processor_kwargs: Mapping[str, object] | None) -> CompressionSpec | None:
    """Engine-wide spec from ``--mm-processor-kwargs``; ``None`` means no compression by default.

    Checks every engine-wide value, the client limits included, and that the server's own settings lie within
    those limits."""
    where = "mm_processor_kwargs"
    kwargs = plugin_keys_in(mm_processor_kwargs)
    _check_keys(kwargs, where, ENGINE_KEYS)
    connectors = engine_connectors(kwargs)
    limits = Limits.parse(kwargs, connectors)
    spec = _parse_engine_spec(kwargs, connectors, where)
    method = OFF if spec is None else spec.method
    try:
        limits.check_method(method, f"{where}.{METHOD_KEY}")
        if spec is not None:
            limits.check_amount((spec.budget, spec.ratio), where)
    except ConfigError as error:
        raise ConfigError(error.field, "the server's own setting is outside its client limits: "
                                       f"{str(error).split(': ', 1)[1]}") from None
    return spec


def _parse_engine_spec(kwargs: Mapping[str, object], connectors: Mapping[tuple[str, int], Connector],
                       where: str) -> CompressionSpec | None:
    if not set(kwargs) - set(ENGINE_ONLY_KEYS):
        return None  # nothing, or connectors / limits for requests that opt in
    method = _engine_method(kwargs)
    if method is None:
        given = next(k for k in PLUGIN_KEYS if k in kwargs)
        raise ConfigError(f"{where}.{METHOD_KEY}", f"is required when {given} is set")
    method = _check_method(method, f"{where}.{METHOD_KEY}", connectors)
    if is_connector_method(method):
        return _connector_spec(method, _check_amount(kwargs, where), kwargs.get(OPTIONS_KEY), connectors, where)
    budget, ratio = _check_amount(kwargs, where) or (DEFAULT_BUDGET, None)
    if method == OFF:
        _check_no_options(OFF, kwargs.get(OPTIONS_KEY), f"{where}.{OPTIONS_KEY}")
        return None
    options = _check_options(method, kwargs.get(OPTIONS_KEY), f"{where}.{OPTIONS_KEY}")
    return CompressionSpec(method=method, budget=budget, options=options, ratio=ratio)


def effective_config(spec: CompressionSpec | None, engine_kwargs: Mapping[str, object] | None) -> str:
    """The startup line's words for a parsed engine config: what is compressed, and what clients may change."""
    keys = plugin_keys_in(engine_kwargs)
    if spec is None:
        text = "compression off by default; requests may opt in with tokcomp_method or tokcomp_budget"
    else:
        amount = f"ratio={spec.ratio}" if spec.ratio is not None else f"budget={spec.budget}"
        default = " (the default method: no tokcomp_method given)" if METHOD_KEY not in keys else ""
        text = f"compressing images with method={spec.method}{default} {amount}"
    limits = engine_limits(keys)
    if limits != Limits():
        bounds = [f"methods {', '.join(limits.methods)}" if limits.methods else "",
                  f"budget {list(limits.budget)}" if limits.budget else "",
                  f"ratio {list(limits.ratio)}" if limits.ratio else "",
                  "" if limits.allow_off else "no opt-out"]
        text += "; clients limited to " + "; ".join(bound for bound in bounds if bound)
    return text


def is_engine_configured(mm_processor_kwargs: Mapping[str, object] | None) -> bool:
    """True when the server owner put any tokcomp key in ``--mm-processor-kwargs`` (even ``none``)."""
    return bool(plugin_keys_in(mm_processor_kwargs))


def resolve_request(
    engine_kwargs: Mapping[str, object] | None, request_kwargs: Mapping[str, object] | None
) -> CompressionSpec | None:
    """The spec for one request: request values override the engine's, ``none`` switches off; every value the
    request gives is checked against its type, bounds and the server's :class:`Limits`."""
    where = "mm_processor_kwargs"
    request = plugin_keys_in(request_kwargs)
    _check_keys(request, where)
    engine_keys = plugin_keys_in(engine_kwargs)
    connectors = engine_connectors(engine_keys)
    limits = Limits.parse(engine_keys, connectors)
    engine_method = _engine_method(engine_keys)
    request_amount = _check_amount(request, where)
    if request_amount is not None:
        limits.check_amount(request_amount, where)
    if METHOD_KEY in request:
        method = _check_method(request[METHOD_KEY], f"{where}.{METHOD_KEY}", connectors)
        limits.check_method(method, f"{where}.{METHOD_KEY}")
    elif request_amount is not None and engine_method in (None, OFF):
        method = DEFAULT_METHOD  # a request that gives a budget asks for compression
        limits.check_method(method, f"{where}.{METHOD_KEY}")
    else:
        method = engine_method
    if isinstance(method, str) and is_connector_method(method):
        # The engine's count belongs to the engine's method; another method's 64 is no connector's count.
        amount = request_amount or (_check_amount(engine_keys, where) if method == engine_method else None)
        return _connector_spec(method, amount, request.get(OPTIONS_KEY), connectors, where)
    # A request's count or share replaces the engine's (which were validated at startup: checking them again
    # cannot fail, it only turns them into the same (budget, ratio) pair).
    budget, ratio = request_amount or _check_amount(engine_keys, where) or (DEFAULT_BUDGET, None)
    if method is None:
        if request:
            given = ", ".join(sorted(request))
            raise ConfigError(
                f"{where}.{METHOD_KEY}", f"is required: the server has no default method (got only {given})"
            )
        return None
    if method == OFF:
        _check_no_options(OFF, request.get(OPTIONS_KEY), f"{where}.{OPTIONS_KEY}")
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
