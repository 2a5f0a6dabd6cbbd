"""VisionZip against a plain re-derivation of the official code (dvlab-research/VisionZip,
``visionzip/clip_encoder.py``, ``CLIPVisionTower_VisionZip.forward``).

The reference follows the official batched tensor steps on one image: dominant tokens by the
[CLS] row of the attention (summed over heads), the rest filtered in raster order, targets
``arange(0, R, R // C)[:C]``, the others assigned by ``argmax`` of the cosine of the head-averaged keys
(``raw_key_states.mean(1)``), and ``contextual = target_hidden + bmm(one_hot.T, hidden) / counts``. Two
differences are outside the method and left out of the reference: the official tower keeps the [CLS]
token among the dominant ones (LLaVA in vLLM feeds patch tokens only), and it emits dominant then
contextual tokens (here: raster order of anchors), so outputs are compared by anchor.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tokens
from vllm_tokcomp.methods import VisualTokens, get_method
from vllm_tokcomp.methods.visionzip import contextual_targets


def official_visionzip(hidden, cls_attention_per_head, keys_per_head, dominant_num, contextual_num):
    """One image: ``hidden [N, D]``, ``cls_attention_per_head [H, N]``, ``keys_per_head [H, N, d]``.
    Returns ``{anchor: (members, feature)}`` (members include the anchor)."""
    n = hidden.shape[0]
    metric = keys_per_head.mean(0)  # raw_key_states.mean(1) for one image
    cls_attention_sum = cls_attention_per_head.sum(0)
    topk_indices = cls_attention_sum.topk(dominant_num).indices
    mask = torch.ones(n, dtype=torch.bool).scatter_(0, topk_indices, False)
    out = {int(i): ([int(i)], hidden[i]) for i in torch.nonzero(~mask).squeeze(1)}
    if contextual_num == 0:
        return out
    kept_index = torch.nonzero(mask).squeeze(1)
    metric_filtered = metric[mask]
    hidden_filtered = hidden[mask]
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[0] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[0], step)[:contextual_num]
    target_tokens = metric_normalized[target_indices]
    not_target = ~torch.isin(torch.arange(metric_normalized.shape[0]), target_indices)
    similarity = metric_normalized[not_target] @ target_tokens.T
    assign_one_hot = torch.zeros(int(not_target.sum()), contextual_num, dtype=hidden.dtype)
    assign_one_hot.scatter_(1, similarity.argmax(dim=1).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
    aggregated = assign_one_hot.T @ hidden_filtered[not_target] / counts
    contextual = hidden_filtered[target_indices] + aggregated
    member_index = kept_index[not_target]
    choice = similarity.argmax(dim=1)
    for slot, t in enumerate(target_indices):
        anchor = int(kept_index[t])
        members = sorted([anchor] + [int(m) for m, c in zip(member_index, choice, strict=True) if int(c) == slot])
        out[anchor] = (members, contextual[slot])
    return out


def _heads_case(seed: int, grid=(7, 7), heads=4, head_dim=8, dim=24):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    hidden = torch.randn(n, dim, generator=g, dtype=torch.float64)
    per_head = torch.softmax(2 * torch.randn(heads, n, generator=g, dtype=torch.float64), dim=1)
    keys_per_head = torch.randn(heads, n, head_dim, generator=g, dtype=torch.float64)
    tokens = VisualTokens(
        features=hidden.float(), grid=grid, cls_attention=per_head.mean(0).float(),
        keys=keys_per_head.permute(1, 0, 2).reshape(n, heads * head_dim).float(), key_heads=heads,
    )
    return tokens, hidden, per_head, keys_per_head


@pytest.mark.parametrize(("budget", "ratio"), [(16, 54 / 64), (10, 0.5), (8, 1.0), (5, 0.0), (20, 0.3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_official_code(budget, ratio, seed):
    tokens, hidden, per_head, keys_per_head = _heads_case(seed + 10 * budget)
    result = get_method("visionzip", dominant_ratio=ratio)(tokens, budget)
    dominant = min(budget, max(0, round(ratio * budget)))
    expected = official_visionzip(hidden, per_head, keys_per_head, dominant, budget - dominant)
    assert result.assignment.anchor.tolist() == sorted(expected)
    for slot, anchor in enumerate(result.assignment.anchor.tolist()):
        members, feature = expected[anchor]
        assert torch.nonzero(result.assignment.destination == slot).squeeze(1).tolist() == members
        assert torch.allclose(result.features[slot].double(), feature, atol=1e-5)
        assert result.sizes[slot] == len(members)


def test_official_target_spacing():
    assert contextual_targets(30, 4).tolist() == [0, 7, 14, 21]
    assert contextual_targets(10, 10).tolist() == list(range(10))
    assert contextual_targets(11, 3).tolist() == [0, 3, 6]
    # VisionZip's LLaVA-1.5 setting: 576 - 54 = 522 remaining, 10 contextual -> every 52nd from the first
    assert contextual_targets(522, 10).tolist() == list(range(0, 522, 52))[:10]


def test_head_averaged_keys_decide_the_groups():
    # Concatenated keys would pick other targets here: two heads that cancel in the mean.
    tokens, hidden, per_head, keys_per_head = _heads_case(3, heads=2)
    averaged = VisualTokens(features=tokens.features, grid=tokens.grid, cls_attention=tokens.cls_attention,
                            keys=keys_per_head.mean(0).float())
    with_heads = get_method("visionzip")(tokens, 12)
    assert torch.equal(with_heads.assignment.destination, get_method("visionzip")(averaged, 12).assignment.destination)
    concatenated = VisualTokens(features=tokens.features, grid=tokens.grid, cls_attention=tokens.cls_attention,
                                keys=tokens.keys)
    assert not torch.equal(with_heads.assignment.destination,
                           get_method("visionzip")(concatenated, 12).assignment.destination)


def test_mean_option_is_the_size_weighted_group_mean():
    tokens = make_tokens((7, 7), seed=4, sizes=True)
    official = get_method("visionzip", dominant_ratio=0.5)(tokens, 10)
    result = get_method("visionzip", dominant_ratio=0.5, contextual_merge="mean")(tokens, 10)
    assert torch.equal(result.assignment.destination, official.assignment.destination)
    sizes = tokens.token_sizes().double()
    for slot in range(10):
        members = torch.nonzero(result.assignment.destination == slot).squeeze(1)
        mean = (tokens.features[members].double() * sizes[members, None]).sum(0) / sizes[members].sum()
        assert torch.allclose(result.features[slot].double(), mean, atol=1e-5)
    assert torch.equal(result.sizes, official.sizes)


def test_structured_clusters_merge_into_their_own_target():
    # 4 dominant tokens with high attention; the other 32 come from 2 colour clusters laid out in two halves:
    # the 2 contextual targets (remaining positions 0 and 16, one per half) each absorb exactly their cluster
    g = torch.Generator().manual_seed(0)
    colours = torch.randn(2, 16, generator=g)
    features = torch.cat([colours[0].expand(18, 16), colours[1].expand(18, 16)]) + 0.01 * torch.randn(
        36, 16, generator=g
    )
    attention = torch.full((36,), 0.01)
    attention[[0, 1, 34, 35]] = 1.0
    tokens = VisualTokens(features=features, grid=(6, 6), cls_attention=attention)
    result = get_method("visionzip", dominant_ratio=4 / 6)(tokens, 6)
    assert result.assignment.anchor.tolist() == [0, 1, 2, 18, 34, 35]
    assert result.sizes.tolist() == [1.0, 1.0, 16.0, 16.0, 1.0, 1.0]
    # official merge: the target plus the mean of its 15 members, about twice the cluster colour
    assert torch.allclose(result.features[2], 2 * colours[0], atol=0.05)
