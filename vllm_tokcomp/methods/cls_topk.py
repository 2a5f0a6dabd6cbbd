"""CLS-attention top-k pruning (FastV-style importance, FasterVLM's [CLS] form)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import ScorePruner, VisualTokens
from .registry import register


@register
@dataclass(frozen=True)
class ClsAttentionTopK(ScorePruner):
    """Keep the tokens the vision tower's [CLS] attends to most.

    FasterVLM (Zhang et al., 2024, "[CLS] Attention is All You Need for Training-Free
    Visual Token Pruning", arXiv:2412.01818): rank patch tokens by the head-averaged
    attention of [CLS] in the vision encoder's feature layer and keep the top k,
    before the projector output enters the LM.
    """

    name = "cls_topk"
    paper = "FasterVLM, arXiv:2412.01818"
    family = "attention"
    needs_cls_attention = True

    def score(self, tokens: VisualTokens) -> Tensor:
        return tokens.cls_attention
