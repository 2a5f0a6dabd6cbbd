"""Property tests of the request frontier: any JSON value for any tokcomp key either fails the check naming its
field, or resolves to settings that every servable method runs on without raising, to exactly the token count
the placeholders promise; equal settings hash alike in vLLM's multimodal hasher and different ones never do.

The real parts: the config parser, the methods, the settings row and vLLM's own ``MultiModalHasher``; the server
is exercised by ``tests/e2e/test_request_fuzz.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_tokcomp.auto_budget import ESTIMATORS, adaptive_budget
from vllm_tokcomp.config import (
    ALLOW_OFF_KEY,
    ALLOWED_METHODS_KEY,
    AUTO,
    BUDGET_KEY,
    CANONICAL_KEY,
    DEFAULT_METHOD,
    ENGINE_ONLY_KEYS,
    MAX_BUDGET,
    METHOD_KEY,
    OPTIONS_KEY,
    PLUGIN_KEYS,
    RATIO_KEY,
    CompressionSpec,
    ConfigError,
    canonical_spec,
    parse_engine_config,
    resolve_request,
    servable_methods,
    spec_from_canonical,
)
from vllm_tokcomp.integration import settings as settings_row
from vllm_tokcomp.integration.requests import canonical_kwargs
from vllm_tokcomp.integration.text_signals import with_text_fallback
from vllm_tokcomp.methods import TokenAssignment, VisualTokens, get_method, method_class
from vllm_tokcomp.methods.knobs import QUOTE_LIMIT, KnobSpec, knob_specs, quote

METHODS = servable_methods()
KNOB_NAMES = sorted({name for method in METHODS for name in knob_specs(method_class(method))})
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
RUNS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# Values a client can send in JSON (Python's json module also parses NaN, Infinity and 1e309 -> inf), plus the
# edges that crashed the server before: 2**64 seeds, 2**63 windows, 1000-digit ints, denormals, -0.0.
EDGES = [2**63 - 1, 2**63, 2**64, -(2**63), 10**30, 10**1000, -0.0, 0.0, 5e-324, -5e-324, 1e308, float("inf"),
         float("-inf"), float("nan"), True, False, None, "", "auto", "none", "x" * 100_000, "\u00e9\u0000\U0001f600"]
scalars = st.one_of(
    st.sampled_from(EDGES), st.none(), st.booleans(), st.integers(), st.integers(-3, 700),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.text(max_size=20),
    st.sampled_from([*METHODS, "none", "auto", "c_abstractor", *KNOB_NAMES]),
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.one_of(st.sampled_from(KNOB_NAMES), st.text(max_size=10)), inner, max_size=3), max_leaves=6)
options = st.dictionaries(st.one_of(st.sampled_from(KNOB_NAMES), st.text(max_size=8)), json_values, max_size=3)
request_kwargs = st.fixed_dictionaries({}, optional={
    METHOD_KEY: st.one_of(st.sampled_from([*METHODS, "none"]), json_values),
    BUDGET_KEY: st.one_of(st.integers(1, 700), st.just(AUTO), json_values),
    RATIO_KEY: st.one_of(st.floats(0, 1), json_values),
    OPTIONS_KEY: st.one_of(options, json_values),
    "tokcomp_\u00e9": json_values,
    ALLOWED_METHODS_KEY: json_values,  # engine-only: refused from a request
    ALLOW_OFF_KEY: json_values,
})
ENGINES = [{}, {METHOD_KEY: "none"}, {METHOD_KEY: "tome", BUDGET_KEY: 64}, {METHOD_KEY: "mustdrop", RATIO_KEY: 0.25},
           {METHOD_KEY: "pool", "tokcomp_allowed_methods": ["pool", "tome"], "tokcomp_budget_range": [16, 128],
            "tokcomp_allow_off": False}]


def _grid_tokens(grid: tuple[int, ...], seed: int) -> VisualTokens:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(grid)
    cls = torch.rand(n, generator=g)
    return VisualTokens(
        features=torch.randn(n, 16, generator=g), grid=grid, cls_attention=cls / cls.sum(),
        layer_cls_attention=torch.softmax(torch.randn(2, n, generator=g), dim=1),
        keys=torch.randn(n, 8, generator=g), text_embeds=torch.randn(3, 16, generator=g),
        text_attention=torch.softmax(torch.randn(3, n, generator=g), dim=1),
    )


TOKENS = {grid: _grid_tokens(grid, seed) for seed, grid in enumerate([(24, 24), (12, 12), (2, 3), (1, 1), (3, 5, 4)])}


def _run(spec: CompressionSpec, tokens: VisualTokens, *, with_text: bool) -> None:
    """What the model does with a resolved spec: exactly the placeholders' count, a well-formed assignment."""
    spec = spec.for_item(tokens.num_tokens)
    expected = settings_row.kept_tokens(settings_row.decode(settings_row.encode(spec)), tokens.num_tokens)
    if not with_text:
        tokens = VisualTokens(features=tokens.features, grid=tokens.grid, cls_attention=tokens.cls_attention,
                              layer_cls_attention=tokens.layer_cls_attention, keys=tokens.keys)
    method = get_method(spec.method, **dict(spec.options))
    result = method(with_text_fallback(spec.method, tokens), spec.budget)
    assert result.features.shape == (expected, tokens.features.shape[1])
    assert torch.isfinite(result.features).all()
    assert isinstance(result.assignment, TokenAssignment) and result.assignment.num_outputs == expected


@FUZZ
@given(engine=st.sampled_from(ENGINES), request=request_kwargs)
def test_any_request_is_refused_naming_its_field_or_runs_to_the_promised_count(engine, request):
    try:
        spec = resolve_request(engine, request)
    except ConfigError as error:
        assert error.field.startswith("mm_processor_kwargs.")
        assert error.field.split(".")[1].split("[")[0] in (*PLUGIN_KEYS, *ENGINE_ONLY_KEYS, "tokcomp_\u00e9")
        assert len(str(error)) < 600, "an error quotes at most a short prefix of the value"
        return
    if spec is None:
        return
    assert spec.method in METHODS
    assert spec_from_canonical(canonical_spec(spec)) == spec
    if spec.budget == AUTO:
        return  # resolved from the pixels by the processor: see test_auto_budget_is_a_count_for_any_knobs
    _run(spec, TOKENS[(12, 12)], with_text=True)


@FUZZ
@given(kwargs=request_kwargs)
def test_any_engine_config_is_refused_naming_its_field_or_parses(kwargs):
    try:
        spec = parse_engine_config(kwargs)
    except ConfigError as error:
        assert error.field.startswith("mm_processor_kwargs.")
        assert len(str(error)) < 600
        return
    assert spec is None or spec.method in METHODS


def _valid_knob(spec: KnobSpec) -> st.SearchStrategy:
    if spec.kind is bool:
        return st.booleans()
    if spec.kind is str:
        return st.sampled_from(spec.choices)
    if spec.kind is int:
        return st.one_of(st.sampled_from([int(spec.low), int(spec.high)]), st.integers(int(spec.low), int(spec.high)))
    edges = [spec.low, spec.high, -0.0 if spec.low <= 0 <= spec.high else spec.low]
    edges += [x for x in (5e-324, 1e-300, 1 - 1e-16) if spec.low <= x <= spec.high]
    return st.one_of(st.sampled_from(edges), st.floats(spec.low, spec.high))


@st.composite
def valid_settings(draw: st.DrawFn, method: str) -> CompressionSpec:
    knobs = {name: draw(_valid_knob(spec)) for name, spec in knob_specs(method_class(method)).items()
             if draw(st.booleans())}
    request = {METHOD_KEY: method, OPTIONS_KEY: knobs}
    if draw(st.booleans()):
        request[BUDGET_KEY] = draw(st.one_of(st.sampled_from([1, 2, 575, 576, 577, MAX_BUDGET]), st.integers(1, 600)))
    else:
        ratios = st.one_of(st.sampled_from([5e-324, 1e-9, 0.5, 1.0, 1]), st.floats(0, 1, exclude_min=True))
        request[RATIO_KEY] = draw(ratios)
    spec = resolve_request({}, request)
    assert spec is not None, "every value drawn inside the declared bounds is accepted"
    return spec


@pytest.mark.parametrize("method", METHODS)
@RUNS
@given(data=st.data())
def test_every_setting_inside_the_bounds_runs_on_every_grid(method, data):
    """The defence in depth for the engine: vLLM has no per-request failure path inside the model, so whatever
    passes the check must not raise there (any grid, with and without the prompt's text)."""
    spec = data.draw(valid_settings(method))
    grid = data.draw(st.sampled_from(sorted(TOKENS)))
    _run(spec, TOKENS[grid], with_text=data.draw(st.booleans()))


@RUNS
@given(estimator=st.sampled_from(ESTIMATORS), threshold=_valid_knob(knob_specs(method_class("mustdrop"))["threshold"]),
       window=_valid_knob(knob_specs(method_class("mustdrop"))["window"]), seed=st.integers(0, 3))
def test_auto_budget_is_a_count_for_any_knobs(estimator, threshold, window, seed):
    """``tokcomp_budget: "auto"`` turns pixels into a count with the request's MustDrop knobs (LLaVA path)."""
    pixels = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(seed))
    budget = adaptive_budget(pixels, 576, patch=2, estimator=estimator, threshold=threshold, window=window)
    assert isinstance(budget, int) and 1 <= budget <= 576


def _longest(spec: KnobSpec) -> object:
    if spec.kind is str:
        return max(spec.choices, key=len)
    if spec.kind is bool:
        return False
    if spec.kind is int:
        return int(spec.low) if len(str(int(spec.low))) > len(str(int(spec.high))) else int(spec.high)
    candidates = [-2.2250738585072014e-308, 2.2250738585072014e-308, math.nextafter(spec.low, math.inf),
                  math.nextafter(spec.high, -math.inf), spec.low + (spec.high - spec.low) / 3]
    return max((x for x in candidates if spec.low <= x <= spec.high), key=lambda x: len(repr(x)))


@pytest.mark.parametrize("method", METHODS)
def test_the_longest_settings_of_every_method_fit_the_settings_row(method):
    knobs = {name: _longest(spec) for name, spec in knob_specs(method_class(method)).items()}
    spec = resolve_request({}, {METHOD_KEY: method, OPTIONS_KEY: knobs, RATIO_KEY: 2.2250738585072014e-308})
    assert len(json.dumps(spec.to_dict(), sort_keys=True).encode()) < settings_row.SETTINGS_BYTES // 2
    assert settings_row.decode(settings_row.encode(spec)) == spec


def test_quote_cuts_long_values():
    assert quote("x" * 100_000).endswith("(100002 characters)")
    assert len(quote("x" * 100_000)) < QUOTE_LIMIT + 30
    assert quote(3) == "3"


def _vllm_hash(kwargs: dict) -> str:
    from vllm.multimodal.hasher import MultiModalHasher

    return MultiModalHasher.hash_kwargs("sha256", model_id="m", image=b"same image", mm_processor_kwargs=kwargs)


def _cache_key(engine: dict, request: dict) -> str:
    """What the processor hands vLLM's hasher for a request (``CompressedLlavaProcessor.apply``)."""
    return _vllm_hash(dict(canonical_kwargs(request, resolve_request(engine, request), engine_configured=bool(engine))))


# Distinct settings whose raw values vLLM's hasher cannot tell apart (numbers by their bytes, without their type).
COLLIDING = [
    ({RATIO_KEY: 5e-324}, {RATIO_KEY: 1}),
    ({METHOD_KEY: "mustdrop", OPTIONS_KEY: {"threshold": 5e-324}},
     {METHOD_KEY: "mustdrop", OPTIONS_KEY: {"threshold": 1}}),
    ({METHOD_KEY: "mustdrop", OPTIONS_KEY: {"stage1": True}}, {METHOD_KEY: "mustdrop", OPTIONS_KEY: {"stage1": False}}),
    ({METHOD_KEY: "pumer", OPTIONS_KEY: {"prune_share": 0}}, {METHOD_KEY: "pumer", OPTIONS_KEY: {"prune_share": 1}}),
    ({METHOD_KEY: "tome", BUDGET_KEY: 1}, {METHOD_KEY: "tome", RATIO_KEY: 5e-324}),
    ({METHOD_KEY: "tome", BUDGET_KEY: 64}, {METHOD_KEY: "none"}),
]
# The same setting written differently: one cache entry.
EQUAL = [
    ({RATIO_KEY: 1}, {RATIO_KEY: 1.0}),
    ({METHOD_KEY: "mustdrop", OPTIONS_KEY: {"threshold": 0.0}},
     {METHOD_KEY: "mustdrop", OPTIONS_KEY: {"threshold": -0.0}}),
    ({METHOD_KEY: "mustdrop", OPTIONS_KEY: {"window": 2, "stage2": False}},
     {METHOD_KEY: "mustdrop", OPTIONS_KEY: {"stage2": False, "window": 2}}),
    ({METHOD_KEY: "mustdrop", OPTIONS_KEY: {"window": 3}}, {METHOD_KEY: "mustdrop", OPTIONS_KEY: {}}),
    ({METHOD_KEY: "mustdrop", BUDGET_KEY: 64}, {METHOD_KEY: "mustdrop"}),
    ({METHOD_KEY: "tome"}, {}),
]
ENGINE = {METHOD_KEY: "tome", BUDGET_KEY: 64}


@pytest.mark.parametrize(("first", "second"), COLLIDING)
def test_distinct_settings_get_distinct_cache_keys(first, second):
    assert resolve_request(ENGINE, first) != resolve_request(ENGINE, second)
    assert _cache_key(ENGINE, first) != _cache_key(ENGINE, second)


def test_the_raw_values_would_collide_in_vllms_hasher():
    """Why the processor hands vLLM a canonical string: the raw values of the first pairs hash alike."""
    assert _vllm_hash(COLLIDING[0][0]) == _vllm_hash(COLLIDING[0][1])
    assert _vllm_hash(COLLIDING[1][0]) == _vllm_hash(COLLIDING[1][1])


@pytest.mark.parametrize(("first", "second"), EQUAL)
def test_equal_settings_share_one_cache_key(first, second):
    assert _cache_key(ENGINE, first) == _cache_key(ENGINE, second)


def test_unconfigured_server_hashes_a_plain_request_as_vllm_does():
    assert canonical_kwargs({}, None, engine_configured=False) == {}
    assert CANONICAL_KEY in canonical_kwargs({}, None, engine_configured=True)


def test_default_method_is_servable_everywhere():
    from vllm_tokcomp.integration.qwen_routes import SERVED_METHODS

    assert DEFAULT_METHOD in METHODS and DEFAULT_METHOD in SERVED_METHODS
