"""LLaVA-OneVision's layout on tensors, against vLLM's own code: the tile grid's shape after unpadding and the
``anyres_max_9`` shrink (vLLM's placeholder count and vLLM's merge of the tiles), and which methods the SigLIP tower
can serve (from the declared capabilities)."""

from types import SimpleNamespace

import pytest
import torch

from vllm_tokcomp.config import CompressionSpec, ConfigError, servable_methods
from vllm_tokcomp.integration.llava_onevision import _check_servable, serves, tile_grid_shape
from vllm_tokcomp.methods import method_class

SIDE, TILE = 27, 384  # SigLIP at 384 px, patch 14
SIZES_AND_TILES = [((384, 384), (1, 1)), ((300, 500), (1, 2)), ((500, 300), (2, 1)), ((700, 760), (2, 2)),
                   ((1500, 1200), (4, 3)),  # 12 tiles: shrunk (ratio > 1.1)
                   ((1152, 1536), (3, 4)), ((1000, 1536), (3, 4)), ((2000, 700), (4, 3))]


@pytest.mark.parametrize(("size", "tiles"), SIZES_AND_TILES)
def test_tile_grid_shape_is_vllms_count(size, tiles):
    """``H * W`` and ``H`` newlines are what vLLM's ``_get_num_unpadded_features`` counts."""
    from vllm.model_executor.models.llava_onevision import LlavaOnevisionProcessingInfo

    rows, cols = tile_grid_shape(size, *tiles, SIDE)
    unpadded, newlines = LlavaOnevisionProcessingInfo._get_num_unpadded_features(
        None, original_height=size[0], original_width=size[1], npatches=SIDE, num_patch_height=tiles[0],
        num_patch_width=tiles[1])
    assert (rows * cols, rows) == (unpadded, newlines)


@pytest.mark.parametrize(("size", "tiles"), SIZES_AND_TILES)
def test_tile_grid_shape_is_vllms_merge(size, tiles):
    """Tiles merged by vLLM's own ``_merge_image_patch_embeddings``: the tile grid has ``H`` rows of ``W`` tokens and
    a newline each (a newline is the only -1 feature; tile features are positive)."""
    from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

    tiles_high, tiles_wide = tiles
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=TILE, patch_size=14),
                             image_grid_pinpoints=[[tiles_high * TILE, tiles_wide * TILE]])
    stub = SimpleNamespace(config=config, image_newline=torch.tensor([-1.0]))
    count = 1 + tiles_high * tiles_wide
    patches = torch.rand(count, SIDE * SIDE, 1) + 1
    merged = LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings(
        stub, torch.tensor(size), patches, image_newline=stub.image_newline, strategy="spatial_unpad")
    rows, cols = tile_grid_shape(size, tiles_high, tiles_wide, SIDE)
    grid = merged[SIDE * SIDE:, 0].view(rows, cols + 1)
    assert (grid[:, -1] == -1).all() and (grid[:, :-1] > 0).all()
    without_newlines = LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings(
        stub, torch.tensor(size), patches, image_newline=None, strategy="spatial_unpad")
    assert torch.equal(without_newlines[SIDE * SIDE:, 0].view(rows, cols), grid[:, :-1])


def test_served_methods_are_those_needing_no_tower_signal():
    for method in servable_methods():
        cls = method_class(method)
        needs_tower = cls.needs_cls_attention or cls.needs_layer_cls_attention or cls.needs_keys
        assert serves(method) == (not needs_tower and not cls.reads_lm_probe()), method
    assert serves("tome") and serves("divprune") and serves("text_relevance") and serves("pool")
    assert not serves("visionzip") and not serves("cls_topk")


@pytest.mark.parametrize(("spec", "message"), [
    (CompressionSpec("visionzip", 64), "no \\[CLS\\] token"),
    (CompressionSpec("tome", "auto"), "give a count or a ratio"),
])
def test_refusals_name_the_field_and_the_reason(spec, message):
    with pytest.raises(ConfigError, match=message) as error:
        _check_servable(spec, "mm_processor_kwargs.tokcomp_method")
    assert "tokcomp_" in str(error.value)


@pytest.mark.parametrize(("size", "tiles"), SIZES_AND_TILES[:4])  # unshrunk: a shrunk grid interpolates tokens
def test_preview_groups_follow_vllms_placeholder_order(size, tiles):
    """``tiled_image_groups`` puts each grid token's destination where vLLM's own merge (with newlines) places that
    token, and ``-1`` exactly at the newlines: the tokens carry their index through the merge."""
    from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

    from vllm_tokcomp.integration.parts import tiled_image_groups

    tiles_high, tiles_wide = tiles
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=TILE, patch_size=14),
                             image_grid_pinpoints=[[tiles_high * TILE, tiles_wide * TILE]])
    stub = SimpleNamespace(config=config, image_newline=torch.tensor([-1.0]))
    patches = torch.arange((1 + tiles_high * tiles_wide) * SIDE * SIDE, dtype=torch.float64).view(-1, SIDE * SIDE, 1)
    merged = LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings(
        stub, torch.tensor(size), patches, image_newline=stub.image_newline, strategy="spatial_unpad")[:, 0]
    without = LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings(
        stub, torch.tensor(size), patches, image_newline=None, strategy="spatial_unpad")[:, 0]
    rows, cols = tile_grid_shape(size, tiles_high, tiles_wide, SIDE)
    # destinations of an identity selection: grid token i (compress_grids' order) goes to slot i
    groups = tiled_image_groups(torch.arange(without.shape[0]), SIDE * SIDE, rows, cols)
    assert groups.shape[0] == merged.shape[0]
    placed = torch.full_like(merged, -1.0)
    placed[groups >= 0] = without[groups[groups >= 0]]
    assert torch.equal(placed, merged)


def test_a_videos_groups_end_with_its_dropped_newline():
    from vllm_tokcomp.integration.parts import with_trailing_newline

    assert with_trailing_newline(torch.tensor([0, -1, 1, 1])).tolist() == [0, -1, 1, 1, -1]
