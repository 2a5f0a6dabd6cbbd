"""Random pruning and text-relevance selection against plain re-derivations."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tokens
from vllm_tokcomp.methods import get_method


def test_random_is_a_seeded_permutation_prefix():
    tokens = make_tokens((6, 6), seed=0)
    for seed in (0, 7):
        g = torch.Generator().manual_seed(seed)
        expected = sorted(torch.randperm(36, generator=g)[:10].tolist())
        assert get_method("random", seed=seed)(tokens, 10).assignment.anchor.tolist() == expected
    a = get_method("random", seed=1)(tokens, 10).assignment.anchor
    b = get_method("random", seed=2)(tokens, 10).assignment.anchor
    assert not torch.equal(a, b)


def test_random_is_content_blind():
    a = get_method("random", seed=3)(make_tokens((6, 6), seed=1), 9).assignment.anchor
    b = get_method("random", seed=3)(make_tokens((6, 6), seed=2), 9).assignment.anchor
    assert torch.equal(a, b)


def ref_text_relevance(features, text, budget, reduce):
    x, t = features.double(), text.double()
    scores = []
    for i in range(x.shape[0]):
        sims = [float(x[i] @ t[j] / (x[i].norm() * t[j].norm())) for j in range(t.shape[0])]
        scores.append(max(sims) if reduce == "max" else sum(sims) / len(sims))
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:budget])


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("budget", [1, 8, 30])
def test_text_relevance_parity(reduce, budget):
    tokens = make_tokens((6, 7), seed=budget)
    result = get_method("text_relevance", reduce=reduce)(tokens, budget)
    assert result.assignment.anchor.tolist() == ref_text_relevance(tokens.features, tokens.text_embeds, budget, reduce)


def test_text_relevance_keeps_the_described_region():
    from vllm_tokcomp.methods import VisualTokens

    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 16, generator=g)
    features = torch.randn(30, 16, generator=g)
    features[[3, 11, 12, 27]] = text[0] + 0.05 * torch.randn(4, 16, generator=g)
    tokens = VisualTokens(features=features, grid=(5, 6), text_embeds=text)
    assert get_method("text_relevance")(tokens, 4).assignment.anchor.tolist() == [3, 11, 12, 27]
