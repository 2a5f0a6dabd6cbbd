"""MustDrop stages 1 and 2 against plain loop re-derivations (Liu et al., arXiv:2411.10803)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tokens
from vllm_tokcomp.methods import VisualTokens, get_method
from vllm_tokcomp.methods.mustdrop_stages import mustdrop_key_set


def ref_key_set(cls_attention, ratio):
    n = len(cls_attention)
    k = math.ceil(ratio * n - 1e-9)
    ranked = sorted(range(n), key=lambda i: (-float(cls_attention[i]), i))
    return set(ranked[:k])


def cos(a, b):
    a, b = a.double(), b.double()
    d = float(a.norm() * b.norm())
    return float(a @ b) / d if d > 0 else 0.0


def ref_windows(grid, window):
    """List of (members, centre) per window, in raster window order, frame by frame."""
    *lead, h, w = grid
    frames = math.prod(lead) if lead else 1
    out = []
    for f in range(frames):
        for r0 in range(0, h, window):
            for c0 in range(0, w, window):
                rows = range(r0, min(r0 + window, h))
                cols = range(c0, min(c0 + window, w))
                members = [f * h * w + r * w + c for r in rows for c in cols]
                out.append((members, ((rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2)))
    return out


def ref_stage1_groups(tokens: VisualTokens, threshold=0.8, window=3, key_ratio=0.08, budget=None):
    """Returns a list of groups (lists of input indices) and the anchor of each."""
    n = tokens.num_tokens
    w = tokens.grid[-1]
    h = tokens.grid[-2]
    key = ref_key_set(tokens.cls_attention.float(), key_ratio)
    x = tokens.features.float()
    candidates = []
    for wid, (members, centre) in enumerate(ref_windows(tokens.grid, window)):
        pairs = [(a, b) for i, a in enumerate(members) for b in members[i + 1 :]]
        if not pairs:
            continue
        sim = sum(cos(x[a], x[b]) for a, b in pairs) / len(pairs)
        non_key = [m for m in members if m not in key]
        if sim >= threshold and len(non_key) >= 2:
            candidates.append((sim, wid, non_key, centre))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    anchor_of = {i: i for i in range(n)}
    remaining = None if budget is None else n - budget
    sizes = tokens.token_sizes()
    for _, _, non_key, centre in candidates:
        if remaining is not None and remaining <= 0:
            break
        if remaining is not None and len(non_key) - 1 > remaining:
            mean = sum(x[m].double() * float(sizes[m]) for m in non_key)
            ranked = sorted(non_key, key=lambda m: (-cos(x[m], mean), m))
            non_key = sorted(ranked[: remaining + 1])

        def dist(m, centre=centre):
            r, c = (m % (h * w)) // w, m % w
            return (r - centre[0]) ** 2 + (c - centre[1]) ** 2

        anchor = min(non_key, key=lambda m: (dist(m), m))
        for m in non_key:
            anchor_of[m] = anchor
        if remaining is not None:
            remaining -= len(non_key) - 1
    groups = {}
    for i in range(n):
        groups.setdefault(anchor_of[i], []).append(i)
    return [groups[a] for a in sorted(groups)], sorted(groups), key


def check_groups(result, groups, anchors, tokens):
    assert result.assignment.anchor.tolist() == anchors
    for slot, members in enumerate(groups):
        assert torch.nonzero(result.assignment.destination == slot).squeeze(1).tolist() == members
        sizes = tokens.token_sizes()[members]
        mean = (tokens.features[members].double() * sizes[:, None].double()).sum(0) / sizes.sum()
        assert torch.allclose(result.features[slot].double(), mean, atol=1e-5)


def structured_image(seed=0, h=9, w=12, uniform=(0, 2, 5, 9, 11)):
    """3x3 windows; the listed windows are one colour (tiny noise), the others random."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    features = torch.randn(h * w, d, generator=g)
    per_row = w // 3
    for wid in uniform:
        r0, c0 = (wid // per_row) * 3, (wid % per_row) * 3
        colour = torch.randn(d, generator=g)
        for r in range(r0, r0 + 3):
            for c in range(c0, c0 + 3):
                features[r * w + c] = colour + 0.01 * torch.randn(d, generator=g)
    cls_attention = torch.softmax(torch.randn(h * w, generator=g), 0)
    return VisualTokens(features=features, grid=(h, w), cls_attention=cls_attention)


def test_key_set():
    attention = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.0, 0.9, 0.3, 0.3, 0.1, 0.1])
    assert mustdrop_key_set(attention, 0.2).tolist() == [1, 5]
    assert mustdrop_key_set(attention, 0.3).tolist() == [1, 2, 5]  # ties: lower index first
    assert mustdrop_key_set(attention, 0.0).tolist() == []
    assert set(mustdrop_key_set(attention, 0.45).tolist()) == ref_key_set(attention, 0.45)


def test_stage1_merges_exactly_the_uniform_windows():
    tokens = structured_image()
    result = get_method("mustdrop_s1").compress_adaptive(tokens)
    groups, anchors, key = ref_stage1_groups(tokens)
    check_groups(result, groups, anchors, tokens)
    multi = [g for g in groups if len(g) > 1]
    windows = ref_windows(tokens.grid, 3)
    expected = [sorted(set(windows[wid][0]) - key) for wid in (0, 2, 5, 9, 11)]
    assert sorted(multi) == sorted(e for e in expected if len(e) > 1)
    # every key token stays a token of its own
    for k in key:
        assert [k] in groups


@pytest.mark.parametrize("budget", [100, 90, 80, 40, 8, 3])
def test_stage1_fixed_budget_parity(budget):
    tokens = structured_image(seed=1)
    result = get_method("mustdrop_s1")(tokens, budget)
    assert result.num_tokens == budget
    groups, anchors, key = ref_stage1_groups(tokens, budget=budget)
    if len(groups) == budget:
        check_groups(result, groups, anchors, tokens)
        return
    # beyond merging: keep keys, then the highest mean-[CLS] non-key groups
    cls = tokens.cls_attention.double()
    key_groups = [(a, g) for a, g in zip(anchors, groups, strict=True) if a in key]
    other = [(a, g) for a, g in zip(anchors, groups, strict=True) if a not in key]
    key_groups.sort(key=lambda ag: (-float(cls[ag[1]].mean()), ag[0]))
    other.sort(key=lambda ag: (-float(cls[ag[1]].mean()), ag[0]))
    kept = sorted((key_groups + other)[:budget])
    check_groups(result, [g for _, g in kept], [a for a, _ in kept], tokens)


def test_stage1_random_and_video_parity():
    for grid, threshold in (((7, 8), 0.0), ((2, 6, 5), -0.05)):
        tokens = make_tokens(grid, seed=3, sizes=True)
        method = get_method("mustdrop_s1", threshold=threshold)
        groups, anchors, _ = ref_stage1_groups(tokens, threshold=threshold)
        check_groups(method.compress_adaptive(tokens), groups, anchors, tokens)


def ref_stage2(tokens, budget=None, g_thr=0.001, i_thr=0.01, key_ratio=0.08):
    a = tokens.text_attention.double()
    t, n = a.shape
    g = [sum(float(a[j, i]) for j in range(t)) for i in range(n)]
    m = [max(float(a[j, i]) for j in range(t)) for i in range(n)]
    total = sum(g)
    key = ref_key_set(tokens.cls_attention.float(), key_ratio)
    if budget is None:
        return sorted(i for i in range(n) if i in key or not (g[i] < g_thr * total and m[i] < i_thr))
    cls = tokens.cls_attention.double()
    keys = sorted(key, key=lambda i: (-float(cls[i]), i))
    score = {i: max(g[i] / (g_thr * total), m[i] / i_thr) for i in range(n)}
    rest = sorted((i for i in range(n) if i not in key), key=lambda i: (-score[i], i))
    return sorted((keys + rest)[:budget])


@pytest.mark.parametrize("seed", [0, 1])
def test_stage2_parity(seed):
    tokens = make_tokens((6, 8), seed=seed)
    # sharpen a few text rows so that both criteria matter
    method = get_method("mustdrop_s2", global_threshold=0.02, individual_threshold=0.1)
    adaptive = method.compress_adaptive(tokens)
    expected = ref_stage2(tokens, g_thr=0.02, i_thr=0.1)
    assert adaptive.assignment.anchor.tolist() == expected
    assert 0 < len(expected) < tokens.num_tokens
    for budget in (2, 10, len(expected), 40):
        fixed = method(tokens, budget)
        assert fixed.assignment.anchor.tolist() == ref_stage2(tokens, budget, 0.02, 0.1)
    # the fixed form at the adaptive count keeps exactly the adaptive survivors
    assert method(tokens, len(expected)).assignment.anchor.tolist() == expected


def test_stage2_key_set_survives_zero_text_attention():
    tokens = make_tokens((5, 5), seed=2)
    silent = VisualTokens(
        features=tokens.features,
        grid=tokens.grid,
        cls_attention=tokens.cls_attention,
        text_attention=torch.zeros_like(tokens.text_attention),
    )
    result = get_method("mustdrop_s2").compress_adaptive(silent)
    assert result.assignment.anchor.tolist() == sorted(ref_key_set(tokens.cls_attention, 0.08))
