"""Pixel-unshuffle (space-to-depth) + MLP projector: every ``f x f`` patch block becomes one token.

As in InternVL 1.5 / 2 (Chen et al., arXiv:2404.16821) "pixel shuffle" down-sampling and the
2x2 concatenating merger of Qwen2-VL (arXiv:2409.12191).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import TokenAssignment, VisualTokens
from .base import LearnedCompressor, spatial_grid


class PixelUnshuffleMLP(LearnedCompressor):
    """Concatenate each ``factor x factor`` block (row-major within the block) and project with an MLP.

    Grids not divisible by ``factor`` are zero-padded at the bottom/right. Frames of a video are
    handled independently. Output grid ``(t, ceil(h/f), ceil(w/f))``; bookkeeping: each output
    stands for its block's real patches and sits at their centre patch.
    """

    name = "pixel_unshuffle"
    paper = "InternVL 1.5 pixel shuffle, Chen et al., arXiv:2404.16821"

    def __init__(self, in_dim: int, out_dim: int, factor: int = 2, hidden_dim: int | None = None) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor
        width = in_dim * factor * factor
        hidden = hidden_dim or out_dim
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def output_grid(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        *lead, h, w = grid
        return (*lead, math.ceil(h / self.factor), math.ceil(w / self.factor))

    def output_count(self, grid: tuple[int, ...]) -> int:
        return math.prod(self.output_grid(grid))

    def assignment(self, grid: tuple[int, ...], device: torch.device) -> TokenAssignment:
        frames, h, w = spatial_grid(grid)
        f = self.factor
        gh, gw = math.ceil(h / f), math.ceil(w / f)
        row_cell = torch.arange(h, device=device) // f
        col_cell = torch.arange(w, device=device) // f
        per_frame = (row_cell[:, None] * gw + col_cell[None, :]).reshape(-1)
        destination = (torch.arange(frames, device=device)[:, None] * gh * gw + per_frame).reshape(-1)
        rows = (
            torch.arange(gh, device=device) * f + torch.clamp(torch.arange(gh, device=device) * f + f, max=h) - 1
        ) // 2
        cols = (
            torch.arange(gw, device=device) * f + torch.clamp(torch.arange(gw, device=device) * f + f, max=w) - 1
        ) // 2
        anchor_frame = (rows[:, None] * w + cols[None, :]).reshape(-1)
        anchor = (torch.arange(frames, device=device)[:, None] * h * w + anchor_frame).reshape(-1)
        return TokenAssignment(destination=destination, anchor=anchor)

    def compute(self, tokens: VisualTokens, features: Tensor) -> Tensor:
        frames, h, w = spatial_grid(tokens.grid)
        f = self.factor
        d = features.shape[1]
        x = features.reshape(frames, h, w, d).permute(0, 3, 1, 2)
        x = F.pad(x, (0, (-w) % f, 0, (-h) % f))
        # [frames, d, H, W] -> [frames, gh, gw, f, f, d] -> rows of f*f*d (block row-major, then channels)
        gh, gw = x.shape[2] // f, x.shape[3] // f
        x = x.reshape(frames, d, gh, f, gw, f).permute(0, 2, 4, 3, 5, 1).reshape(frames * gh * gw, f * f * d)
        return self.mlp(x)
