"""DART against a plain re-derivation of the official selection loop (github.com/ZichenWen1/DART,
``get_retained_image_token``): pivots by L1 norm among the image tokens and the text tokens, then per pivot the
``TOKEN_TOPK`` remaining image tokens with the lowest cosine similarity, taken out of the candidates. The
official code runs inside the LM at layer 2 (norms of that layer's keys, similarity on its normed hidden states)
and visits the pivots in a Python set's order; the reference runs it on the features and text embeddings, the
pivots in position order, as the library's pre-LM form does. At budgets where ``TOKEN_TOPK`` is whole both keep
the same tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_tokcomp.methods import VisualTokens, get_method


def official_dart(hidden, image_len, pivot_image, pivot_text, token_topk):
    k_img, k_query = hidden[:image_len], hidden[image_len:]
    image_indices = k_img.norm(p=1, dim=-1).topk(pivot_image).indices.tolist()
    query_indices = (k_query.norm(p=1, dim=-1).topk(pivot_text).indices + image_len).tolist() if pivot_text else []
    indices_set = set(image_indices + query_indices)
    valid = set(range(image_len)) - set(image_indices)
    valid_list = list(valid)
    for item in sorted(indices_set):
        cos = -F.cosine_similarity(hidden[item], hidden[valid_list], dim=-1)
        real = [valid_list[i] for i in cos.topk(token_topk).indices.tolist()]
        indices_set.update(real)
        valid.difference_update(real)
        valid_list = list(valid)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


def case(seed, n=64, text_len=9, dim=24):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g,
                                                                                   dtype=torch.float64)
    text = torch.randn(text_len, dim, generator=g, dtype=torch.float64)
    return features, text


@pytest.mark.parametrize(("pivot_image", "pivot_text", "token_topk"), [(4, 4, 3), (4, 4, 1), (2, 3, 5), (4, 0, 6)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_with_official_loop(pivot_image, pivot_text, token_topk, seed):
    features, text = case(seed)
    budget = pivot_image + (pivot_image + pivot_text) * token_topk
    tokens = VisualTokens(features.float(), (8, 8), text_embeds=text.float() if pivot_text else None)
    method = get_method("dart", pivot_image_tokens=pivot_image, pivot_text_tokens=pivot_text)
    result = method(tokens, budget)
    expected = official_dart(torch.cat([features, text]), 64, pivot_image, pivot_text, token_topk)
    assert result.assignment.anchor.tolist() == expected
    assert torch.equal(result.features, features.float()[expected])


@pytest.mark.parametrize("budget", [5, 17, 31, 63])
def test_any_budget_is_met_exactly(budget):
    features, text = case(7)
    tokens = VisualTokens(features.float(), (8, 8), text_embeds=text.float())
    result = get_method("dart")(tokens, budget)
    assert result.num_tokens == budget and result.assignment.is_order_preserving()
    without_text = get_method("dart")(VisualTokens(features.float(), (8, 8)), budget)
    assert without_text.num_tokens == budget


def test_duplicates_of_a_pivot_are_dropped_first():
    # 16 copies of one direction and 48 distinct tokens: the copies are the most similar to the pivot among
    # them, so a budget that leaves room for the distinct ones keeps at most the pivot of the copies
    g = torch.Generator().manual_seed(3)
    copy = torch.randn(1, 16, generator=g)
    features = torch.cat([copy.expand(16, 16) * 5, torch.randn(48, 16, generator=g)])
    result = get_method("dart", pivot_image_tokens=1, pivot_text_tokens=0)(VisualTokens(features, (8, 8)), 20)
    kept = result.assignment.anchor.tolist()
    assert sum(1 for i in kept if i < 16) == 1  # the pivot (largest norm) only


def test_at_least_one_image_pivot():
    with pytest.raises(ValueError, match="pivot_image_tokens"):
        get_method("dart", pivot_image_tokens=0)
