"""One matrix that every registered method joins: the invariants all compressors share.

A new method is covered as soon as it registers; the only per-method data here are
the bad-knob examples (a method with knobs must list at least one).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil

import pytest
import torch

import vllm_tokcomp.methods as methods_pkg
from conftest import constant_tokens, make_tokens
from vllm_tokcomp.methods import (
    DROPPED,
    VisualTokens,
    available_methods,
    compress_batch,
    get_method,
    method_class,
)
from vllm_tokcomp.methods import builtin as builtin_module

METHODS = available_methods()

# (grid, budget): an easy image setting and a hard one (odd sizes, video grid, odd budget).
SETTINGS = {
    "easy": ((8, 8), 32),
    "hard": ((2, 5, 7), 13),
}

# Per method: knob settings that validate() must reject, and the field each must name.
BAD_KNOBS: dict[str, list[tuple[dict, str]]] = {
    "pool": [({"max_aspect_change": 0.5}, "max_aspect_change")],
    "bilinear": [({"max_aspect_change": float("nan")}, "max_aspect_change")],
    "adjacent": [({"order": "diagonal"}, "order")],
    "mustdrop_s1": [
        ({"threshold": 1.5}, "threshold"),
        ({"window": 0}, "window"),
        ({"key_ratio": -0.1}, "key_ratio"),
    ],
    "mustdrop": [
        ({"threshold": 1.5}, "threshold"),
        ({"window": 0}, "window"),
        ({"global_threshold": -1.0}, "global_threshold"),
        ({"stage2": "yes"}, "stage2"),
    ],
    "mustdrop_s2": [
        ({"global_threshold": -1.0}, "global_threshold"),
        ({"individual_threshold": 2.0}, "individual_threshold"),
        ({"key_ratio": 1.5}, "key_ratio"),
    ],
    "prumerge": [({"iqr_factor": -1.0}, "iqr_factor")],
    "prumerge_plus": [({"iqr_factor": -1.0}, "iqr_factor"), ({"uniform_multiple": -1.0}, "uniform_multiple")],
    "pumer": [({"prune_share": 1.5}, "prune_share")],
    "btp": [({"balance": -0.1}, "balance")],
    "visionzip": [({"dominant_ratio": 1.5}, "dominant_ratio"), ({"contextual_merge": "sum"}, "contextual_merge")],
    "cdpruner": [({"negate_relevance": "yes"}, "negate_relevance")],
    "dart": [({"pivot_image_tokens": -1}, "pivot_image_tokens"), ({"pivot_text_tokens": 1000}, "pivot_text_tokens"),
             ({"pivot_image_tokens": 0}, "pivot_image_tokens")],
    "vispruner": [({"important_ratio": 1.5}, "important_ratio"), ({"step": 0}, "step")],
    "scope": [({"alpha": -1.0}, "alpha"), ({"alpha": float("nan")}, "alpha")],
    "vscan": [({"local_ratio": 1.5}, "local_ratio"), ({"window": 0}, "window"),
              ({"shallow_depth": -0.1}, "shallow_depth")],
    "mmtok": [({"alpha": -1.0}, "alpha"), ({"text_temperature": 0.0}, "text_temperature"),
              ({"vision_temperature": float("inf")}, "vision_temperature")],
    "random": [({"seed": "x"}, "seed")],
    "text_relevance": [({"reduce": "median"}, "reduce")],
}


def run(name: str, tokens: VisualTokens, budget: int, **knobs):
    return get_method(name, **knobs)(tokens, budget)


def setting_params():
    return [pytest.param(name, setting, id=f"{name}-{setting}") for name in METHODS for setting in SETTINGS]


def kept_inputs(result) -> torch.Tensor:
    return result.assignment.destination != DROPPED


@pytest.mark.parametrize(("name", "setting"), setting_params())
def test_exact_count_and_bookkeeping(name, setting):
    grid, budget = SETTINGS[setting]
    tokens = make_tokens(grid, seed=1, sizes=True)
    result = run(name, tokens, budget)
    assignment = result.assignment
    assert result.num_tokens == budget
    assert result.features.shape == (budget, tokens.features.shape[1])
    assert assignment.num_inputs == tokens.num_tokens
    assert assignment.num_outputs == budget
    # every anchor is assigned to its own slot
    assert torch.equal(assignment.destination[assignment.anchor], torch.arange(budget))
    # sizes: each output sums the sizes of its members; the total is the size of the kept inputs
    kept = kept_inputs(result)
    assert torch.allclose(result.sizes.sum(), tokens.sizes[kept].sum())
    assert torch.all(result.sizes >= 1)
    unit = run(name, dataclasses.replace(tokens, sizes=None), budget)
    assert float(unit.sizes.sum()) == float(kept_inputs(unit).sum())
    if method_class(name).order_preserving:
        assert assignment.is_order_preserving()
    if not method_class(name).merges:
        # a pure pruner never puts two inputs into one slot
        assert int(kept.sum()) == budget
    if not method_class(name).prunes:
        assert bool(kept.all()), "a method that does not prune must not drop tokens"
    assert torch.isfinite(result.features).all()


@pytest.mark.parametrize(("name", "setting"), setting_params())
def test_identity_when_budget_covers_all(name, setting):
    grid, _ = SETTINGS[setting]
    tokens = make_tokens(grid, seed=2)
    n = tokens.num_tokens
    for budget in (n, n + 7):
        result = run(name, tokens, budget)
        assert torch.equal(result.features, tokens.features)
        assert result.assignment.is_identity()
        assert torch.equal(result.sizes, torch.ones(n))


@pytest.mark.parametrize(("name", "setting"), setting_params())
def test_deterministic(name, setting):
    grid, budget = SETTINGS[setting]
    first = run(name, make_tokens(grid, seed=3), budget)
    second = run(name, make_tokens(grid, seed=3), budget)
    assert torch.equal(first.features, second.features)
    assert torch.equal(first.assignment.destination, second.assignment.destination)
    assert torch.equal(first.assignment.anchor, second.assignment.anchor)


@pytest.mark.parametrize("name", METHODS)
def test_batch_matches_single(name):
    items = [make_tokens((8, 8), seed=4), make_tokens((2, 5, 7), seed=5), make_tokens((6, 9), seed=6)]
    budgets = [20, 13, 54]
    method = get_method(name)
    batched = compress_batch(method, items, budgets)
    for item, budget, together in zip(items, budgets, batched, strict=True):
        alone = method(item, budget)
        assert torch.equal(alone.features, together.features)
        assert torch.equal(alone.assignment.destination, together.assignment.destination)


@pytest.mark.parametrize(("name", "setting"), setting_params())
def test_constant_and_duplicated_tokens_stay_finite(name, setting):
    grid, budget = SETTINGS[setting]
    constant = constant_tokens(grid)
    result = run(name, constant, budget)
    assert result.num_tokens == budget
    assert torch.isfinite(result.features).all()
    if name == "visionzip":  # as its official code: a contextual token is its target plus its members' mean
        assert set(result.features.unique().tolist()) <= {1.0, 2.0}
    elif method_class(name).family != "learned":
        assert torch.allclose(result.features, torch.ones_like(result.features))
    base = make_tokens(grid, seed=7)
    n = base.num_tokens
    half = torch.arange(n) % max(1, n // 4)  # every token repeated ~4 times
    duplicated = VisualTokens(
        features=base.features[half],
        grid=grid,
        cls_attention=torch.softmax(base.cls_attention[half], 0),
        layer_cls_attention=torch.softmax(base.layer_cls_attention[:, half], 1),
        keys=base.keys[half],
        text_embeds=base.text_embeds,
        text_attention=base.text_attention[:, half],
    )
    result = run(name, duplicated, budget)
    assert result.num_tokens == budget
    assert torch.isfinite(result.features).all()


@pytest.mark.parametrize(("name", "setting"), setting_params())
def test_bf16_matches_contract(name, setting):
    grid, budget = SETTINGS[setting]
    tokens = make_tokens(grid, seed=8, dtype=torch.bfloat16)
    result = run(name, tokens, budget)
    assert result.features.dtype == torch.bfloat16
    assert result.num_tokens == budget
    assert torch.isfinite(result.features.float()).all()
    if method_class(name).order_preserving:
        assert result.assignment.is_order_preserving()


@pytest.mark.parametrize("name", METHODS)
def test_adaptive_form(name):
    cls = method_class(name)
    method = cls()
    if not cls.adaptive:
        assert not callable(getattr(method, "compress_adaptive", None))
        return
    tokens = make_tokens((8, 8), seed=9, sizes=True)
    result = method.compress_adaptive(tokens)
    assert 1 <= result.num_tokens <= tokens.num_tokens
    assignment = result.assignment
    assert torch.equal(assignment.destination[assignment.anchor], torch.arange(result.num_tokens))
    kept = assignment.destination != DROPPED
    assert torch.allclose(result.sizes.sum(), tokens.sizes[kept].sum())
    if cls.order_preserving:
        assert assignment.is_order_preserving()
    again = method.compress_adaptive(tokens)
    assert torch.equal(again.features, result.features)
    constant = method.compress_adaptive(constant_tokens((8, 8)))
    assert constant.num_tokens >= 1
    assert torch.isfinite(constant.features).all()


@pytest.mark.parametrize("name", METHODS)
def test_bad_knobs_raise_naming_the_field(name):
    cls = method_class(name)
    fields = [f.name for f in dataclasses.fields(cls)]
    cases = BAD_KNOBS.get(name, [])
    if fields:
        assert cases, f"add bad-knob examples for {name!r} (knobs: {fields}) to BAD_KNOBS"
    for knobs, field in cases:
        with pytest.raises(ValueError, match=field):
            get_method(name, **knobs)
    with pytest.raises(ValueError, match="no_such_knob"):
        get_method(name, no_such_knob=1)


@pytest.mark.parametrize("name", METHODS)
def test_missing_signals_raise(name):
    cls = method_class(name)
    tokens = make_tokens((8, 8), seed=10)
    for flag, signal in (
        ("needs_cls_attention", "cls_attention"),
        ("needs_layer_cls_attention", "layer_cls_attention"),
        ("needs_keys", "keys"),
        ("needs_text", "text_embeds"),
        ("needs_text_attention", "text_attention"),
    ):
        stripped = dataclasses.replace(tokens, **{signal: None})
        if getattr(cls, flag):
            with pytest.raises(ValueError, match=signal):
                cls()(stripped, 16)
        else:
            assert cls()(stripped, 16).num_tokens == 16


@pytest.mark.parametrize("name", METHODS)
def test_bad_budget_raises(name):
    tokens = make_tokens((8, 8), seed=11)
    for budget in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="budget"):
            get_method(name)(tokens, budget)


@pytest.mark.parametrize("name", METHODS)
def test_capabilities_declared(name):
    cls = method_class(name)
    assert cls.name == name
    assert cls.paper, f"{name} must cite its paper (or say 'baseline')"
    assert cls.family in {"attention", "similarity", "query", "transformation", "baseline", "learned"}
    assert cls.__doc__ and cls.__doc__.strip()
    assert cls.prunes or cls.merges, f"{name} must declare whether it prunes and/or merges"
    assert isinstance(cls.adaptive, bool)


def test_registry_lists_every_builtin_module():
    """Every method module in the package is imported by builtin.py, and each registers a method."""
    # knobs: the knob declarations, not a method
    skip = {"base", "registry", "builtin", "learned", "knobs"}
    modules = {
        info.name
        for info in pkgutil.iter_modules(methods_pkg.__path__)
        if not info.name.startswith("_") and info.name not in skip
    }
    imported = {
        name
        for name, value in vars(builtin_module).items()
        if getattr(value, "__name__", "").startswith(methods_pkg.__name__ + ".")
    }
    assert modules <= imported, f"add {sorted(modules - imported)} to vllm_tokcomp/methods/builtin.py"
    registered_modules = {method_class(name).__module__.rsplit(".", 1)[1] for name in METHODS}
    assert registered_modules == modules, f"modules without a registered method: {sorted(modules - registered_modules)}"
    for module in modules:
        importlib.import_module(f"{methods_pkg.__name__}.{module}")


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        get_method("no_such_method")


def test_registry_not_empty():
    assert {"uniform", "cls_topk", "tome", "pool", "bilinear"} <= set(METHODS)
    assert all(math.isfinite(len(name)) for name in METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_keys_only_matter_where_declared(name):
    """A method that neither needs nor uses keys gives the same result without them."""
    cls = method_class(name)
    if cls.needs_keys or getattr(cls, "uses_keys", False):
        return
    tokens = make_tokens((6, 7), seed=12)
    with_keys = cls()(tokens, 10)
    without = cls()(dataclasses.replace(tokens, keys=None), 10)
    assert torch.equal(with_keys.features, without.features)
    assert torch.equal(with_keys.assignment.destination, without.assignment.destination)
