"""SCOPE: saliency-coverage oriented token pruning.

Deng et al., "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodal LLMs", NeurIPS 2025
(arXiv:2510.24214); code: github.com/kinredon/SCOPE (``scope/clip_encoder.py``, ``SCOPE``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import unit_rows
from .base import Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .registry import register


@register
@dataclass(frozen=True)
class Scope(Compressor):
    """Greedy coverage of the image, each step weighted by [CLS] saliency.

    As the official code: the coverage of a set S is ``sum_j max(0, max_{s in S} cos(x_j, x_s))`` (0 for the empty
    set); each step adds the token whose coverage gain ``sum_j max(0, cos(x_j, x_i) - coverage_j)``, multiplied by
    its [CLS] attention to the power ``alpha``, is largest (ties: lower index); pure pruning, kept tokens in raster
    order. The official code compares the tower's hidden states of the feature layer (before the projector); here
    the similarity is on the features the method is given (the projector's outputs on LLaVA). Saliency is the
    feature layer's [CLS] attention (official: summed over heads; any positive scale leaves the choice unchanged).
    """

    alpha: float = knob(1.0, low=0.0, high=8.0)  # saliency exponent (the official ALPHA, 1.0)

    name = "scope"
    paper = "SCOPE, Deng et al., NeurIPS 2025, arXiv:2510.24214"
    family = "attention"
    needs_cls_attention = True
    prunes = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        unit = unit_rows(tokens.features)
        similarity = unit @ unit.T  # symmetric: column i is token i's similarity to every token j
        saliency = tokens.cls_attention.to(torch.float32).clamp_min(0) ** self.alpha
        n = similarity.shape[0]
        coverage = torch.zeros(n, device=similarity.device)
        available = torch.ones(n, dtype=torch.bool, device=similarity.device)
        kept = []
        for _ in range(budget):
            gain = (similarity - coverage[:, None]).clamp_min(0).sum(0) * saliency
            gain = gain.masked_fill(~available, float("-inf"))
            best = int(torch.argmax(gain))  # the first maximum: ties go to the lower index
            kept.append(best)
            available[best] = False
            coverage = torch.maximum(coverage, similarity[best])
        return TokenAssignment.from_kept(torch.tensor(sorted(kept), device=similarity.device), n)
