"""The configuration spec: what is accepted, and that errors name the field."""

import pytest

from vllm_tokcomp.config import (
    DEFAULT_METHOD,
    CompressionSpec,
    ConfigError,
    parse_engine_config,
    resolve_request,
    servable_methods,
)


def test_no_plugin_keys_means_inert():
    assert parse_engine_config(None) is None
    assert parse_engine_config({"do_resize": True}) is None
    assert resolve_request({}, {}) is None


def test_engine_spec_and_default_budget():
    assert parse_engine_config({"tokcomp_method": "uniform", "tokcomp_budget": 32}) == CompressionSpec("uniform", 32)
    assert parse_engine_config({"tokcomp_method": "uniform"}) == CompressionSpec("uniform", 64)
    assert parse_engine_config({"tokcomp_method": "none", "tokcomp_budget": 8}) is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tokcomp_method": "bogus"}, "mm_processor_kwargs.tokcomp_method"),
        ({"tokcomp_method": 3}, "mm_processor_kwargs.tokcomp_method"),
        ({"tokcomp_method": "uniform", "tokcomp_budget": 0}, "mm_processor_kwargs.tokcomp_budget"),
        ({"tokcomp_method": "uniform", "tokcomp_budget": -4}, "mm_processor_kwargs.tokcomp_budget"),
        ({"tokcomp_method": "uniform", "tokcomp_budget": 1.5}, "mm_processor_kwargs.tokcomp_budget"),
        ({"tokcomp_method": "uniform", "tokcomp_budget": "64"}, "mm_processor_kwargs.tokcomp_budget"),
        ({"tokcomp_method": "uniform", "tokcomp_budget": True}, "mm_processor_kwargs.tokcomp_budget"),
        ({"tokcomp_options": {"window": 2}}, "mm_processor_kwargs.tokcomp_method"),
        ({"tokcomp_method": "uniform", "tokcomp_budget": 2**20 + 1}, "mm_processor_kwargs.tokcomp_budget"),
        ({"tokcomp_method": "uniform", "tokcomp_budget": 10**1100}, "mm_processor_kwargs.tokcomp_budget"),
        ({"tokcomp_method": "none", "tokcomp_options": {"garbage": 1}}, "mm_processor_kwargs.tokcomp_options"),
        ({"tokcomp_method": "random", "tokcomp_options": {"seed": 2**64}}, "mm_processor_kwargs.tokcomp_options"),
        ({"tokcomp_method": "uniform", "tokcomp_rate": 0.5}, "mm_processor_kwargs.tokcomp_rate"),
        ({"tokcomp_method": "uniform", "tokcomp_ratio": 0}, "mm_processor_kwargs.tokcomp_ratio"),
        ({"tokcomp_method": "uniform", "tokcomp_ratio": 1.5}, "mm_processor_kwargs.tokcomp_ratio"),
        ({"tokcomp_method": "uniform", "tokcomp_ratio": "0.5"}, "mm_processor_kwargs.tokcomp_ratio"),
        ({"tokcomp_method": "uniform", "tokcomp_ratio": float("nan")}, "mm_processor_kwargs.tokcomp_ratio"),
        ({"tokcomp_method": "uniform", "tokcomp_ratio": True}, "mm_processor_kwargs.tokcomp_ratio"),
        ({"tokcomp_method": "uniform", "tokcomp_ratio": 0.5, "tokcomp_budget": 8}, "mm_processor_kwargs.tokcomp_ratio"),
    ],
)
def test_bad_engine_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as error:
        parse_engine_config(kwargs)
    assert error.value.field == field
    assert field in str(error.value)


def test_request_overrides_engine():
    engine = {"tokcomp_method": "uniform", "tokcomp_budget": 64}
    assert resolve_request(engine, {}) == CompressionSpec("uniform", 64)
    assert resolve_request(engine, {"tokcomp_budget": 16}) == CompressionSpec("uniform", 16)
    assert resolve_request(engine, {"tokcomp_method": "cls_topk"}) == CompressionSpec("cls_topk", 64)
    assert resolve_request(engine, {"tokcomp_method": "none"}) is None
    # A request may opt in on a server that compresses nothing by default.
    assert resolve_request({}, {"tokcomp_method": "uniform", "tokcomp_budget": 8}) == CompressionSpec("uniform", 8)


def test_a_budget_without_a_method_compresses_with_the_default_method():
    assert DEFAULT_METHOD in servable_methods()
    assert parse_engine_config({"tokcomp_budget": 32}) == CompressionSpec(DEFAULT_METHOD, 32)
    assert parse_engine_config({"tokcomp_ratio": 0.5}) == CompressionSpec(DEFAULT_METHOD, None, ratio=0.5)
    assert resolve_request({}, {"tokcomp_budget": 8}) == CompressionSpec(DEFAULT_METHOD, 8)
    # `tokcomp serve` without --method configures "none": a request's budget still asks for compression ...
    assert resolve_request({"tokcomp_method": "none"}, {"tokcomp_ratio": 0.25}) == CompressionSpec(
        DEFAULT_METHOD, None, ratio=0.25)
    # ... unless it says "none" itself, and a server's own method is kept.
    assert resolve_request({"tokcomp_method": "none"}, {"tokcomp_method": "none", "tokcomp_budget": 8}) is None
    assert resolve_request({"tokcomp_method": "pool"}, {"tokcomp_budget": 8}) == CompressionSpec("pool", 8)
    with pytest.raises(ConfigError, match="tokcomp_method"):
        resolve_request({}, {"tokcomp_options": {"seed": 3}})


@pytest.mark.parametrize("budget", [0, -1, 2.5, "8", None, [8]])
def test_bad_request_budget(budget):
    with pytest.raises(ConfigError, match="tokcomp_budget"):
        resolve_request({"tokcomp_method": "uniform"}, {"tokcomp_budget": budget})


def test_servable_methods_have_fixed_budget_forms():
    names = servable_methods()
    assert {"uniform", "cls_topk"} <= set(names)


def test_options_are_validated_and_merged():
    engine = {"tokcomp_method": "mustdrop", "tokcomp_options": {"stage1": False}}
    spec = resolve_request(engine, {"tokcomp_options": {"threshold": 0.9}})
    assert spec == CompressionSpec("mustdrop", 64, (("stage1", False), ("threshold", 0.9)))
    # another method per request starts from that method's defaults
    assert resolve_request(engine, {"tokcomp_method": "tome"}) == CompressionSpec("tome", 64)
    assert CompressionSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "options", [{"threshold": 7.0}, {"no_such_knob": 1}, "stage1=false", {"stage2": "yes"}]
)
def test_bad_options_name_the_field(options):
    with pytest.raises(ConfigError, match="tokcomp_options"):
        parse_engine_config({"tokcomp_method": "mustdrop", "tokcomp_options": options})
    with pytest.raises(ConfigError, match="tokcomp_options"):
        resolve_request({"tokcomp_method": "mustdrop"}, {"tokcomp_options": options})


def test_settings_row_round_trips():
    from vllm_tokcomp.integration import settings

    spec = CompressionSpec("mustdrop", 48, (("stage1", False),))
    assert settings.decode(settings.encode(spec)) == spec
    assert settings.decode(settings.encode(None)) is None


def test_ratio_is_a_share_of_each_item():
    spec = parse_engine_config({"tokcomp_method": "pool", "tokcomp_ratio": 0.25})
    assert spec == CompressionSpec("pool", None, ratio=0.25)
    # ceil(ratio * N), at least one token, exact for decimal ratios (0.1 * 30 is 3.0000000000000004)
    assert [spec.for_item(n).budget for n in (576, 144, 128, 3, 1)] == [144, 36, 32, 1, 1]
    assert CompressionSpec("pool", None, ratio=0.1).for_item(30).budget == 3
    assert CompressionSpec("pool", None, ratio=1).for_item(77).budget == 77
    assert spec.for_item(576).ratio is None
    assert CompressionSpec("pool", 64).for_item(576) == CompressionSpec("pool", 64)
    # The settings row round-trips it, and rows without a ratio keep their old bytes (same multimodal hash).
    assert CompressionSpec.from_dict(spec.to_dict()) == spec
    assert "tokcomp_ratio" not in CompressionSpec("pool", 64).to_dict()


def test_request_count_and_share_replace_each_other():
    by_count = {"tokcomp_method": "pool", "tokcomp_budget": 64}
    by_share = {"tokcomp_method": "pool", "tokcomp_ratio": 0.5}
    assert resolve_request(by_count, {"tokcomp_ratio": 0.25}) == CompressionSpec("pool", None, ratio=0.25)
    assert resolve_request(by_share, {"tokcomp_budget": 16}) == CompressionSpec("pool", 16)
    assert resolve_request(by_share, {}) == CompressionSpec("pool", None, ratio=0.5)
    assert resolve_request(by_share, {"tokcomp_method": "uniform"}) == CompressionSpec("uniform", None, ratio=0.5)
    with pytest.raises(ConfigError) as error:
        resolve_request(by_count, {"tokcomp_ratio": 0.5, "tokcomp_budget": 3})
    assert error.value.field == "mm_processor_kwargs.tokcomp_ratio"
    with pytest.raises(ConfigError) as error:
        resolve_request(by_count, {"tokcomp_ratio": 2})
    assert error.value.field == "mm_processor_kwargs.tokcomp_ratio"


LIMITED = {"tokcomp_method": "tome", "tokcomp_budget": 64, "tokcomp_allowed_methods": ["tome", "pool"],
           "tokcomp_budget_range": [16, 128], "tokcomp_ratio_range": [0.1, 0.5], "tokcomp_allow_off": False}


@pytest.mark.parametrize(
    ("request_kwargs", "field", "limit"),
    [
        ({"tokcomp_method": "cls_topk"}, "mm_processor_kwargs.tokcomp_method", "tokcomp_allowed_methods"),
        ({"tokcomp_method": "none"}, "mm_processor_kwargs.tokcomp_method", "tokcomp_allow_off"),
        ({"tokcomp_budget": 8}, "mm_processor_kwargs.tokcomp_budget", "tokcomp_budget_range"),
        ({"tokcomp_budget": 129}, "mm_processor_kwargs.tokcomp_budget", "tokcomp_budget_range"),
        ({"tokcomp_budget": "auto"}, "mm_processor_kwargs.tokcomp_budget", "tokcomp_budget_range"),
        ({"tokcomp_ratio": 0.75}, "mm_processor_kwargs.tokcomp_ratio", "tokcomp_ratio_range"),
    ],
)
def test_a_request_outside_the_servers_limits_is_refused_naming_the_limit(request_kwargs, field, limit):
    with pytest.raises(ConfigError) as error:
        resolve_request(LIMITED, request_kwargs)
    assert error.value.field == field
    assert limit in str(error.value)


def test_requests_inside_the_limits_pass():
    assert resolve_request(LIMITED, {}) == CompressionSpec("tome", 64)
    assert resolve_request(LIMITED, {"tokcomp_method": "pool", "tokcomp_budget": 16}) == CompressionSpec("pool", 16)
    assert resolve_request(LIMITED, {"tokcomp_ratio": 0.5}) == CompressionSpec("tome", None, ratio=0.5)


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"tokcomp_allowed_methods": ["tome"]}, "mm_processor_kwargs.tokcomp_method"),  # not the server's own method
        ({"tokcomp_budget_range": [8, 32]}, "mm_processor_kwargs.tokcomp_budget"),  # nor its own budget
        ({"tokcomp_allowed_methods": []}, "mm_processor_kwargs.tokcomp_allowed_methods"),
        ({"tokcomp_allowed_methods": "pool"}, "mm_processor_kwargs.tokcomp_allowed_methods"),
        ({"tokcomp_allowed_methods": ["pool", "bogus"]}, "mm_processor_kwargs.tokcomp_allowed_methods[1]"),
        ({"tokcomp_allowed_methods": ["none"]}, "mm_processor_kwargs.tokcomp_allowed_methods[0]"),
        ({"tokcomp_budget_range": [64, 16]}, "mm_processor_kwargs.tokcomp_budget_range"),
        ({"tokcomp_budget_range": [1, "auto"]}, "mm_processor_kwargs.tokcomp_budget_range[1]"),
        ({"tokcomp_budget_range": {"low": 1}}, "mm_processor_kwargs.tokcomp_budget_range"),
        ({"tokcomp_ratio_range": [0, 1]}, "mm_processor_kwargs.tokcomp_ratio_range[0]"),
        ({"tokcomp_allow_off": "no"}, "mm_processor_kwargs.tokcomp_allow_off"),
        ({"tokcomp_max_budget": 3}, "mm_processor_kwargs.tokcomp_max_budget"),
    ],
)
def test_bad_limits_fail_at_startup_naming_the_field(limits, field):
    with pytest.raises(ConfigError) as error:
        parse_engine_config({"tokcomp_method": "pool", "tokcomp_budget": 64, **limits})
    assert error.value.field == field


def test_limits_are_engine_wide_only_and_off_by_default_needs_allow_off():
    with pytest.raises(ConfigError) as error:
        resolve_request({"tokcomp_method": "tome"}, {"tokcomp_allow_off": True})
    assert error.value.field == "mm_processor_kwargs.tokcomp_allow_off"
    with pytest.raises(ConfigError, match="allow_off"):
        parse_engine_config({"tokcomp_method": "none", "tokcomp_allow_off": False})


def test_error_messages_quote_a_short_prefix_of_the_value():
    for request in ({"tokcomp_method": "x" * 100_000}, {"tokcomp_method": "mustdrop",
                                                         "tokcomp_options": {"auto_estimator": "y" * 100_000}},
                    {"tokcomp_method": "tome", "tokcomp_options": {"z" * 100_000: 1}}, {"tokcomp_budget": 10**1000}):
        with pytest.raises(ConfigError) as error:
            resolve_request({}, request)
        assert len(str(error.value)) < 400


def test_startup_line_says_the_default_method_and_the_limits():
    from vllm_tokcomp.config import effective_config

    kwargs = {"tokcomp_budget": 32, "tokcomp_budget_range": [16, 64], "tokcomp_allow_off": False}
    line = effective_config(parse_engine_config(kwargs), kwargs)
    assert line == (f"compressing images with method={DEFAULT_METHOD} (the default method: no tokcomp_method given) "
                    "budget=32; clients limited to budget [16, 64]; no opt-out")


def test_documented_knob_table_is_the_declared_one():
    """docs/configuration.md's knob table is generated from the declarations (``python -c 'from
    vllm_tokcomp.methods.registry import knob_table; print(knob_table())'``), so it cannot drift from what the server
    accepts."""
    from pathlib import Path

    from vllm_tokcomp.methods.registry import knob_table

    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    start, end = page.index("<!-- knobs:start -->"), page.index("<!-- knobs:end -->")
    assert page[start:end].split("\n", 1)[1].strip() == knob_table()


def test_readme_support_matrix_is_the_declared_one():
    """The README's support matrix is ``integration/support.support_matrix()``, regenerated from the declarations
    (``python -c 'from vllm_tokcomp.integration.support import support_matrix; print(support_matrix())'``)."""
    from pathlib import Path

    from vllm_tokcomp.integration.support import support_matrix

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = readme.index("<!-- support:start -->"), readme.index("<!-- support:end -->")
    assert readme[start:end].split("\n", 1)[1] == support_matrix()
