"""SCOPE against the official selection (github.com/kinredon/SCOPE, ``scope/clip_encoder.py``: ``SCOPE`` and the
mask that feeds the kept tokens on in raster order), written plainly with the official batched shapes, ``B = 1``."""

import pytest
import torch

from vllm_tokcomp.methods import VisualTokens, get_method


def official_selection(features: torch.Tensor, cls_attn: torch.Tensor, num_selected_token: int,
                       alpha: float = 1.0) -> torch.Tensor:
    """features ``[1, N, D]``, [CLS] attention summed over heads ``[1, N]``; the kept indices, ascending."""
    norm_vectors = features / features.norm(dim=-1, keepdim=True)
    cosine_simi = torch.bmm(norm_vectors, norm_vectors.transpose(1, 2))
    batch, n = features.shape[:2]
    selected = torch.zeros(batch, n, dtype=torch.bool)
    selected_idx = torch.empty(batch, num_selected_token, dtype=torch.long)
    cur_max = torch.zeros(batch, n, dtype=features.dtype)
    cls_attn_powered = cls_attn ** alpha
    for i in range(num_selected_token):
        unselected_mask = ~selected
        gains = torch.maximum(
            torch.zeros(1, dtype=features.dtype),
            cosine_simi.masked_fill(~unselected_mask.unsqueeze(1), 0) - cur_max.unsqueeze(2),
        ).sum(dim=1)
        gains = gains * cls_attn_powered
        gains = gains.masked_fill(~unselected_mask, float("-inf"))
        best_idx = gains.argmax(dim=1)
        selected[torch.arange(batch), best_idx] = True
        selected_idx[:, i] = best_idx
        cur_max = torch.maximum(cur_max, cosine_simi[torch.arange(batch), best_idx])
    mask = torch.ones(batch, n, dtype=torch.bool).scatter_(1, selected_idx, False)
    return (~mask[0]).nonzero().flatten()


def _clustered(seed: int, n: int = 576, dim: int = 32, clusters: int = 12):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    labels = torch.randint(0, clusters, (n,), generator=generator)
    features = centres[labels] + 0.4 * torch.randn(n, dim, generator=generator)
    attention = torch.rand(n, generator=generator) ** 3  # a few salient tokens, as [CLS] attention
    return features, attention


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("budget", "alpha"), [(64, 1.0), (128, 1.0), (192, 1.0), (32, 0.5), (16, 2.0), (8, 0.0)])
def test_matches_the_official_selection(seed, budget, alpha):
    features, attention = _clustered(seed)
    expected = official_selection(features[None], attention[None], budget, alpha)
    tokens = VisualTokens(features, (24, 24), cls_attention=attention)
    result = get_method("scope", alpha=alpha)(tokens, budget)
    assert torch.equal(result.assignment.anchor, expected)
    assert torch.equal(result.features, features[expected])  # pure pruning, raster order


def test_by_hand_coverage_times_saliency():
    """Tokens e1, e1, e2, e3 with saliency 1, 2, 1, 1: the first step scores 2, 4, 1, 1 (coverage gain x saliency),
    so token 1; then token 0 adds nothing (its direction is covered) and tokens 2, 3 tie at 1: the lower index."""
    e = torch.eye(3)
    features = torch.stack([e[0], e[0], e[1], e[2]])
    tokens = VisualTokens(features, (2, 2), cls_attention=torch.tensor([1.0, 2.0, 1.0, 1.0]))
    assert get_method("scope")(tokens, 2).assignment.anchor.tolist() == [1, 2]
    assert get_method("scope")(tokens, 3).assignment.anchor.tolist() == [1, 2, 3]
