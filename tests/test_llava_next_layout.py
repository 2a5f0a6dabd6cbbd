"""LLaVA-NeXT's two rules on tensors: how a compressed image's count splits between the base view and the tile grid
(by hand), and where each tile patch sits in the unpadded grid (against vLLM's own merge of the tiles)."""

from types import SimpleNamespace

import pytest
import torch

from vllm_tokcomp.config import CompressionSpec
from vllm_tokcomp.integration.llava_next import grid_index
from vllm_tokcomp.integration.parts import visual_counts


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, None),
        (CompressionSpec("pool", 10_000), None),  # covers every placeholder: served as vLLM serves it
        (CompressionSpec("pool", 1176), None),  # 576 + 24 * 24 + 24 newlines, exactly
        (CompressionSpec("pool", 1175), (576, 576)),  # every visual token, no newlines
        (CompressionSpec("pool", 64), (32, 32)),  # in proportion: 64 * 576 / 1152
        (CompressionSpec("pool", 2), (1, 1)),
        (CompressionSpec("pool", 1), (1, 0)),  # the base view first
        (CompressionSpec("pool", None, ratio=0.1), (59, 59)),  # ceil(0.1 * 1176) = 118 over the placeholders
    ],
)
def test_counts_by_hand_square_image(spec, expected):
    assert visual_counts(spec, 576, 24, 24) == expected


def test_counts_of_a_wide_image():
    # 576 + 24 x 48: 96 tokens split 576 : 1152 -> 32 and 64
    assert visual_counts(CompressionSpec("tome", 96), 576, 24, 48) == (32, 64)
    assert visual_counts(CompressionSpec("tome", 97), 576, 24, 48) == (32, 65)


@pytest.mark.parametrize(("size", "pinpoints"), [((336, 336), (2, 2)), ((224, 448), (1, 2)), ((500, 300), (2, 1)),
                                                   ((300, 650), (1, 2))])
def test_grid_index_is_vllms_merge_layout(size, pinpoints):
    """Tiles whose one feature is their patch's index, merged by vLLM's own ``_merge_image_patch_embeddings``: the
    grid rows without their newline column are exactly :func:`grid_index`."""
    from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration

    side, tile = 24, 336
    tiles_high, tiles_wide = pinpoints
    grid_pinpoints = [[tiles_high * tile, tiles_wide * tile]]
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=tile, patch_size=14),
                             image_grid_pinpoints=grid_pinpoints)
    stub = SimpleNamespace(config=config, image_newline=torch.tensor([-1.0], dtype=torch.float64))
    count = 1 + tiles_high * tiles_wide
    tiles = torch.arange(count * side * side, dtype=torch.float64).view(count, side * side, 1)
    merged = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
        stub, torch.tensor(size), tiles, strategy="spatial_unpad")
    index = grid_index(tiles_high, tiles_wide, side, size)
    rows, cols = index.shape
    grid = merged[side * side:, 0].view(rows, cols + 1)
    assert (grid[:, -1] == -1).all()  # the newline after each row
    assert torch.equal(grid[:, :-1].long() - side * side, index)  # tile patches, counted from the first tile
