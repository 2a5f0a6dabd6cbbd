"""VScan's first stage against the official code (github.com/Tencent/SelfEvolvingAgent, ``VScan/llava/model/
llava_arch.py``: ``window_cls_selection``, the scans in ``encode_images`` and ``token_merging``), written plainly with
the official shapes, ``B = 1``."""

import pytest
import torch
import torch.nn.functional as F

from vllm_tokcomp.methods import VisualTokens, get_method
from vllm_tokcomp.methods.vscan import shallow_layer_index


def official_window_cls_selection(image_attentions, visual_token_num, window_size=6):
    B, N = image_attentions.shape
    H = W = 24
    attn_map = image_attentions.view(B, H, W)
    num_windows_h, num_windows_w = H // window_size, W // window_size
    k = visual_token_num // (num_windows_h * num_windows_w)
    token_indices = []
    for b in range(B):
        indices_b = []
        for i in range(num_windows_h):
            for j in range(num_windows_w):
                window = attn_map[b, i * window_size:(i + 1) * window_size, j * window_size:(j + 1) * window_size]
                _, topk_indices = torch.topk(window.reshape(-1), k)
                for idx in topk_indices:
                    dy, dx = divmod(idx.item(), window_size)
                    indices_b.append((i * window_size + dy) * W + j * window_size + dx)
        token_indices.append(indices_b)
    return torch.tensor(token_indices, dtype=torch.long).reshape(B, -1)


def official_token_merging(image_features, index_mask, scaling=1):
    B, N, D = image_features.shape
    T = index_mask.sum(dim=1)
    retained = torch.stack([image_features[b][index_mask[b]] for b in range(B)])
    non_retained = torch.stack([image_features[b][~index_mask[b]] for b in range(B)])
    if non_retained.shape[1] == 0:
        return image_features
    cosine_sim = F.cosine_similarity(non_retained.unsqueeze(2), retained.unsqueeze(1), dim=3)
    nearest = cosine_sim.argmax(dim=2)
    merge_count = torch.zeros(B, T[0], dtype=torch.int)
    merged = torch.zeros_like(retained) + retained * scaling
    merged.scatter_add_(1, nearest.unsqueeze(-1).expand(-1, -1, D), non_retained)
    merge_count.scatter_add_(1, nearest, torch.ones_like(nearest, dtype=merge_count.dtype))
    merged /= scaling + merge_count.unsqueeze(2)
    out = image_features.clone()
    for b in range(B):
        out[b, index_mask[b]] = merged[b]
    return out


def official_stage1(features, shallow, deep, visual_token_num):
    """The kept indices and the merged kept features, ``[1, N, D]`` / ``[1, N]`` inputs."""
    local_indices = official_window_cls_selection(shallow, int(visual_token_num * 0.5), window_size=6)
    deep = deep.clone()
    deep[0, local_indices[0]] = 0
    global_indices = torch.topk(deep, k=visual_token_num - int(visual_token_num * 0.5), dim=1)[1]
    token_indices = torch.cat((local_indices, global_indices), dim=1)
    index_mask = torch.zeros(1, features.shape[1], dtype=torch.bool).scatter_(1, token_indices, True)
    merged = official_token_merging(features.clone(), index_mask)
    kept = index_mask[0].nonzero().flatten()
    return kept, merged[0, kept]


def _scene(seed: int, n: int = 576, dim: int = 32, clusters: int = 12, layers: int = 23):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    labels = torch.randint(0, clusters, (n,), generator=generator)
    features = centres[labels] + 0.4 * torch.randn(n, dim, generator=generator)
    attention = torch.softmax(3 * torch.randn(layers, n, generator=generator), dim=1)  # [CLS] rows, positive
    return features, attention


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [192, 128, 64, 32])  # the budgets where 16 windows divide the local half
def test_matches_the_official_first_stage(seed, budget):
    features, attention = _scene(seed)
    shallow, deep = attention[5], attention[-1]  # CLIP-L up to LLaVA's feature layer: 23 layers, VScan's 6th
    kept, merged = official_stage1(features[None], shallow[None], deep[None], budget)
    tokens = VisualTokens(features, (24, 24), cls_attention=deep, layer_cls_attention=attention)
    result = get_method("vscan")(tokens, budget)
    assert torch.equal(result.assignment.anchor, kept)
    assert torch.allclose(result.features, merged, atol=1e-5)


@pytest.mark.parametrize("budget", [16, 8])
def test_where_the_windows_do_not_divide_the_local_share_the_global_scan_takes_the_rest(budget):
    """The official code keeps ``(budget // 2) // 16 * 16 + budget - budget // 2`` tokens (0 local at 16 and 8); here
    the same local tokens (none) and the global scan fills the budget: the top ``budget`` by the deep attention."""
    features, attention = _scene(9)
    tokens = VisualTokens(features, (24, 24), cls_attention=attention[-1], layer_cls_attention=attention)
    result = get_method("vscan")(tokens, budget)
    assert result.assignment.anchor.tolist() == sorted(torch.topk(attention[-1], budget).indices.tolist())


def test_shallow_layer_follows_the_tower_depth():
    assert shallow_layer_index(23, 0.25) == 5  # CLIP-L up to layer -2, VScan's layer
    assert shallow_layer_index(2, 0.25) == 0  # the tiny tower
    assert shallow_layer_index(23, 1.0) == 22 and shallow_layer_index(23, 0.0) == 0


def test_by_hand_on_a_4x4_grid():
    """2 x 2 windows, budget 8, half local: one token per window by the shallow row (its maxima 0, 3, 12, 15), then
    the four best remaining by the deep row (0 is already kept, so 5, 10, 6, 9)."""
    shallow = torch.zeros(16)
    shallow[[0, 3, 12, 15]] = 1.0
    deep = torch.zeros(16)
    deep[[0, 5, 10, 6, 9, 1]] = torch.tensor([9.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    tokens = VisualTokens(torch.eye(16), (4, 4), cls_attention=deep, layer_cls_attention=torch.stack([shallow, deep]))
    result = get_method("vscan", window=2, shallow_depth=0.5)(tokens, 8)
    assert result.assignment.anchor.tolist() == [0, 3, 5, 6, 9, 10, 12, 15]
    # with budget 6 the local share (3) is less than one token per window: no local token, all global
    assert get_method("vscan", window=2, shallow_depth=0.5)(tokens, 6).assignment.anchor.tolist() == [0, 1, 5, 6, 9,
                                                                                                     10]
