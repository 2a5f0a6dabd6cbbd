"""The served MustDrop pipeline against plain re-derivations of its two stages."""

import math

import torch

from vllm_tokcomp.methods import VisualTokens, get_method


def _reference_stage2_keep(cls_attention, text_attention, budget, key_ratio=0.08, g_thr=0.001, i_thr=0.01):
    """Key set (top ceil(ratio*N) by CLS attention) first, then the dual-filter survival score, top `budget`."""
    n = cls_attention.shape[0]
    n_key = math.ceil(key_ratio * n)
    key = sorted(range(n), key=lambda i: (-float(cls_attention[i]), i))[:n_key]
    g = text_attention.sum(0)
    m = text_attention.max(0).values
    total = float(g.sum())
    score = [max(float(g[i]) / (g_thr * total), float(m[i]) / i_thr) for i in range(n)]
    rest = sorted((i for i in range(n) if i not in key), key=lambda i: (-score[i], i))
    return sorted((key + rest)[:budget])


def test_stage2_alone_keeps_key_set_then_survivors():
    torch.manual_seed(1)
    n = 144
    tokens = VisualTokens(
        torch.randn(n, 8), (12, 12), cls_attention=torch.rand(n).softmax(0), text_attention=torch.rand(5, n).softmax(1)
    )
    for budget in (10, 40, 100):
        result = get_method("mustdrop", stage1=False)(tokens, budget)
        expected = _reference_stage2_keep(tokens.cls_attention, tokens.text_attention, budget)
        assert result.assignment.anchor.tolist() == expected


def test_stage1_merges_exactly_the_uniform_windows_when_the_budget_allows():
    torch.manual_seed(2)
    grid = (12, 12)
    features = torch.randn(144, 16)
    uniform_windows = [(0, 0), (3, 6), (9, 9)]  # top-left corners of 3x3 windows painted one colour
    for r, c in uniform_windows:
        for dr in range(3):
            for dc in range(3):
                features[(r + dr) * 12 + c + dc] = torch.ones(16)
    cls = torch.full((144,), 1e-4)
    cls[[5, 50, 100, 128, 140, 20, 70, 90, 110, 30, 60, 120]] = 1.0  # key set (ceil(0.08*144)=12), off the windows
    tokens = VisualTokens(features, grid, cls_attention=cls / cls.sum())
    budget = 144 - 3 * 8
    result = get_method("mustdrop")(tokens, budget)
    assert result.num_tokens == budget
    assert sorted(result.sizes.tolist(), reverse=True)[:4] == [9.0, 9.0, 9.0, 1.0]


def test_without_text_the_rest_is_ranked_by_cls_attention():
    torch.manual_seed(3)
    tokens = VisualTokens(torch.randn(144, 8), (12, 12), cls_attention=torch.rand(144).softmax(0))
    result = get_method("mustdrop", stage1=False)(tokens, 30)
    expected = sorted(sorted(range(144), key=lambda i: (-float(tokens.cls_attention[i]), i))[:30])
    assert result.assignment.anchor.tolist() == expected
