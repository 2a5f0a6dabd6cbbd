"""VisPruner: [CLS]-important tokens plus diverse tokens left after removing duplicates.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs", ICCV 2025
(arXiv:2412.01818 v2, the successor of FasterVLM = ``cls_topk``); code: github.com/Theia-4869/VisPruner
(``LlavaMetaForCausalLM.encode_images``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import similarity_metric, stable_argsort_desc, unit_rows
from .base import Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .registry import register


@register
@dataclass(frozen=True)
class VisPruner(Compressor):
    """Keep ``important_ratio`` of the budget by [CLS] attention, the rest by removing duplicates.

    As the official code: the ``int(budget * important_ratio)`` tokens [CLS] attends to most are kept; the others,
    in descending attention order, are thinned in rounds until ``budget - important`` remain: each round splits
    them alternately into A (even positions) and B (odd), scores every A token by its highest cosine similarity to
    any B token, and drops the ``min(step, excess)`` most similar A tokens (the survivors of A, by descending score,
    then B, form the next round's order). Similarity is on the feature layer's keys when given (as ``tome`` and
    ``visionzip`` here), else on the features; the official code compares the tower's output features.
    """

    important_ratio: float = knob(0.5, low=0.0, high=1.0)
    step: int = knob(8, low=1, high=4096)  # duplicates removed per round (the official 8)

    name = "vispruner"
    paper = "VisPruner, Zhang et al., ICCV 2025, arXiv:2412.01818 (v2)"
    family = "attention"
    needs_cls_attention = True
    uses_keys = True
    prunes = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        n = tokens.features.shape[0]
        important = int(budget * self.important_ratio)
        diverse = budget - important
        order = stable_argsort_desc(tokens.cls_attention)
        kept, residual = order[:important], order[important:]
        if diverse == 0:
            residual = residual[:0]
        unit = unit_rows(similarity_metric(tokens))
        while (excess := residual.numel() - diverse) > 0:
            drop = min(self.step, excess)
            a, b = residual[0::2], residual[1::2]
            scores = (unit[a] @ unit[b].T).max(dim=-1).values
            distinct = stable_argsort_desc(scores)[drop:]
            residual = torch.cat([a[distinct], b])
        selected = torch.cat([kept, residual]).sort().values
        return TokenAssignment.from_kept(selected, n)
