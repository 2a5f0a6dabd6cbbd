"""ToMe parity against a plain re-derivation of bipartite soft matching (Bolya et al., 2023, Sec. 3)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tokens
from vllm_tokcomp.methods import VisualTokens, get_method


def reference_tome(metric: torch.Tensor, features: torch.Tensor, sizes: torch.Tensor, budget: int):
    """Loops over python lists. Each token: dict(metric, feature, size, members, anchor)."""
    tokens = [
        {"m": metric[i].double(), "f": features[i].double(), "s": float(sizes[i]), "members": [i], "anchor": i}
        for i in range(metric.shape[0])
    ]
    while len(tokens) > budget:
        r = min(len(tokens) - budget, math.ceil(len(tokens) / 2))
        a_set = tokens[0::2]
        b_set = tokens[1::2]
        edges = []  # (similarity, a position in A, b position in B)
        for ia, a in enumerate(a_set):
            best, best_j = None, None
            for jb, b in enumerate(b_set):
                cos = float(a["m"] @ b["m"] / (a["m"].norm() * b["m"].norm()))
                if best is None or cos > best:
                    best, best_j = cos, jb
            edges.append((best, ia, best_j))
        edges.sort(key=lambda e: (-e[0], e[1]))
        merged = {ia: jb for _, ia, jb in edges[:r]}
        for ia, jb in sorted(merged.items()):
            a, b = a_set[ia], b_set[jb]
            total = a["s"] + b["s"]
            b["f"] = (a["f"] * a["s"] + b["f"] * b["s"]) / total
            b["m"] = (a["m"] * a["s"] + b["m"] * b["s"]) / total
            b["s"] = total
            b["members"] = b["members"] + a["members"]
        removed = {id(a_set[ia]) for ia in merged}
        tokens = [t for t in tokens if id(t) not in removed]
    return tokens


def check_parity(tokens: VisualTokens, budget: int, use_keys: bool = True):
    result = get_method("tome")(tokens, budget)
    metric = tokens.keys if use_keys else tokens.features
    ref = reference_tome(metric.float(), tokens.features.float(), tokens.token_sizes(), budget)
    assert [t["anchor"] for t in ref] == result.assignment.anchor.tolist()
    for slot, t in enumerate(ref):
        members = torch.nonzero(result.assignment.destination == slot).squeeze(1).tolist()
        assert sorted(t["members"]) == members
    expected = torch.stack([t["f"] for t in ref]).float()
    assert torch.allclose(result.features.float(), expected, atol=1e-5)
    assert torch.allclose(result.sizes, torch.tensor([t["s"] for t in ref], dtype=torch.float32))


@pytest.mark.parametrize(("grid", "budget", "seed"), [((6, 6), 20, 0), ((6, 6), 5, 1), ((2, 3, 5), 7, 2)])
def test_parity_random(grid, budget, seed):
    check_parity(make_tokens(grid, seed=seed, sizes=True), budget)


def test_parity_without_keys_uses_features():
    tokens = make_tokens((5, 6), seed=3)
    tokens = VisualTokens(features=tokens.features, grid=tokens.grid)
    check_parity(tokens, 11, use_keys=False)


def test_parity_structured_uniform_regions():
    # left half one colour, right half another, plus small noise: merges stay within each half
    g = torch.Generator().manual_seed(4)
    h, w, d = 6, 8, 16
    left, right = torch.randn(d, generator=g), torch.randn(d, generator=g)
    grid = torch.stack([left if col < w // 2 else right for _ in range(h) for col in range(w)])
    features = grid + 0.01 * torch.randn(h * w, d, generator=g)
    tokens = VisualTokens(features=features, grid=(h, w))
    for budget in (24, 12, 5, 2):
        check_parity(tokens, budget, use_keys=False)
    halves = (torch.arange(h * w) % w) >= w // 2
    for budget in (24, 12):  # while both halves still have B partners, merges never cross the edge
        result = get_method("tome")(tokens, budget)
        for slot in range(budget):
            assert halves[result.assignment.destination == slot].unique().numel() == 1


def test_one_round_removes_at_most_half():
    tokens = make_tokens((4, 4), seed=5)
    result = get_method("tome")(tokens, 8)
    # a single round of r = 8 = |A| merges every A (even) token into a B (odd) token
    assert torch.equal(result.assignment.anchor, torch.arange(1, 16, 2))


def test_keys_are_averaged_over_heads_as_the_official_code():
    # ToMe's code compares k.mean(1) (keys averaged over heads): giving the concatenated keys with key_heads
    # must decide exactly as giving the averaged keys, and differ from the concatenated keys read as one head.
    g = torch.Generator().manual_seed(5)
    n, heads, head_dim = 48, 4, 6
    per_head = torch.randn(n, heads, head_dim, generator=g)
    features = torch.randn(n, 16, generator=g)
    concatenated = per_head.reshape(n, heads * head_dim)
    with_heads = get_method("tome")(VisualTokens(features, (6, 8), keys=concatenated, key_heads=heads), 12)
    averaged = get_method("tome")(VisualTokens(features, (6, 8), keys=per_head.mean(1)), 12)
    as_one_head = get_method("tome")(VisualTokens(features, (6, 8), keys=concatenated), 12)
    assert torch.equal(with_heads.assignment.destination, averaged.assignment.destination)
    assert not torch.equal(with_heads.assignment.destination, as_one_head.assignment.destination)
