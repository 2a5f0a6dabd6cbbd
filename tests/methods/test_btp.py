"""BTP single-stage adaptation against a loop re-derivation of the greedy balanced objective."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tokens
from vllm_tokcomp.methods import get_method


def ref_btp(attention, features, budget, balance):
    n = len(attention)
    top = max(float(a) for a in attention)
    imp = [max(float(a), 0.0) / top for a in attention]
    x = features.double()
    unit = [x[i] / x[i].norm() for i in range(n)]
    picked = [max(range(n), key=lambda i: (imp[i], -i))]
    while len(picked) < budget:
        best, best_i = None, None
        for i in range(n):
            if i in picked:
                continue
            div = min((1 - float(unit[i] @ unit[j])) / 2 for j in picked)
            gain = balance * imp[i] + (1 - balance) * div
            if best is None or gain > best + 1e-9:
                best, best_i = gain, i
        picked.append(best_i)
    return sorted(picked)


@pytest.mark.parametrize("balance", [0.0, 0.3, 0.5, 1.0])
def test_parity(balance):
    tokens = make_tokens((5, 6), seed=1)
    result = get_method("btp", balance=balance)(tokens, 9)
    assert result.assignment.anchor.tolist() == ref_btp(tokens.cls_attention, tokens.features, 9, balance)


def test_balance_one_is_attention_top_k():
    tokens = make_tokens((6, 6), seed=2)
    top = torch.sort(torch.topk(tokens.cls_attention, 10).indices).values
    assert torch.equal(get_method("btp", balance=1.0)(tokens, 10).assignment.anchor, top)


def test_diversity_prefers_distinct_clusters():
    # three tight clusters, one dominating attention: balance 0 must take one token per cluster
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(3, 16, generator=g) * 5
    features = centres.repeat_interleave(8, 0) + 0.01 * torch.randn(24, 16, generator=g)
    attention = torch.cat([torch.full((8,), 0.1), torch.full((16,), 0.001)])
    from vllm_tokcomp.methods import VisualTokens

    tokens = VisualTokens(features=features, grid=(4, 6), cls_attention=attention)
    kept = get_method("btp", balance=0.0)(tokens, 3).assignment.anchor
    assert sorted((kept // 8).tolist()) == [0, 1, 2]
    kept = get_method("btp", balance=1.0)(tokens, 3).assignment.anchor
    assert (kept // 8).tolist() == [0, 0, 0]
