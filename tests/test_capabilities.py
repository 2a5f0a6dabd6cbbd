"""Declared capabilities decide how each model family serves a method (nothing keyed on method names).

The expected lists below are written out by hand from each method's paper and docs/methods.md, independently of the
flags; a new method registered at run time is routed from its flags alone.
"""

import dataclasses

import pytest
import torch

from vllm_tokcomp.config import CompressionSpec, ConfigError, method_reads_text
from vllm_tokcomp.integration import llava, qwen_routes
from vllm_tokcomp.methods import Compressor, TokenAssignment, VisualTokens, available_methods, register
from vllm_tokcomp.methods import registry as method_registry


def test_qwen_routes_of_the_built_in_methods():
    routes = {method: qwen_routes.qwen_route(method) for method in available_methods()}
    assert {m for m, r in routes.items() if r == "layout"} == {"uniform", "random", "pool", "bilinear"}
    assert {m for m, r in routes.items() if r == "pixels"} == {"tome", "divprune", "adjacent", "evs"}
    assert {m for m, r in routes.items() if r == "encoder"} == {"text_relevance", "pumer", "dart", "cdpruner", "mmtok"}
    assert {m for m, r in routes.items() if r is None} == {
        "btp", "cls_topk", "mustdrop", "mustdrop_s1", "mustdrop_s2", "prumerge", "prumerge_plus", "scope",
        "vispruner", "visionzip", "vscan"}


def test_llava_captures_tower_signals_for_the_methods_that_read_them():
    readers = {m for m in available_methods() if llava._uses_vision_signals(m)}
    # [CLS] attention: the attention family and MustDrop; keys when given: ToMe-style similarity and PuMer
    assert readers == {"adjacent", "btp", "cls_topk", "mustdrop", "mustdrop_s1", "mustdrop_s2", "prumerge",
                       "prumerge_plus", "pumer", "scope", "tome", "vispruner", "visionzip", "vscan"}
    assert not llava._uses_vision_signals("c_abstractor")  # a trained connector reads features only


def test_text_readers():
    assert {m for m in available_methods() if method_reads_text(m)} == {
        "cdpruner", "dart", "mmtok", "mustdrop", "mustdrop_s2", "pumer", "text_relevance"}


@dataclasses.dataclass(frozen=True)
class _LargestNorm(Compressor):
    """Keeps the tokens of largest feature norm: reads features only."""

    name = "test_largest_norm"
    family = "similarity"
    prunes = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        kept = tokens.features.float().norm(dim=-1).topk(budget).indices.sort().values
        return TokenAssignment.from_kept(kept, tokens.features.shape[0])


@dataclasses.dataclass(frozen=True)
class _Corner(_LargestNorm):
    name = "test_corner"
    family = "baseline"
    selects_by_content = False

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        return TokenAssignment.from_kept(torch.arange(budget), tokens.features.shape[0])


@dataclasses.dataclass(frozen=True)
class _NeedsCls(_LargestNorm):
    name = "test_needs_cls"
    needs_cls_attention = True


@pytest.fixture
def registered():
    classes = [_LargestNorm, _Corner, _NeedsCls]
    for cls in classes:
        register(cls)
    yield
    for cls in classes:
        method_registry._REGISTRY.pop(cls.name)


def test_a_new_method_is_routed_by_its_flags_on_qwen(registered):
    assert qwen_routes.qwen_route("test_largest_norm") == "pixels"
    assert qwen_routes.qwen_route("test_corner") == "layout"
    assert qwen_routes.qwen_route("test_needs_cls") is None
    field = "mm_processor_kwargs.tokcomp_method"
    qwen_routes.check_served_on_qwen(CompressionSpec("test_largest_norm", 8), field)  # accepted
    with pytest.raises(ConfigError, match="test_needs_cls"):
        qwen_routes.check_served_on_qwen(CompressionSpec("test_needs_cls", 8), field)
    assert "test_largest_norm" in qwen_routes.qwen_methods("pixels")
