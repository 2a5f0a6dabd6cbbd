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


def test_methods_needing_tower_or_text_signals_are_refused_with_the_field():
    from vllm_tokcomp.config import ConfigError

    with pytest.raises(ConfigError, match="pixel-decided") as error:
        qwen._check_servable(CompressionSpec("cls_topk", 16), qwen.METHOD_FIELD)
    assert error.value.field == "mm_processor_kwargs.tokcomp_method"
    assert qwen._check_servable(None, qwen.METHOD_FIELD) is None
    for method in ("tome", "divprune", "adjacent", "evs"):
        assert qwen._check_servable(CompressionSpec(method, 16), qwen.METHOD_FIELD).method == method


def test_assignment_rows_round_trip():
    from vllm_tokcomp.integration import settings

    destination = torch.tensor([0, 0, -1, 1, 2, 1, -1])
    anchor = torch.tensor([1, 5, 4])  # slot 0 takes token 1's position, slot 1 token 5's, slot 2 token 4's
    row = settings.encode_assignment(destination, anchor)
    back_destination, back_anchor = settings.decode_assignment(row)
    assert back_destination.tolist() == destination.tolist() and back_anchor.tolist() == anchor.tolist()


def test_pixel_descriptors_pool_each_patch_plane_into_block_means():
    """Written out per token, patch, plane and block: the descriptor is the block means of each patch plane
    (C x T planes of P x P pixels, the HF processor's row layout), the token's merge^2 patches side by side,
    minus the mean over the item's tokens."""
    torch.manual_seed(0)
    merge, size, planes, pool = 2, 6, 3, 2
    patches = torch.randn(2 * merge * merge, planes * size * size)  # 2 merged tokens
    got = qwen.pixel_descriptors(patches, merge, size, pool)
    block = size // pool
    expected = []
    for token in range(2):
        values = []
        for patch in patches[token * merge * merge:(token + 1) * merge * merge]:
            image = patch.reshape(planes, size, size)
            for plane in range(planes):
                for by in range(pool):
                    for bx in range(pool):
                        values.append(image[plane, by * block:(by + 1) * block, bx * block:(bx + 1) * block].mean())
        expected.append(torch.stack(values))
    expected = torch.stack(expected)
    torch.testing.assert_close(got, expected - expected.mean(0))
    assert got.shape == (2, merge * merge * planes * pool * pool)
    raw = qwen.pixel_descriptors(patches, merge, size, size)  # pool == patch size keeps every pixel
    flat = patches.reshape(2, -1)
    torch.testing.assert_close(raw, flat - flat.mean(0))
    with pytest.raises(ValueError, match="does not divide"):
        qwen.pixel_descriptors(patches, merge, size, 4)


def test_pixel_assignment_groups_the_processors_patches_into_merged_tokens():
    """Qwen's processor lays out each LM token's merge x merge patches consecutively: the method must see one
    feature row per LM token, built from exactly those patches. Two identical 2x2 blocks of patches (tokens 0
    and 3 of a 2x2 merged grid) are what ToMe merges first."""
    from vllm_tokcomp.integration import settings

    torch.manual_seed(0)
    patches = torch.randn(4 * 4, 2 * 4 * 4)  # 4 LM tokens (2x2 grid, merge 2) x 4 patches x (2 planes x 4 x 4 px)
    patches[12:16] = patches[0:4]  # token 3's patches == token 0's
    row = qwen.pixel_assignment(CompressionSpec("tome", 3), patches, (1, 2, 2), 2, 4)
    destination, anchor = settings.decode_assignment(row)
    assert len(anchor) == 3 and destination[0] == destination[3]
    identity = qwen.pixel_assignment(CompressionSpec("uniform", 3), patches, (1, 2, 2), 2, 4)
    assert settings.decode_assignment(identity)[1].tolist() == [0, 1, 2, 3]  # fixed layouts decide in the model
