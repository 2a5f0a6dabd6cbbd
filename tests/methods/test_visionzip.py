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
