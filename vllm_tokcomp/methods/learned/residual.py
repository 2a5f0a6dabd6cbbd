"""A learned compressor trained as a correction on top of the mean of each output's nominal inputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..base import TokenAssignment, VisualTokens
from .base import LearnedCompressor


class MeanResidual(LearnedCompressor):
    """``inner``'s outputs plus, per output, the mean of the input tokens its bookkeeping assigns to it.

    With :meth:`start_at_mean` (the inner module's last linear layer zeroed) the module starts as
    exactly that mean: for ``PixelUnshuffleMLP(factor=3)`` and ``CAbstractor(out_grid=(8, 8))`` on a
    24 x 24 grid the registry's ``pool`` at 64 tokens. A connector trained this way (the rest of the
    model frozen) starts where the training-free row stands, so its gain is what learning adds.
    """

    family = "learned"

    def __init__(self, inner: LearnedCompressor) -> None:
        super().__init__()
        self.inner = inner
        self.name = f"{inner.name}+mean"
        self.paper = inner.paper
        self.needs_text = inner.needs_text

    def output_count(self, grid: tuple[int, ...]) -> int:
        return self.inner.output_count(grid)

    def assignment(self, grid: tuple[int, ...], device: torch.device) -> TokenAssignment:
        return self.inner.assignment(grid, device)

    def compute(self, tokens: VisualTokens, features: Tensor) -> Tensor:
        mean = self.inner.assignment(tokens.grid, features.device).merge(features)
        return mean + self.inner.compute(tokens, features)

    def start_at_mean(self) -> MeanResidual:
        """Zero the inner module's last linear layer (its output projection), so the module returns the mean."""
        linears = [m for m in self.inner.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{self.inner.name} has no linear output layer to zero")
        nn.init.zeros_(linears[-1].weight)
        if linears[-1].bias is not None:
            nn.init.zeros_(linears[-1].bias)
        return self
