"""Learned compressors: fixed output counts, bookkeeping invariants, gradients, loop parity where simple."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tokens
from vllm_tokcomp.methods import DROPPED, VisualTokens
from vllm_tokcomp.methods.learned import (
    CAbstractor,
    LearnedCompressor,
    LlamaVidCompressor,
    PixelUnshuffleMLP,
    QFormerResampler,
    chunk_assignment,
)

D = 32


def build(name: str) -> LearnedCompressor:
    torch.manual_seed(0)
    return {
        "qformer": lambda: QFormerResampler(D, 24, num_queries=8, num_heads=4, depth=1),
        "pixel_unshuffle": lambda: PixelUnshuffleMLP(D, 24, factor=2),
        "c_abstractor": lambda: CAbstractor(D, 24, out_grid=(2, 3)),
        "llama_vid": lambda: LlamaVidCompressor(D, 24),
    }[name]().eval()


NAMES = ["qformer", "pixel_unshuffle", "c_abstractor", "llama_vid"]
GRIDS = [(6, 7), (2, 5, 6)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", NAMES)
def test_count_and_bookkeeping(name, grid):
    module = build(name)
    tokens = make_tokens(grid, seed=1, dim=D, sizes=True)
    with torch.no_grad():
        result = module(tokens)
    m = module.output_count(grid)
    assert result.features.shape == (m, 24)
    assignment = result.assignment
    assert assignment.num_outputs == m and assignment.num_inputs == tokens.num_tokens
    assert torch.equal(assignment.destination[assignment.anchor], torch.arange(m))
    assert assignment.is_order_preserving()
    assert bool((assignment.destination != DROPPED).all())
    assert torch.allclose(result.sizes.sum(), tokens.sizes.sum())
    assert torch.isfinite(result.features).all()
    with torch.no_grad():
        again = module(tokens)
    assert torch.equal(result.features, again.features)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_and_dtypes(name):
    module = build(name).train()
    tokens = make_tokens((6, 7), seed=2, dim=D)
    module(tokens).features.square().mean().backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    with torch.no_grad():
        out = build(name)(make_tokens((6, 7), seed=2, dim=D, dtype=torch.bfloat16))
    assert out.features.dtype == torch.bfloat16
    assert torch.isfinite(out.features.float()).all()


def test_expected_counts():
    assert build("qformer").output_count((24, 24)) == 8
    assert build("pixel_unshuffle").output_count((24, 24)) == 144
    assert build("pixel_unshuffle").output_count((3, 5, 7)) == 3 * 3 * 4
    assert build("c_abstractor").output_count((4, 24, 24)) == 4 * 6
    assert build("llama_vid").output_count((8, 24, 24)) == 16


def test_too_small_inputs_raise():
    with pytest.raises(ValueError, match="num_queries"):
        build("qformer")(make_tokens((2, 3), dim=D))
    with pytest.raises(ValueError, match="out_grid"):
        build("c_abstractor")(make_tokens((1, 5), dim=D))
    with pytest.raises(ValueError, match="text_embeds"):

        class NeedsText(PixelUnshuffleMLP):
            needs_text = True

        NeedsText(D, 8)(VisualTokens(features=torch.randn(4, D), grid=(2, 2)))


def test_pixel_unshuffle_parity():
    module = build("pixel_unshuffle")
    h, w = 5, 6
    tokens = make_tokens((h, w), seed=3, dim=D)
    x = tokens.features
    rows = []
    for ci in range(math.ceil(h / 2)):
        for cj in range(math.ceil(w / 2)):
            block = []
            for di in range(2):
                for dj in range(2):
                    i, j = 2 * ci + di, 2 * cj + dj
                    block.append(x[i * w + j] if i < h and j < w else torch.zeros(D))
            rows.append(torch.cat(block))
    with torch.no_grad():
        expected = module.mlp(torch.stack(rows))
        result = module(tokens)
    assert torch.allclose(result.features, expected, atol=1e-5)
    # the bottom row of blocks stands for one patch row only
    assert result.sizes.tolist() == [4.0] * 6 + [2.0] * 3


def test_llama_vid_parity():
    module = build("llama_vid")
    tokens = make_tokens((2, 3, 4), seed=4, dim=D)
    with torch.no_grad():
        result = module(tokens)
        queries = module.text_proj(tokens.text_embeds)
        expected = []
        for f in range(2):
            frame = tokens.features[f * 12 : (f + 1) * 12]
            context = torch.zeros(D)
            for q in queries:
                weights = torch.softmax(torch.stack([q @ v for v in frame]) / math.sqrt(D), 0)
                context += sum(wt * v for wt, v in zip(weights, frame, strict=True)) / len(queries)
            expected += [module.context_proj(context), module.content_proj(frame.mean(0))]
    assert torch.allclose(result.features, torch.stack(expected), atol=1e-5)
    assert result.assignment.anchor.tolist() == [2, 8, 14, 20]


def test_qformer_is_permutation_invariant_in_features():
    module = build("qformer")
    tokens = make_tokens((4, 4), seed=5, dim=D)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    shuffled = VisualTokens(features=tokens.features[perm], grid=(4, 4))
    with torch.no_grad():
        assert torch.allclose(module(tokens).features, module(shuffled).features, atol=1e-5)


def test_chunk_assignment():
    a = chunk_assignment(10, 3)
    assert a.destination.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert a.anchor.tolist() == [1, 5, 8]
