"""Balanced Token Pruning, adapted to a single decision before the LM.

Li et al., "Balanced Token Pruning: Accelerating Vision Language Models Beyond Local
Optimization", arXiv:2505.22038 (NeurIPS 2025). BTP prunes in several LM stages, weighting
diversity (good for later layers) in early stages and attention (local output consistency)
in late ones. With one pre-LM decision the stage schedule collapses to one knob.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import first_argmax, unit_rows
from .base import Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .registry import register


def balanced_selection(importance: Tensor, features: Tensor, budget: int, balance: float) -> Tensor:
    """Greedy pick of ``budget`` tokens maximising ``balance * imp + (1 - balance) * div``.

    ``imp`` is the importance scaled to ``[0, 1]`` by its maximum; ``div`` is the cosine distance
    ``(1 - cos) / 2`` to the nearest already-picked token. The first pick is the most important
    token. Ties go to the lower index. Returns the picked indices in ascending order.
    """
    n = features.shape[0]
    imp = importance.to(torch.float32).clamp_min(0)
    imp = imp / imp.max() if float(imp.max()) > 0 else torch.zeros_like(imp)
    unit = unit_rows(features)
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    nearest = torch.full((n,), float("inf"), dtype=torch.float32, device=features.device)
    _, index = first_argmax(imp)
    picked = []
    for step in range(budget):  # indices stay on the device: no host sync per step
        if step:
            gain = balance * imp + (1 - balance) * nearest
            gain = torch.where(taken, torch.full_like(gain, -float("inf")), gain)
            _, index = first_argmax(gain)
        picked.append(index)
        taken[index] = True
        distance = (1 - unit @ unit[index]) / 2
        nearest = torch.minimum(nearest, distance)
    return torch.sort(torch.stack(picked)).values


@register
@dataclass(frozen=True)
class BalancedTokenPruning(Compressor):
    """BTP as one pre-LM decision: greedy selection balancing [CLS]-attention importance and diversity.

    ``balance`` = 1 is attention top-k (the paper's late-stage, local objective); ``balance`` = 0 is
    max-min feature diversity (its early-stage, global objective). The default 0.5 weighs both.
    """

    balance: float = knob(0.5, low=0.0, high=1.0)

    name = "btp"
    paper = "Balanced Token Pruning, Li et al., arXiv:2505.22038 (single-stage adaptation)"
    family = "attention"
    needs_cls_attention = True
    prunes = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        kept = balanced_selection(tokens.cls_attention, tokens.features, budget, float(self.balance))
        return TokenAssignment.from_kept(kept, tokens.num_tokens)
