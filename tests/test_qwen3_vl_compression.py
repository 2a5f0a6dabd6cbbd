"""Qwen3-VL's two rules, on tensors: a video's budget spread over its frames, and DeepStack levels compressed by the
assignment the main feature decides (every level keeps or merges the same tokens, and only the main feature is
read)."""

import dataclasses
import math

import pytest
import torch

from vllm_tokcomp.config import CompressionSpec
from vllm_tokcomp.integration import settings
from vllm_tokcomp.integration.mrope import POSITION_CHANNELS
from vllm_tokcomp.integration.parts import frame_counts
from vllm_tokcomp.integration.qwen2_vl import _compress_item
from vllm_tokcomp.integration.qwen3_vl import frame_specs, video_preview
from vllm_tokcomp.integration.qwen_routes import qwen_route
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


def _destination(method, budget, grid, features=None):
    n = math.prod(grid)
    tokens = VisualTokens(torch.zeros(n, 1) if features is None else features, grid)
    return get_method(method)(tokens, budget).assignment


def test_video_preview_numbers_slots_across_frames():
    """A fixed-layout method: each frame's groups are the method's on the frame's grid at that frame's count, the
    second frame's slots after the first frame's."""
    preview = video_preview(CompressionSpec("pool", 9), (2, 7, 7), None)
    first, second = (_destination("pool", c, (1, 7, 7)).destination.tolist() for c in (5, 4))
    assert preview == {"tokens_after": 9, "decided": "frontend",
                       "groups": first + [g + 5 if g >= 0 else g for g in second]}


def test_video_preview_of_a_pixel_decided_method_reads_each_frames_row():
    generator = torch.Generator().manual_seed(3)
    assignments = [_destination("tome", c, (1, 7, 7), torch.randn(49, 8, generator=generator)) for c in (5, 4)]
    row = torch.cat([settings.encode_assignment(a.destination, a.anchor) for a in assignments])
    preview = video_preview(CompressionSpec("tome", 9), (2, 7, 7), row)
    first, second = (a.destination.tolist() for a in assignments)
    assert preview == {"tokens_after": 9, "decided": "frontend",
                       "groups": first + [g + 5 if g >= 0 else g for g in second]}


def test_video_preview_of_an_encoder_decided_method_waits_for_the_engine():
    assert video_preview(CompressionSpec("text_relevance", 1), (3, 4, 4), None) == {
        "tokens_after": 3, "groups": None, "decided": None}  # one token per frame at least
