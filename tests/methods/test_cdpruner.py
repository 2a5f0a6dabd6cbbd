"""CDPruner against independent computations: the greedy MAP of the DPP computed from determinants directly
(each step the token that most increases ``log det L_S``), and the relevance and kernel written out as the official
LLaVA code forms them (negated mean cosine to the text tokens, min-max normalised; ``L = r_i S_ij r_j``)."""

from __future__ import annotations

import pytest
import torch

from vllm_tokcomp.methods import VisualTokens, get_method


def official_kernel(features, text, negate=True):
    image = features / features.norm(dim=-1, keepdim=True)
    similarity = image @ image.T
    similarity.fill_diagonal_(1.0)  # 1 up to rounding in the official code; exactly here, so ties are ties
    if text is None:
        relevance = torch.ones(features.shape[0], dtype=features.dtype)
    else:
        relevance = (image @ (text / text.norm(dim=-1, keepdim=True)).T).mean(dim=-1)
        relevance = -relevance if negate else relevance
        relevance = (relevance - relevance.min()) / (relevance.max() - relevance.min() + 1e-6)
    return relevance[:, None] * similarity * relevance[None, :]


def greedy_by_determinants(kernel, count):
    selected = []
    for _ in range(count):
        gains = []
        for i in range(kernel.shape[0]):
            if i in selected:
                gains.append(-float("inf"))
                continue
            index = torch.tensor([*selected, i])
            gains.append(float(torch.logdet(kernel[index][:, index])))
        selected.append(max(range(len(gains)), key=lambda i: (gains[i], -i)))
    return sorted(selected)


def case(seed, n=36, dim=48, text_len=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, dim, generator=g, dtype=torch.float64),
            torch.randn(text_len, dim, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("budget", [1, 5, 12, 30])
@pytest.mark.parametrize(("seed", "with_text", "negate"), [(0, True, True), (1, True, False), (2, False, True)])
def test_parity_with_determinant_greedy(budget, seed, with_text, negate):
    features, text = case(seed)
    text = text if with_text else None
    tokens = VisualTokens(features.float(), (6, 6), text_embeds=None if text is None else text.float())
    result = get_method("cdpruner", negate_relevance=negate)(tokens, budget)
    expected = greedy_by_determinants(official_kernel(features, text, negate), budget)
    assert result.assignment.anchor.tolist() == expected
    assert torch.equal(result.features, features.float()[expected])


def test_the_question_changes_the_selection():
    features, text = case(3)
    other = torch.randn(4, 48, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    first = get_method("cdpruner")(VisualTokens(features.float(), (6, 6), text_embeds=text.float()), 8)
    second = get_method("cdpruner")(VisualTokens(features.float(), (6, 6), text_embeds=other.float()), 8)
    assert first.assignment.anchor.tolist() != second.assignment.anchor.tolist()


def test_duplicates_use_up_the_rank_and_the_rest_goes_by_relevance():
    # 4 distinct directions repeated 9 times: the DPP can pick only 4 tokens (one per direction); the other slots
    # go to the most relevant remaining tokens; exactly the budget, no repeats
    g = torch.Generator().manual_seed(4)
    features = torch.randn(4, 16, generator=g).repeat(9, 1)
    result = get_method("cdpruner")(VisualTokens(features, (6, 6)), 10)
    kept = result.assignment.anchor.tolist()
    assert len(kept) == len(set(kept)) == 10
    assert {i % 4 for i in kept[:4]} == {0, 1, 2, 3}
