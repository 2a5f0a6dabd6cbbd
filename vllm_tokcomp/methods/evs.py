"""Efficient Video Sampling: drop video tokens that repeat the previous frame (temporal redundancy)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ScorePruner, VisualTokens
from .registry import register

FIRST_FRAME_SCORE = 255.0  # above any 1 - cosine (at most 2): the first frame goes first


@register
@dataclass(frozen=True)
class TemporalDissimilarity(ScorePruner):
    """Keep the tokens that changed most since the same position in the previous frame.

    EVS (Bagrov et al., 2025, "Efficient Video Sampling", arXiv:2510.14624; vLLM's
    ``video_pruning_rate``): a token's score is ``1 - cos(x[f, i, j], x[f-1, i, j])``; the first
    frame scores above everything, so it is kept whole before any later token; the ``budget``
    highest scores survive (ties: earlier raster index), in raster order. On a single frame
    (an image) every token ties and the first ``budget`` in raster order remain: use it for video.
    """

    name = "evs"
    paper = "EVS, arXiv:2510.14624"
    family = "similarity"

    def score(self, tokens: VisualTokens) -> Tensor:
        grid = tokens.grid
        frames = grid[0] if len(grid) == 3 else 1
        x = tokens.features.to(torch.float32).reshape(frames, -1, tokens.features.shape[-1])
        first = torch.full_like(x[:1, :, 0], FIRST_FRAME_SCORE)
        dissimilarity = 1 - F.cosine_similarity(x[1:], x[:-1], dim=-1)
        return torch.cat([first, dissimilarity], dim=0).reshape(-1)
