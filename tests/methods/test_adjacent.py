"""Adjacent merging parity against a naive "scan all neighbours, merge the best pair" loop."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tokens
from vllm_tokcomp.methods import VisualTokens, get_method


def reference_adjacent(metric, features, sizes, budget, sequence):
    """Groups are lists of input indices, kept in sequence order; one merge per step."""
    groups = [[int(i)] for i in sequence]

    def mean(vectors, members):
        w = torch.tensor([float(sizes[i]) for i in members], dtype=torch.float64)
        rows = torch.stack([vectors[i].double() for i in members])
        return (rows * w[:, None]).sum(0) / w.sum()

    while len(groups) > budget:
        best, best_k = None, None
        for k in range(len(groups) - 1):
            a, b = mean(metric, groups[k]), mean(metric, groups[k + 1])
            cos = float(a @ b / (a.norm() * b.norm()))
            if best is None or cos > best + 1e-9:
                best, best_k = cos, k
        groups[best_k] = groups[best_k] + groups.pop(best_k + 1)
    anchors = [g[(len(g) - 1) // 2] for g in groups]
    return sorted(zip(anchors, groups, [mean(features, g) for g in groups], strict=True))


def check(tokens: VisualTokens, budget: int, order: str = "raster"):
    result = get_method("adjacent", order=order)(tokens, budget)
    n = tokens.num_tokens
    if order == "time" and len(tokens.grid) == 3:
        sequence = [
            t * tokens.grid[1] * tokens.grid[2] + s for s in range(n // tokens.grid[0]) for t in range(tokens.grid[0])
        ]
    else:
        sequence = list(range(n))
    metric = tokens.keys if tokens.keys is not None else tokens.features
    ref = reference_adjacent(metric, tokens.features, tokens.token_sizes(), budget, sequence)
    assert result.assignment.anchor.tolist() == [a for a, _, _ in ref]
    for slot, (_, members, feature) in enumerate(ref):
        assert sorted(members) == torch.nonzero(result.assignment.destination == slot).squeeze(1).tolist()
        assert torch.allclose(result.features[slot].double(), feature, atol=1e-5)


@pytest.mark.parametrize(("grid", "budget", "seed"), [((5, 6), 9, 0), ((4, 4), 1, 1), ((2, 3, 4), 7, 2)])
def test_parity_random(grid, budget, seed):
    check(make_tokens(grid, seed=seed, sizes=True), budget)


@pytest.mark.parametrize("budget", [6, 12, 23])
def test_parity_time_order(budget):
    check(make_tokens((4, 2, 3), seed=3), budget, order="time")


def test_structured_runs_merge_within_runs():
    # a sequence of 4 constant runs of unequal length: budget 4 recovers exactly the runs
    g = torch.Generator().manual_seed(4)
    colours = torch.randn(4, 8, generator=g)
    lengths = [5, 3, 7, 9]
    features = torch.cat([colours[i].expand(n, 8) for i, n in enumerate(lengths)])
    features = features + 1e-3 * torch.randn(features.shape, generator=g)
    tokens = VisualTokens(features=features, grid=(4, 6))
    result = get_method("adjacent")(tokens, 4)
    assert result.sizes.tolist() == [5.0, 3.0, 7.0, 9.0]
    assert result.assignment.anchor.tolist() == [2, 6, 11, 19]
    check(tokens, 4)
    check(tokens, 10)
