"""Spatially uniform sampling: an honest, content-blind baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Compressor, TokenAssignment, VisualTokens
from .registry import register


def uniform_indices(n: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """``k`` indices spread evenly over ``range(n)``: the centres of ``k`` equal bins."""
    return ((torch.arange(k, device=device, dtype=torch.float64) + 0.5) * n / k).floor().to(torch.long)


@register
@dataclass(frozen=True)
class UniformSampling(Compressor):
    """Keep ``budget`` tokens at evenly spaced raster positions (content-independent)."""

    name = "uniform"
    paper = "baseline (spatially uniform sampling, as used by PruMerge+ and most pruning studies)"
    family = "baseline"
    selects_by_content = False
    prunes = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        kept = uniform_indices(tokens.num_tokens, budget, tokens.features.device)
        return TokenAssignment.from_kept(kept, tokens.num_tokens)
