"""Shared base of the learned compressors."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..base import CompressionResult, TokenAssignment, VisualTokens
from ..pool import PoolPlan, pool_assignment


class LearnedCompressor(nn.Module):
    """A module mapping one item's visual tokens to a fixed number of output tokens.

    Subclasses implement :meth:`output_count`, :meth:`assignment` (nominal bookkeeping) and
    :meth:`compute` (the features). ``forward`` runs in the module's parameter dtype and returns
    features in the input dtype.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    family: ClassVar[str] = "learned"
    needs_text: ClassVar[bool] = False

    def output_count(self, grid: tuple[int, ...]) -> int:
        raise NotImplementedError

    def assignment(self, grid: tuple[int, ...], device: torch.device) -> TokenAssignment:
        raise NotImplementedError

    def compute(self, tokens: VisualTokens, features: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, tokens: VisualTokens) -> CompressionResult:
        if self.needs_text and tokens.text_embeds is None:
            raise ValueError(f"{self.name!r} needs text_embeds but they were not given")
        parameter = next(self.parameters())
        features = tokens.features.to(parameter.dtype)
        out = self.compute(tokens, features)
        assignment = self.assignment(tokens.grid, tokens.features.device)
        if out.shape[0] != assignment.num_outputs:
            raise RuntimeError(f"{self.name}: {out.shape[0]} outputs but bookkeeping has {assignment.num_outputs}")
        return CompressionResult(out.to(tokens.features.dtype), assignment, assignment.sum(tokens.token_sizes()))


def chunk_assignment(n: int, k: int, device: torch.device | None = None) -> TokenAssignment:
    """``n`` tokens in raster order cut into ``k`` contiguous, near-equal chunks; anchor = chunk centre."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} tokens into {k} non-empty chunks")
    destination = torch.arange(n, device=device) * k // n
    first = (torch.arange(k, device=device) * n + k - 1) // k
    last = ((torch.arange(k, device=device) + 1) * n + k - 1) // k - 1
    return TokenAssignment(destination=destination, anchor=(first + last) // 2)


def grid_cells_assignment(
    grid: tuple[int, ...], cells: tuple[int, ...], device: torch.device | None = None
) -> TokenAssignment:
    """Partition of ``grid`` into ``cells`` (patch ``i`` -> cell ``floor(i * G / L)`` per axis)."""
    if any(c > g for c, g in zip(cells, grid, strict=True)):
        raise ValueError(f"grid {grid} is smaller than the output grid {cells}")
    plan = PoolPlan(cell_grid=tuple(cells), kept_cells=torch.arange(math.prod(cells)))
    return pool_assignment(tuple(grid), plan, device)


def spatial_grid(grid: tuple[int, ...]) -> tuple[int, int, int]:
    """``(frames, h, w)`` of an image ``(h, w)`` or video ``(t, h, w)`` grid."""
    if len(grid) == 2:
        return 1, grid[0], grid[1]
    if len(grid) == 3:
        return grid[0], grid[1], grid[2]
    raise ValueError(f"expected an (h, w) or (t, h, w) grid, got {grid}")
