"""VisionZip against a loop re-derivation: dominant by [CLS] attention, contextual by key similarity."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokens

from vllm_tokcomp.methods import get_method


def ref_visionzip(tokens, budget, ratio):
    n = tokens.num_tokens
    attention = tokens.cls_attention.tolist()
    dominant_count = min(budget, max(0, round(ratio * budget)))
    dominant = sorted(range(n), key=lambda i: (-attention[i], i))[:dominant_count]
    groups = {d: [d] for d in dominant}
    contextual = budget - dominant_count
    if contextual:
        rest = [i for i in range(n) if i not in groups]
        targets = [rest[int((k + 0.5) * len(rest) / contextual)] for k in range(contextual)]
        for t in targets:
            groups[t] = [t]
        k = tokens.keys.double()
        for i in rest:
            if i in targets:
                continue
            sims = [float(k[i] @ k[t] / (k[i].norm() * k[t].norm())) for t in targets]
            best = max(range(contextual), key=lambda j: (sims[j], -j))
            groups[targets[best]].append(i)
    return [(a, sorted(groups[a])) for a in sorted(groups)]


@pytest.mark.parametrize(("budget", "ratio"), [(16, 54 / 64), (10, 0.5), (8, 1.0), (5, 0.0)])
def test_parity(budget, ratio):
    tokens = make_tokens((7, 7), seed=budget, sizes=True)
    result = get_method("visionzip", dominant_ratio=ratio)(tokens, budget)
    expected = ref_visionzip(tokens, budget, ratio)
    assert result.assignment.anchor.tolist() == [a for a, _ in expected]
    sizes = tokens.token_sizes().double()
    for slot, (_, members) in enumerate(expected):
        assert torch.nonzero(result.assignment.destination == slot).squeeze(1).tolist() == members
        mean = (tokens.features[members].double() * sizes[members, None]).sum(0) / sizes[members].sum()
        assert torch.allclose(result.features[slot].double(), mean, atol=1e-5)
    if ratio == 1.0:
        assert int((result.assignment.destination >= 0).sum()) == budget


def test_structured_clusters_merge_into_their_own_target():
    # 4 dominant tokens with high attention; the other 32 come from 2 colour clusters laid out
    # in two halves, so the 2 contextual targets (one per half) each absorb exactly their cluster
    from vllm_tokcomp.methods import VisualTokens

    g = torch.Generator().manual_seed(0)
    colours = torch.randn(2, 16, generator=g)
    features = torch.cat([colours[0].expand(18, 16), colours[1].expand(18, 16)]) + 0.01 * torch.randn(
        36, 16, generator=g
    )
    attention = torch.full((36,), 0.01)
    attention[[0, 1, 34, 35]] = 1.0
    tokens = VisualTokens(features=features, grid=(6, 6), cls_attention=attention)
    result = get_method("visionzip", dominant_ratio=4 / 6)(tokens, 6)
    expected = ref_visionzip(
        VisualTokens(features=features, grid=(6, 6), cls_attention=attention, keys=features), 6, 4 / 6
    )
    assert result.assignment.anchor.tolist() == [a for a, _ in expected]
    assert result.sizes.tolist() == [1.0, 1.0, 16.0, 16.0, 1.0, 1.0]
