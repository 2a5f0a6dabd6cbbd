"""C-Abstractor: convolutional blocks, adaptive pooling to a fixed grid, more blocks, projection.

Cha et al., "Honeybee: Locality-enhanced Projector for Multimodal LLM", arXiv:2312.06742.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import TokenAssignment, VisualTokens
from .base import LearnedCompressor, grid_cells_assignment, spatial_grid


class ResidualConvBlock(nn.Module):
    """A ResNet-style bottleneck-free block: conv3x3 -> GroupNorm -> SiLU -> conv3x3 -> GroupNorm, + skip."""

    def __init__(self, dim: int, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = F.silu(self.norm1(self.conv1(x)))
        return F.silu(x + self.norm2(self.conv2(y)))


class CAbstractor(LearnedCompressor):
    """``depth`` residual conv blocks -> adaptive average pool to ``out_grid`` -> ``depth`` blocks -> MLP.

    Output count ``prod(out_grid)`` per frame. Bookkeeping (nominal): the non-overlapping partition
    of the grid into ``out_grid`` cells (patch ``i`` -> cell ``floor(i * G / L)``), centre anchors,
    exactly the ``pool`` method's; the grid must be at least ``out_grid`` on each axis.
    """

    name = "c_abstractor"
    paper = "Honeybee C-Abstractor, Cha et al., arXiv:2312.06742"

    def __init__(self, in_dim: int, out_dim: int, out_grid: tuple[int, int] = (12, 12), depth: int = 1) -> None:
        super().__init__()
        self.out_grid = tuple(out_grid)
        self.stem = nn.Sequential(*(ResidualConvBlock(in_dim) for _ in range(depth)))
        self.head = nn.Sequential(*(ResidualConvBlock(in_dim) for _ in range(depth)))
        self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def output_count(self, grid: tuple[int, ...]) -> int:
        frames, _, _ = spatial_grid(grid)
        return frames * math.prod(self.out_grid)

    def assignment(self, grid: tuple[int, ...], device: torch.device) -> TokenAssignment:
        frames, h, w = spatial_grid(grid)
        return grid_cells_assignment((frames, h, w), (frames, *self.out_grid), device)

    def compute(self, tokens: VisualTokens, features: Tensor) -> Tensor:
        frames, h, w = spatial_grid(tokens.grid)
        if h < self.out_grid[0] or w < self.out_grid[1]:
            raise ValueError(f"grid {tokens.grid} is smaller than out_grid {self.out_grid}")
        d = features.shape[1]
        x = features.reshape(frames, h, w, d).permute(0, 3, 1, 2)
        x = self.head(F.adaptive_avg_pool2d(self.stem(x), self.out_grid))
        return self.proj(x.permute(0, 2, 3, 1).reshape(-1, d))
