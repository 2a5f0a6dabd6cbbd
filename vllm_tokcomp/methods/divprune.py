"""DivPrune: keep a maximally diverse subset (max-min diversity, greedy farthest point).

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
arXiv:2503.02175 (CVPR 2025).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import first_argmax, unit_rows
from .base import Compressor, TokenAssignment, VisualTokens
from .registry import register


def farthest_point_selection(features: Tensor, budget: int) -> Tensor:
    """Greedy max-min diversity on cosine distance ``1 - cos``; returns sorted indices.

    First pick: the token farthest from its nearest other token. Then repeatedly the token whose
    distance to the nearest picked token is largest. Ties go to the lower index.
    """
    n = features.shape[0]
    unit = unit_rows(features)
    distance = 1 - unit @ unit.T
    if n > 1:
        off_diagonal = distance + torch.diag(torch.full((n,), float("inf"), device=distance.device))
        _, index = first_argmax(off_diagonal.amin(dim=1))
    else:
        index = torch.zeros((), dtype=torch.long, device=distance.device)
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    nearest = torch.full((n,), float("inf"), dtype=torch.float32, device=features.device)
    picked = []
    for step in range(budget):  # indices stay on the device: no host sync per step
        if step:
            score = torch.where(taken, torch.full_like(nearest, -float("inf")), nearest)
            _, index = first_argmax(score)
        picked.append(index)
        taken[index] = True
        nearest = torch.minimum(nearest, distance[index])
    return torch.sort(torch.stack(picked)).values


@register
@dataclass(frozen=True)
class DivPrune(Compressor):
    """Keep the ``budget`` tokens chosen by greedy max-min (farthest-point) diversity of the features."""

    name = "divprune"
    paper = "DivPrune, Alvar et al., arXiv:2503.02175"
    family = "similarity"
    prunes = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        return TokenAssignment.from_kept(farthest_point_selection(tokens.features, budget), tokens.num_tokens)
