"""MMTok against the official selection (github.com/Ironieser/MMTok, ``mmtok/core/semantic_selector.py``:
``SemanticTokenSelector.mm_coverage_selection``, its plain-loop branch), written plainly with the official shapes."""

import pytest
import torch
import torch.nn.functional as F

from vllm_tokcomp.methods import VisualTokens, get_method


def official_selection(text_token_embedding: torch.Tensor, vision_tokens: torch.Tensor, target_vision_tokens: int,
                       alpha: float = 0.5, tv_temp: float = 0.02, vv_temp: float = 0.2) -> torch.Tensor:
    """The kept indices, ascending; ``vision_tokens`` is used for both similarities (``vision_tokens_clip`` too)."""

    def l2(x):
        return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)

    x_norm = l2(vision_tokens).float()
    x_clip_norm = l2(vision_tokens).float()
    z_norm = l2(text_token_embedding).float()
    P = z_norm @ x_norm.T
    Q = x_clip_norm @ x_clip_norm.T
    m, n = P.shape
    P = F.softmax(P * (1.0 / tv_temp), dim=1) / m
    Q = F.softmax(Q * (1.0 / vv_temp), dim=1) / n
    k_max = min(target_vision_tokens, n)
    Combined = torch.cat([P, Q * alpha], dim=0)
    best_Combined = torch.zeros(m + n, dtype=torch.float32)
    score_mask = torch.zeros(n, dtype=torch.float32)
    selected_indices = torch.empty(k_max, dtype=torch.long)
    for i in range(k_max):
        delta = (Combined - best_Combined.unsqueeze(1)).clamp_min_(0).sum(0)
        delta.add_(score_mask)
        best_idx = torch.argmax(delta)
        selected_indices[i] = best_idx
        torch.maximum(best_Combined, Combined[:, best_idx], out=best_Combined)
        score_mask[best_idx] = float("-inf")
    selected_indices, _ = selected_indices.sort()
    return selected_indices


def _scene(seed: int, n: int = 576, dim: int = 32, clusters: int = 12, words: int = 6):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    labels = torch.randint(0, clusters, (n,), generator=generator)
    features = centres[labels] + 0.4 * torch.randn(n, dim, generator=generator)
    # question tokens near a few of the image's clusters, and some unrelated ones
    text = torch.cat([centres[:words // 2] + 0.3 * torch.randn(words // 2, dim, generator=generator),
                      torch.randn(words - words // 2, dim, generator=generator)])
    return features, text


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("budget", "alpha", "tv_temp", "vv_temp"),
                         [(64, 0.5, 0.02, 0.2), (128, 0.5, 0.02, 0.2), (16, 0.5, 0.02, 0.2), (8, 2.0, 0.1, 0.05),
                          (32, 0.0, 0.02, 0.2), (32, 16.0, 1.0, 1.0)])
def test_matches_the_official_selection(seed, budget, alpha, tv_temp, vv_temp):
    features, text = _scene(seed)
    expected = official_selection(text, features, budget, alpha, tv_temp, vv_temp)
    tokens = VisualTokens(features, (24, 24), text_embeds=text)
    method = get_method("mmtok", alpha=alpha, text_temperature=tv_temp, vision_temperature=vv_temp)
    result = method(tokens, budget)
    assert torch.equal(result.assignment.anchor, expected)
    assert torch.equal(result.features, features[expected])  # pure pruning, raster order


def test_without_text_only_the_image_is_covered():
    """No question: the ``alpha * Q`` rows alone, so ``alpha`` does not change the choice (any positive scale)."""
    features, _ = _scene(7)
    tokens = VisualTokens(features, (24, 24))
    n = features.shape[0]
    unit = features / features.norm(dim=-1, keepdim=True)
    rows = F.softmax(unit @ unit.T / 0.2, dim=1) / n
    covered, kept = torch.zeros(n), []
    for _ in range(16):
        gain = (rows - covered[:, None]).clamp_min(0).sum(0)
        gain[kept] = float("-inf")
        kept.append(int(gain.argmax()))
        covered = torch.maximum(covered, rows[:, kept[-1]])
    for alpha in (0.5, 3.0):
        assert get_method("mmtok", alpha=alpha)(tokens, 16).assignment.anchor.tolist() == sorted(kept)


def test_by_hand_the_question_picks_its_token_first():
    """Four orthogonal image tokens, one question token along token 2: with ``alpha = 0`` only the question counts,
    and its softmax row puts almost all its weight on token 2; the second step gains a tiny amount from each of the
    rest, equal, so the lower index (0)."""
    features = torch.eye(4)
    tokens = VisualTokens(features, (2, 2), text_embeds=torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    assert get_method("mmtok", alpha=0.0)(tokens, 1).assignment.anchor.tolist() == [2]
    assert get_method("mmtok", alpha=0.0)(tokens, 2).assignment.anchor.tolist() == [0, 2]
