"""PruMerge / PruMerge+ against a loop re-derivation (Shang et al., arXiv:2403.15388)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tokens
from vllm_tokcomp.methods import VisualTokens, get_method


def ref_quantile(values, q):
    v = sorted(float(x) for x in values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def ref_outliers(attention, factor=1.5):
    q1, q3 = ref_quantile(attention, 0.25), ref_quantile(attention, 0.75)
    kept = [i for i, a in enumerate(attention.tolist()) if a > q3 + factor * (q3 - q1)]
    return kept or [max(range(len(attention)), key=lambda i: (float(attention[i]), -i))]


def ref_top(attention, k):
    return sorted(sorted(range(len(attention)), key=lambda i: (-float(attention[i]), i))[:k])


def ref_uniform_fill(n, dominant, extra):
    rest = [i for i in range(n) if i not in set(dominant)]
    extra = min(extra, len(rest))
    return sorted(dominant + [rest[int((k + 0.5) * len(rest) / extra)] for k in range(extra)])


def ref_merge(tokens: VisualTokens, kept):
    metric = (tokens.keys if tokens.keys is not None else tokens.features).double()
    attention = tokens.cls_attention.double()
    sizes = tokens.token_sizes().double()
    groups = {k: [k] for k in kept}
    for i in range(tokens.num_tokens):
        if i in groups:
            continue
        sims = [float(metric[i] @ metric[k] / (metric[i].norm() * metric[k].norm())) for k in kept]
        best = max(range(len(kept)), key=lambda j: (sims[j], -j))
        groups[kept[best]].append(i)
    features = []
    for k in kept:
        members = groups[k]
        w = torch.stack([sizes[m] * (attention[m] + 1e-12) for m in members])
        rows = tokens.features[members].double()
        features.append((rows * w[:, None]).sum(0) / w.sum())
    return [sorted(groups[k]) for k in kept], torch.stack(features)


def check(result, tokens, kept):
    groups, features = ref_merge(tokens, kept)
    assert result.assignment.anchor.tolist() == kept
    for slot, members in enumerate(groups):
        assert torch.nonzero(result.assignment.destination == slot).squeeze(1).tolist() == members
    assert torch.allclose(result.features.double(), features, atol=1e-5)


def peaked_tokens(seed):
    """Random tokens whose [CLS] attention has a few clear outliers (as CLIP's does)."""
    tokens = make_tokens((8, 8), seed=seed, sizes=True)
    g = torch.Generator().manual_seed(seed)
    attention = torch.rand(64, generator=g) * 0.01
    attention[torch.randperm(64, generator=g)[:5]] += torch.rand(5, generator=g) + 0.5
    return VisualTokens(
        features=tokens.features,
        grid=tokens.grid,
        cls_attention=attention / attention.sum(),
        keys=tokens.keys,
        sizes=tokens.sizes,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prumerge_adaptive_parity(seed):
    tokens = peaked_tokens(seed)
    kept = ref_outliers(tokens.cls_attention)
    assert len(kept) == 5
    check(get_method("prumerge").compress_adaptive(tokens), tokens, kept)


@pytest.mark.parametrize("budget", [1, 5, 17])
def test_prumerge_fixed_parity(budget):
    tokens = make_tokens((6, 7), seed=3)
    check(get_method("prumerge")(tokens, budget), tokens, ref_top(tokens.cls_attention, budget))


def test_prumerge_without_keys_uses_features():
    tokens = peaked_tokens(4)
    tokens = VisualTokens(features=tokens.features, grid=tokens.grid, cls_attention=tokens.cls_attention)
    check(get_method("prumerge")(tokens, 9), tokens, ref_top(tokens.cls_attention, 9))


def test_prumerge_plus_parity():
    tokens = peaked_tokens(5)
    outliers = ref_outliers(tokens.cls_attention)
    adaptive = get_method("prumerge_plus").compress_adaptive(tokens)
    kept = ref_uniform_fill(64, outliers, 3 * len(outliers))
    check(adaptive, tokens, kept)
    assert adaptive.num_tokens == 20
    for budget in (20, 8, 33):
        dominant_count = min(budget, max(1, round(budget * 5 / 20)))
        dominant = sorted(range(64), key=lambda i: (-float(tokens.cls_attention[i]), i))[:dominant_count]
        kept = ref_uniform_fill(64, dominant, budget - dominant_count)
        check(get_method("prumerge_plus")(tokens, budget), tokens, kept)


def test_uniform_attention_keeps_one():
    tokens = make_tokens((4, 4), seed=6)
    flat = VisualTokens(features=tokens.features, grid=(4, 4), cls_attention=torch.full((16,), 1 / 16))
    result = get_method("prumerge").compress_adaptive(flat)
    assert result.num_tokens == 1
    assert torch.allclose(result.features[0], tokens.features.mean(0), atol=1e-6)
