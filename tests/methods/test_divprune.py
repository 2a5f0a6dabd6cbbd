"""DivPrune against a loop re-derivation of greedy max-min (farthest point) selection."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tokens
from vllm_tokcomp.methods import VisualTokens, get_method


def ref_divprune(features, budget):
    n = features.shape[0]
    x = features.double()
    unit = [x[i] / x[i].norm() for i in range(n)]

    def dist(i, j):
        return 1 - float(unit[i] @ unit[j])

    first = max(range(n), key=lambda i: (min(dist(i, j) for j in range(n) if j != i), -i))
    picked = [first]
    while len(picked) < budget:
        scores = {i: min(dist(i, j) for j in picked) for i in range(n) if i not in picked}
        picked.append(max(scores, key=lambda i: (scores[i], -i)))
    return sorted(picked)


@pytest.mark.parametrize(("grid", "budget"), [((5, 6), 7), ((4, 4), 1), ((2, 3, 4), 12)])
def test_parity(grid, budget):
    tokens = make_tokens(grid, seed=budget)
    result = get_method("divprune")(tokens, budget)
    assert result.assignment.anchor.tolist() == ref_divprune(tokens.features, budget)


def test_one_per_cluster():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g)
    features = centres.repeat(6, 1) + 0.01 * torch.randn(24, 8, generator=g)  # cluster = index % 4
    result = get_method("divprune")(VisualTokens(features=features, grid=(4, 6)), 4)
    assert sorted((result.assignment.anchor % 4).tolist()) == [0, 1, 2, 3]
