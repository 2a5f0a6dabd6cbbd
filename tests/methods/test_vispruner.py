"""VisPruner against the official selection (github.com/Theia-4869/VisPruner, ``encode_images``), written plainly:
batched torch code with the official shapes, one image, no ties (random scores), an even number of residual tokens
(the official indexing requires it)."""

import pytest
import torch

from vllm_tokcomp.methods import VisualTokens, get_method


def official_selection(features: torch.Tensor, attention: torch.Tensor, visual_token_num: int,
                       important_ratio: float) -> torch.Tensor:
    """The official loop for ``B = 1``: features ``[1, N, C]``, head-averaged [CLS] attention ``[1, N]``; returns the
    kept indices, sorted."""
    batch = features.shape[0]
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    token_indices = attention.argsort(dim=-1, descending=True)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    normalized = features / features.norm(dim=-1, keepdim=True)
    while True:
        remaining = residual_indices.shape[1]
        r = min(8, remaining - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = normalized[torch.arange(batch).unsqueeze(-1).expand(-1, remaining), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(batch).unsqueeze(-1).expand(-1, remaining // 2 - r),
                                       distinct_indices],
            residual_indices[..., 1::2],
        ], dim=-1)
    selected = torch.cat([important_indices, residual_indices], dim=-1)
    mask = torch.zeros(batch, features.shape[1], dtype=torch.bool)
    mask.scatter_(1, selected, True)
    return mask[0].nonzero().flatten()


@pytest.mark.parametrize(("budget", "ratio", "seed"), [(64, 0.5, 0), (128, 0.25, 1), (32, 0.5, 2), (192, 0.75, 3),
                                                       (16, 0.5, 4)])
def test_matches_the_official_selection(budget, ratio, seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(576, 64, generator=generator)
    attention = torch.rand(576, generator=generator).softmax(0)
    # the official code compares the tower's features: give them as the similarity source (no keys)
    tokens = VisualTokens(features=features, grid=(24, 24), cls_attention=attention)
    result = get_method("vispruner", important_ratio=ratio)(tokens, budget)
    expected = official_selection(features[None], attention[None], budget, ratio)
    assert torch.equal(result.assignment.anchor, expected)
    assert torch.equal(result.features, features[expected])


def test_keys_replace_the_features_as_the_similarity_source():
    generator = torch.Generator().manual_seed(5)
    features, keys = torch.randn(576, 64, generator=generator), torch.randn(576, 32, generator=generator)
    attention = torch.rand(576, generator=generator)
    with_keys = get_method("vispruner")(VisualTokens(features, (24, 24), cls_attention=attention, keys=keys), 64)
    expected = official_selection(keys[None], attention[None], 64, 0.5)
    assert torch.equal(with_keys.assignment.anchor, expected)


def test_all_important_is_cls_topk_and_odd_residuals_are_handled():
    generator = torch.Generator().manual_seed(6)
    tokens = VisualTokens(torch.randn(576, 16, generator=generator), (24, 24),
                          cls_attention=torch.rand(576, generator=generator))
    assert torch.equal(get_method("vispruner", important_ratio=1.0)(tokens, 40).assignment.anchor,
                       get_method("cls_topk")(tokens, 40).assignment.anchor)
    result = get_method("vispruner", important_ratio=0.5)(tokens, 46)  # 23 important: 553 residual tokens
    assert result.features.shape[0] == 46
