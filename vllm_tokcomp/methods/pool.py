"""Grid pooling and bilinear resizing of the token grid to a budget (content-independent).

Average pooling of neighbouring patches is the projector-side reduction used by e.g.
LLaVA-OneVision / Qwen2-VL-style 2x2 merges; bilinear resizing is the interpolation
used when a fixed token count must come out of a variable grid. Both honour a budget
exactly through :func:`pool_plan`.

Rules (documented in docs/methods.md):

* **Output grid.** Among grids ``g`` with ``g[i] <= grid[i]`` on every axis, pick the one with
  the fewest cells ``>= budget`` whose spatial aspect ratio ``g_h/g_w`` differs from ``h/w`` by
  at most the factor ``max_aspect_change`` (an exact factorisation ``prod(g) == budget`` is
  therefore taken when one is close enough to the aspect ratio). Ties: keep more frames (video),
  then the smaller aspect change, then the smaller ``g_h``. If no grid is within tolerance the
  tolerance is dropped.
* **Cells.** Along each axis of length ``L`` pooled to ``G`` cells, patch ``i`` falls in cell
  ``floor(i * G / L)``: a partition (it equals ``adaptive_avg_pool`` whenever ``G`` divides ``L``).
* **Anchor.** Each cell takes the position of its centre patch (per axis the lower middle
  index ``(first + last) // 2``), so outputs stay in raster order.
* **Trim.** When the chosen grid has more cells than the budget, ``budget`` cells at evenly
  spaced raster positions are kept and the patches of the other cells are dropped.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DROPPED, CompressionResult, Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .registry import register
from .uniform import uniform_indices

# A cell grid may stretch the image's aspect by at most this factor (beyond it no grid differs).
MAX_ASPECT_CHANGE = 1024.0


@dataclass(frozen=True)
class PoolPlan:
    """How a grid is pooled to a budget.

    Attributes:
        cell_grid: the pooled grid (one cell per output before trimming).
        kept_cells: raster indices of the cells that become outputs (all of them when exact).
    """

    cell_grid: tuple[int, ...]
    kept_cells: Tensor

    @property
    def exact(self) -> bool:
        """True when every cell is an output, i.e. the output is itself a grid."""
        return self.kept_cells.numel() == math.prod(self.cell_grid)


def _aspect_change(grid: tuple[int, ...], cells: tuple[int, ...]) -> float:
    if len(grid) < 2:
        return 0.0
    return abs(math.log(cells[-2] / cells[-1]) - math.log(grid[-2] / grid[-1]))


def pool_output_grid(grid: tuple[int, ...], budget: int, max_aspect_change: float = 1.5) -> tuple[int, ...]:
    """The pooled grid for ``grid`` and ``budget`` (its cell count is ``>= budget``; equal when exact).

    This is the reduced grid an integration reports to the model (e.g. Qwen's ``grid_thw``)
    when ``prod(result) == budget``; otherwise the output is a uniform subset of these cells.
    """
    grid = tuple(int(g) for g in grid)
    n = math.prod(grid)
    if budget >= n:
        return grid
    if budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget}")
    tolerance = math.log(max_aspect_change)
    best_key: tuple | None = None
    best: tuple[int, ...] = grid
    for lead in itertools.product(*(range(1, g + 1) for g in grid[:-1])):
        last = max(1, math.ceil(budget / math.prod(lead)))
        if last > grid[-1]:
            continue
        cells = (*lead, last)
        change = _aspect_change(grid, cells)
        frames = math.prod(cells[:-2]) if len(cells) > 2 else 1
        key = (change > tolerance + 1e-12, math.prod(cells), -frames, round(change, 12), cells)
        if best_key is None or key < best_key:
            best_key, best = key, cells
    return best


def pool_plan(grid: tuple[int, ...], budget: int, max_aspect_change: float = 1.5) -> PoolPlan:
    cell_grid = pool_output_grid(grid, budget, max_aspect_change)
    cells = math.prod(cell_grid)
    kept = uniform_indices(cells, min(budget, cells)) if budget < cells else torch.arange(cells)
    return PoolPlan(cell_grid=cell_grid, kept_cells=kept)


def _axis_cells(length: int, cells: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per patch its cell along one axis, and per cell its centre patch."""
    cell_of = torch.arange(length, device=device) * cells // length
    first = (torch.arange(cells, device=device) * length + cells - 1) // cells
    last = ((torch.arange(cells, device=device) + 1) * length + cells - 1) // cells - 1
    return cell_of, (first + last) // 2


def pool_assignment(grid: tuple[int, ...], plan: PoolPlan, device: torch.device | None = None) -> TokenAssignment:
    """The partition of ``grid`` into ``plan``'s cells, trimmed to the kept cells."""
    cell_index = torch.zeros((), dtype=torch.long, device=device)
    anchor_index = torch.zeros((), dtype=torch.long, device=device)
    for length, cells in zip(grid, plan.cell_grid, strict=True):
        cell_of, centre = _axis_cells(length, cells, device)
        cell_index = (cell_index[..., None] * cells + cell_of).reshape(*cell_index.shape, length)
        anchor_index = (anchor_index[..., None] * length + centre).reshape(*anchor_index.shape, cells)
    cell_index = cell_index.reshape(-1)
    anchor_index = anchor_index.reshape(-1)
    kept = plan.kept_cells.to(device)
    slot_of_cell = torch.full((math.prod(plan.cell_grid),), DROPPED, dtype=torch.long, device=device)
    slot_of_cell[kept] = torch.arange(kept.numel(), device=device)
    return TokenAssignment(destination=slot_of_cell[cell_index], anchor=anchor_index[kept])


@dataclass(frozen=True)
class _GridResize(Compressor):
    max_aspect_change: float = knob(1.5, low=1.0, high=MAX_ASPECT_CHANGE)

    family = "transformation"
    selects_by_content = False
    merges = True
    prunes = True  # only when trimming a grid that has more cells than the budget

    def plan(self, grid: tuple[int, ...], budget: int) -> PoolPlan:
        return pool_plan(grid, budget, self.max_aspect_change)

    def output_grid(self, grid: tuple[int, ...], budget: int) -> tuple[int, ...]:
        """The reduced grid for ``budget`` (see :func:`pool_output_grid`)."""
        return pool_output_grid(grid, budget, self.max_aspect_change)

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        return pool_assignment(tokens.grid, self.plan(tokens.grid, budget), tokens.features.device)


@register
@dataclass(frozen=True)
class GridPool(_GridResize):
    """Average-pool the patch grid to a grid of about ``budget`` cells (size-weighted means).

    ``budget = ceil(h/2) * ceil(w/2)`` on an even grid is exactly 2x2 average pooling.
    """

    name = "pool"
    paper = "baseline (grid average pooling, e.g. 2x2 pooling of LLaVA-OneVision video / Qwen2-VL merges)"


@register
@dataclass(frozen=True)
class BilinearResize(_GridResize):
    """Bilinearly resize the feature map to the pooled grid (trilinear for video, linear for 1-D).

    Features are ``F.interpolate(..., align_corners=False)`` samples at the cell centres, in
    float32. The assignment (same cells and anchors as ``pool``) is bookkeeping only: it gives
    each output its position and size; the interpolation weights are not size-weighted.
    """

    name = "bilinear"
    paper = "baseline (bilinear feature-map resizing, e.g. LLaVA-OneVision AnyRes feature interpolation)"

    def apply(self, tokens: VisualTokens, assignment: TokenAssignment) -> CompressionResult:
        if assignment.is_identity():
            return super().apply(tokens, assignment)
        plan = self.plan(tokens.grid, assignment.num_outputs)
        features = resize_grid(tokens.features, tokens.grid, plan.cell_grid)
        features = features[plan.kept_cells.to(features.device)].to(tokens.features.dtype)
        return CompressionResult(features, assignment, assignment.sum(tokens.token_sizes()))


def resize_grid(features: Tensor, grid: tuple[int, ...], out_grid: tuple[int, ...]) -> Tensor:
    """``[prod(grid), D]`` -> ``[prod(out_grid), D]`` by (bi/tri)linear interpolation in float32."""
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}.get(len(grid))
    if mode is None:
        raise ValueError(f"bilinear resizing supports 1-3 grid axes, got grid {grid}")
    d = features.shape[1]
    x = features.to(torch.float32).T.reshape(1, d, *grid)
    y = F.interpolate(x, size=tuple(out_grid), mode=mode, align_corners=False)
    return y.reshape(d, -1).T
