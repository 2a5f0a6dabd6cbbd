"""EVS (temporal dissimilarity) against vLLM's own implementation and a hand-made video."""

import pytest
import torch

from vllm_tokcomp.methods import VisualTokens, get_method


def test_static_video_keeps_the_first_frame_and_what_moved():
    frames, h, w, d = 3, 2, 2, 4
    x = torch.zeros(frames, h * w, d)
    x[:, :, 0] = 1.0  # every token the same direction...
    x[1, 3] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # ...except frame 1, token 3 (changed: 1 - cos = 1)
    x[2, 1] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # and frame 2, token 1 (1 - cos = 1 - 1/sqrt(2))
    # frame 2, token 3 turns back: also 1 - cos = 1 against frame 1
    tokens = VisualTokens(x.reshape(-1, d), (frames, h, w))
    kept = get_method("evs").select(tokens, 7).anchor.tolist()
    assert kept == [0, 1, 2, 3, 4 + 3, 8 + 1, 8 + 3]


@pytest.mark.parametrize(("frames", "side", "rate"), [(4, 6, 0.5), (8, 4, 0.75), (3, 5, 0.3)])
def test_matches_vllm_evs_retention_mask(frames, side, rate):
    """vLLM's EVS (``video_pruning_rate``) is an independent implementation of the same rule."""
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count, compute_retention_mask

    g = torch.Generator().manual_seed(frames * 100 + side)
    base = torch.randn(side * side, 16, generator=g)
    video = torch.stack([base + 0.3 * f * torch.randn(side * side, 16, generator=g) for f in range(frames)])
    video = video.reshape(-1, 16)
    merge = 2
    mask = compute_retention_mask(video, (frames, side * merge, side * merge), merge, rate)
    budget = compute_retained_tokens_count(tokens_per_frame=side * side, num_frames=frames, q=rate)
    kept = get_method("evs").select(VisualTokens(video, (frames, side, side)), budget).anchor
    assert kept.tolist() == torch.nonzero(mask).flatten().tolist()
