"""PuMer (image side) against a loop re-derivation: text-informed pruning, then bipartite merging."""

from __future__ import annotations

import math

import pytest
import torch
from test_tome import reference_tome

from conftest import make_tokens
from vllm_tokcomp.methods import VisualTokens, get_method


def ref_relevance(features, text):
    d = features.shape[1]
    n = features.shape[0]
    relevance = [0.0] * n
    for t in text.double():
        logits = [float(t @ features[i].double()) / math.sqrt(d) for i in range(n)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        total = sum(exps)
        for i in range(n):
            relevance[i] += exps[i] / total / text.shape[0]
    return relevance


@pytest.mark.parametrize(("budget", "share"), [(10, 0.5), (20, 0.0), (7, 1.0), (3, 0.3)])
def test_parity(budget, share):
    tokens = make_tokens((6, 6), seed=budget, sizes=True)
    result = get_method("pumer", prune_share=share)(tokens, budget)
    n = tokens.num_tokens
    pruned = round(share * (n - budget))
    relevance = ref_relevance(tokens.features, tokens.text_embeds)
    kept = sorted(sorted(range(n), key=lambda i: (-relevance[i], i))[: n - pruned])
    merged = reference_tome(tokens.keys[kept], tokens.features[kept], tokens.token_sizes()[kept], budget)
    assert result.assignment.anchor.tolist() == [kept[t["anchor"]] for t in merged]
    for slot, t in enumerate(merged):
        members = sorted(kept[m] for m in t["members"])
        assert torch.nonzero(result.assignment.destination == slot).squeeze(1).tolist() == members
    assert torch.allclose(result.features.double(), torch.stack([t["f"] for t in merged]), atol=1e-5)


def test_prunes_the_text_irrelevant_region():
    # half the image matches the text direction; with prune_share=1 only that half survives
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 16, generator=g)
    features = torch.randn(32, 16, generator=g) * 0.1
    features[:16] += 2 * text[0]
    tokens = VisualTokens(features=features, grid=(4, 8), text_embeds=text)
    result = get_method("pumer", prune_share=1.0)(tokens, 16)
    assert result.assignment.anchor.tolist() == list(range(16))
