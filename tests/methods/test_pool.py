"""Grid pooling / bilinear resizing: parity with plain re-derivations and the grid rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tokens
from vllm_tokcomp.methods import VisualTokens, get_method
from vllm_tokcomp.methods.pool import pool_output_grid


def reference_pool(features: torch.Tensor, h: int, w: int, gh: int, gw: int):
    """Non-overlapping adaptive bins: patch (i, j) belongs to cell (i*gh//h, j*gw//w)."""
    out, anchors = [], []
    for ci in range(gh):
        rows = [i for i in range(h) if i * gh // h == ci]
        for cj in range(gw):
            cols = [j for j in range(w) if j * gw // w == cj]
            members = [features[i * w + j] for i in rows for j in cols]
            out.append(torch.stack(members).mean(0))
            anchors.append(((rows[0] + rows[-1]) // 2) * w + (cols[0] + cols[-1]) // 2)
    return torch.stack(out), anchors


@pytest.mark.parametrize(("h", "w", "budget", "cells"), [(8, 8, 16, (4, 4)), (6, 9, 6, (2, 3)), (7, 5, 6, (3, 2))])
def test_pool_parity(h, w, budget, cells):
    tokens = make_tokens((h, w), seed=0)
    assert pool_output_grid((h, w), budget) == cells
    result = get_method("pool")(tokens, budget)
    expected, anchors = reference_pool(tokens.features, h, w, *cells)
    assert torch.allclose(result.features, expected, atol=1e-6)
    assert result.assignment.anchor.tolist() == anchors


def test_pool_2x2_equals_avg_pool():
    tokens = make_tokens((24, 24), seed=1, dim=8)
    result = get_method("pool")(tokens, 144)
    x = tokens.features.T.reshape(1, 8, 24, 24)
    expected = F.avg_pool2d(x, 2).reshape(8, -1).T
    assert torch.allclose(result.features, expected, atol=1e-6)
    assert torch.equal(result.sizes, torch.full((144,), 4.0))


def test_output_grid_rule():
    assert pool_output_grid((24, 24), 144) == (12, 12)
    assert pool_output_grid((24, 36), 216) == (12, 18)
    assert pool_output_grid((4, 24, 24), 144) == (4, 6, 6)  # keeps frames when the aspect allows
    assert pool_output_grid((24, 24), 576) == (24, 24)
    g = pool_output_grid((24, 24), 128)  # no close factorisation: smallest grid >= 128
    assert g[0] * g[1] >= 128 and max(g) / min(g) <= 1.5
    assert pool_output_grid((1, 10), 3) == (1, 3)


def test_trimmed_grid_keeps_uniform_cells():
    tokens = make_tokens((24, 24), seed=2, dim=8)
    result = get_method("pool")(tokens, 128)
    gh, gw = pool_output_grid((24, 24), 128)
    kept_cells = [int((k + 0.5) * gh * gw / 128) for k in range(128)]
    full, anchors = reference_pool(tokens.features, 24, 24, gh, gw)
    assert torch.allclose(result.features, full[kept_cells], atol=1e-6)
    assert result.assignment.anchor.tolist() == [anchors[c] for c in kept_cells]


def reference_bilinear(features: torch.Tensor, h: int, w: int, gh: int, gw: int) -> torch.Tensor:
    """Half-pixel-centre bilinear sampling (align_corners=False), edge-clamped."""
    grid = features.reshape(h, w, -1).double()
    out = []
    for i in range(gh):
        y = max((i + 0.5) * h / gh - 0.5, 0.0)
        y0 = min(int(y), h - 1)
        y1 = min(y0 + 1, h - 1)
        fy = y - y0
        for j in range(gw):
            x = max((j + 0.5) * w / gw - 0.5, 0.0)
            x0 = min(int(x), w - 1)
            x1 = min(x0 + 1, w - 1)
            fx = x - x0
            top = grid[y0, x0] * (1 - fx) + grid[y0, x1] * fx
            bottom = grid[y1, x0] * (1 - fx) + grid[y1, x1] * fx
            out.append(top * (1 - fy) + bottom * fy)
    return torch.stack(out).float()


@pytest.mark.parametrize(("h", "w", "budget"), [(8, 8, 16), (7, 5, 6), (24, 24, 64)])
def test_bilinear_parity(h, w, budget):
    tokens = make_tokens((h, w), seed=3)
    result = get_method("bilinear")(tokens, budget)
    gh, gw = pool_output_grid((h, w), budget)
    assert gh * gw == budget
    expected = reference_bilinear(tokens.features, h, w, gh, gw)
    assert torch.allclose(result.features, expected, atol=1e-5)
    # bookkeeping is the same as pooling
    pooled = get_method("pool")(tokens, budget)
    assert torch.equal(result.assignment.destination, pooled.assignment.destination)
    assert torch.equal(result.sizes, pooled.sizes)


def test_bilinear_video_uses_trilinear():
    tokens = make_tokens((2, 4, 4), seed=4, dim=4)
    result = get_method("bilinear")(tokens, 8)
    assert pool_output_grid((2, 4, 4), 8) == (2, 2, 2)
    x = tokens.features.T.reshape(1, 4, 2, 4, 4)
    # trilinear at 2x down-scaling of each spatial axis and none in time = mean of 2x2 blocks
    expected = F.avg_pool3d(x, (1, 2, 2)).reshape(4, -1).T
    assert torch.allclose(result.features, expected, atol=1e-6)


def test_pool_accepts_bare_grid():
    features = torch.arange(16.0).reshape(16, 1)
    result = get_method("pool")(VisualTokens(features=features, grid=(4, 4)), 4)
    assert result.features.squeeze(1).tolist() == [2.5, 4.5, 10.5, 12.5]


def test_budget_of_one_per_frame_pools_each_frame_to_one_token():
    """The LLaMA-VID-like extreme video mode: budget = frames keeps one pooled token per frame."""
    frames, h, w = 3, 8, 8
    x = torch.arange(frames, dtype=torch.float32).repeat_interleave(h * w)[:, None].expand(-1, 2).contiguous()
    result = get_method("pool")(VisualTokens(x, (frames, h, w)), frames)
    assert result.features[:, 0].tolist() == [0.0, 1.0, 2.0]  # each the mean of its own frame only
    anchors = result.assignment.anchor.tolist()
    assert [a // (h * w) for a in anchors] == [0, 1, 2]  # one per frame, at the frame's centre patch
    assert [a % (h * w) for a in anchors] == [3 * w + 3] * frames
