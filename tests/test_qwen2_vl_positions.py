"""Qwen2-VL position rules (no engine): full budget reproduces vLLM's in-tree layout; kept tokens take
their anchors' (t, h, w) positions; text after an item continues from the uncompressed extent."""

import numpy as np
import pytest
import torch

from vllm_tokcomp.config import CompressionSpec

qwen = pytest.importorskip("vllm_tokcomp.integration.qwen2_vl")


@pytest.mark.parametrize("grid", [(1, 12, 12), (1, 8, 16), (3, 4, 6)])
def test_full_budget_is_the_in_tree_layout(grid):
    anchors = qwen.kept_anchors(None, grid)
    positions, extent = qwen.item_positions(grid, anchors)
    assert np.array_equal(positions, np.indices(grid).reshape(3, -1))
    assert extent == max(grid)  # in-tree: next text starts at max position + 1
    big = CompressionSpec("pool", 10_000)
    assert torch.equal(qwen.kept_anchors(big, grid), anchors)


@pytest.mark.parametrize("method", sorted(qwen.FIXED_LAYOUT_METHODS))
def test_kept_tokens_take_their_anchor_positions(method):
    grid = (1, 8, 16)
    spec = CompressionSpec(method, 30)
    anchors = qwen.kept_anchors(spec, grid)
    assert anchors.numel() == 30
    positions, extent = qwen.item_positions(grid, anchors)
    assert extent == 16
    for k, index in enumerate(anchors.tolist()):
        assert positions[:, k].tolist() == [0, index // 16, index % 16]


def test_pool_anchor_is_the_cell_centre():
    # 12x12 pooled to 6x6: every 2x2 cell takes its lower-middle patch (the top-left of the four).
    anchors = qwen.kept_anchors(CompressionSpec("pool", 36), (1, 12, 12)).tolist()
    assert anchors == [r * 2 * 12 + c * 2 for r in range(6) for c in range(6)]


def test_content_dependent_methods_are_refused_with_the_field():
    from vllm_tokcomp.config import ConfigError

    with pytest.raises(ConfigError, match="selects tokens by content") as error:
        qwen._check_servable(CompressionSpec("tome", 16), qwen.METHOD_FIELD)
    assert error.value.field == "mm_processor_kwargs.tokcomp_method"
    assert qwen._check_servable(None, qwen.METHOD_FIELD) is None
