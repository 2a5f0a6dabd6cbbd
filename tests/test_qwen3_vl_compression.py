"""Qwen3-VL's two rules, on tensors: a video's budget spread over its frames, and DeepStack levels compressed by the
assignment the main feature decides (every level keeps or merges the same tokens, and only the main feature is
read)."""

import dataclasses

import pytest
import torch

from vllm_tokcomp.config import CompressionSpec
from vllm_tokcomp.integration.qwen2_vl import POSITION_CHANNELS, _compress_item, qwen_route
from vllm_tokcomp.integration.qwen3_vl import frame_counts, frame_specs
from vllm_tokcomp.methods import VisualTokens, get_method

GRID = (1, 6, 8)
WIDTH, LEVELS = 16, 2  # main feature width (= the LM's hidden size) and DeepStack levels


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, [49, 49]),
        (CompressionSpec("pool", 16), [8, 8]),
        (CompressionSpec("pool", 9), [5, 4]),  # the remainder goes to the earlier frame
        (CompressionSpec("pool", 1), [1, 1]),  # every frame keeps one token
        (CompressionSpec("pool", 1000), [49, 49]),
        (CompressionSpec("pool", None, ratio=0.25), [13, 12]),  # ceil(0.25 * 98) = 25 over the whole video
    ],
)
def test_frame_counts_by_hand(spec, expected):
    assert frame_counts(spec, 2, 49) == expected


def test_frame_specs_carry_counts_not_ratios():
    specs = frame_specs(CompressionSpec("tome", None, (("similarity", "cosine"),), ratio=0.5), (3, 4, 4))
    expected = ("tome", 8, None, (("similarity", "cosine"),))
    assert [(s.method, s.budget, s.ratio, s.options) for s in specs] == [expected] * 3


def _rows(seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = GRID[1] * GRID[2]
    return torch.randn(n, WIDTH * (1 + LEVELS), generator=generator), torch.randn(5, WIDTH, generator=generator)


ENCODER_METHODS = ["text_relevance", "cdpruner", "dart", "pumer"]
LAYOUT_METHODS = ["pool", "uniform", "bilinear"]


@pytest.mark.parametrize("method", ENCODER_METHODS + LAYOUT_METHODS)
def test_every_deepstack_level_is_compressed_by_the_main_features_assignment(method):
    rows, text = _rows()
    budget = 12
    out = _compress_item(rows, CompressionSpec(method, budget), GRID, None, text, decision_width=WIDTH)
    encoder = qwen_route(method) == "encoder"
    assert out.shape == (budget, WIDTH * (1 + LEVELS) + (POSITION_CHANNELS if encoder else 0))
    # Reference: the method decides on the main feature alone (with the text for the text-guided ones) ...
    main = VisualTokens(rows[:, :WIDTH], GRID, text_embeds=text if encoder else None)
    assignment = get_method(method)(main, budget).assignment
    # ... and each level, on its own, is merged by that same assignment.
    for level in range(1 + LEVELS):
        columns = slice(level * WIDTH, (level + 1) * WIDTH)
        expected = get_method(method).apply(dataclasses.replace(main, features=rows[:, columns]), assignment).features
        torch.testing.assert_close(out[:, columns], expected, msg=f"level {level}")


@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_the_decision_reads_only_the_main_feature(method):
    rows, text = _rows()
    other = rows.clone()
    other[:, WIDTH:] = torch.randn(rows.shape[0], WIDTH * LEVELS, generator=torch.Generator().manual_seed(9)) * 10
    spec = CompressionSpec(method, 10)
    a = _compress_item(rows, spec, GRID, None, text, decision_width=WIDTH)
    b = _compress_item(other, spec, GRID, None, text, decision_width=WIDTH)
    torch.testing.assert_close(a[:, :WIDTH], b[:, :WIDTH])
    torch.testing.assert_close(a[:, -POSITION_CHANNELS:], b[:, -POSITION_CHANNELS:])  # same kept tokens


def test_perturbing_one_levels_kept_row_shows_in_that_level_only():
    rows, text = _rows()
    spec = CompressionSpec("text_relevance", 10)
    base = _compress_item(rows, spec, GRID, None, text, decision_width=WIDTH)
    kept = get_method("text_relevance").select(VisualTokens(rows[:, :WIDTH], GRID, text_embeds=text), 10).anchor
    slot, token = 3, int(kept[3])
    level2 = slice(2 * WIDTH, 3 * WIDTH)
    perturbed = rows.clone()
    perturbed[token, level2] += 1.0
    out = _compress_item(perturbed, spec, GRID, None, text, decision_width=WIDTH)
    changed = (out != base).any(dim=1)
    assert changed.tolist() == [i == slot for i in range(10)]
    torch.testing.assert_close(out[slot, level2], base[slot, level2] + 1.0)
    torch.testing.assert_close(out[:, : 2 * WIDTH], base[:, : 2 * WIDTH])
