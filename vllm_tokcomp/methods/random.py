"""Random pruning: a seeded, content-blind baseline (a surprisingly strong one, per UniPruneBench)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Compressor, TokenAssignment, VisualTokens
from .knobs import MAX_SEED, knob
from .registry import register


@register
@dataclass(frozen=True)
class RandomDrop(Compressor):
    """Keep ``budget`` tokens drawn uniformly without replacement by a generator seeded with ``seed``.

    The draw depends only on ``seed`` and N, so it is deterministic and the same alone or batched.
    """

    seed: int = knob(0, low=0, high=MAX_SEED)

    name = "random"
    paper = "baseline (random pruning, e.g. UniPruneBench arXiv:2511.02650)"
    family = "baseline"
    selects_by_content = False
    prunes = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        generator = torch.Generator().manual_seed(self.seed)
        kept = torch.sort(torch.randperm(tokens.num_tokens, generator=generator)[:budget]).values
        return TokenAssignment.from_kept(kept.to(tokens.features.device), tokens.num_tokens)
