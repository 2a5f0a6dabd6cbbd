"""MustDrop stages 1 and 2 as one decision taken before the LM (the serving form of MustDrop)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..auto_budget import ESTIMATORS
from ._common import assignment_from_labels, stable_argsort_desc
from .base import Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .mustdrop_stages import MAX_WINDOW, MustDropStage1, MustDropStage2, mustdrop_key_set
from .registry import register


@register
@dataclass(frozen=True)
class MustDrop(Compressor):
    """MustDrop (Liu et al., arXiv:2411.10803), stages 1 + 2 fused into one pre-LLM selection.

    1. Spatial merging (``stage1``): non-overlapping ``window`` x ``window`` windows whose mean
       pairwise cosine similarity is ``>= threshold`` collapse into one size-weighted token, most
       similar windows first, never below the budget; the key set (top ``ceil(key_ratio * N)``
       tokens by [CLS] attention) is never merged.
    2. Text-guided filtering (``stage2``): the dual filter's survival score
       (``MustDropStage2.survival_score``) over ``text_attention``. The probe ran on the tokens
       *before* stage 1, so a merged token's attention is the sum of its members' attention (the
       softmax mass it would receive if its members' keys were equal, which is why they merged).
       The key set comes first, then the highest survival scores, to exactly ``budget`` tokens.

    Without ``text_attention`` (a prompt with no text, e.g. vLLM's profiling dummy) or with
    ``stage2=False``, the non-key tokens are ranked by their mean [CLS] attention instead.
    """

    threshold: float = knob(0.8, low=-1.0, high=1.0)
    window: int = knob(3, low=1, high=MAX_WINDOW)
    key_ratio: float = knob(0.08, low=0.0, high=1.0)
    global_threshold: float = knob(0.001, low=0.0, high=1.0)
    individual_threshold: float = knob(0.01, low=0.0, high=1.0)
    stage1: bool = knob(True)
    stage2: bool = knob(True)
    # how tokcomp_budget "auto" estimates stage-1 savings from pixels (auto_budget.py)
    auto_estimator: str = knob("cosine", choices=ESTIMATORS)

    name = "mustdrop"
    paper = "MustDrop (multi-stage vision token dropping), Liu et al., arXiv:2411.10803"
    family = "attention"
    needs_cls_attention = True
    uses_text_attention: ClassVar[bool] = True  # used when given
    prunes = True
    merges = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        n = tokens.num_tokens
        if self.stage1:
            stage1 = MustDropStage1(threshold=self.threshold, window=self.window, key_ratio=self.key_ratio)
            merged = assignment_from_labels(stage1.merge_labels(tokens, budget))
        else:
            merged = TokenAssignment.identity(n, tokens.features.device)
        if merged.num_outputs == budget:
            return merged
        key = torch.zeros(n, dtype=torch.bool, device=tokens.features.device)
        key[mustdrop_key_set(tokens.cls_attention, self.key_ratio).to(key.device)] = True
        key_outputs = torch.zeros(merged.num_outputs, dtype=torch.bool, device=key.device)
        key_outputs[merged.destination[key]] = True
        cls = merged.merge(tokens.cls_attention.to(torch.float32)[:, None]).squeeze(1)
        if self.stage2 and tokens.text_attention is not None and tokens.text_attention.shape[0] > 0:
            attention = merged.sum(tokens.text_attention.to(torch.float32).T).T  # [T, M]
            stage2 = MustDropStage2(self.global_threshold, self.individual_threshold, self.key_ratio)
            score = stage2.survival_score(
                VisualTokens(features=attention.T, grid=(merged.num_outputs,), text_attention=attention)
            )
        else:
            score = cls
        key_order = stable_argsort_desc(torch.where(key_outputs, cls, torch.full_like(cls, -math.inf)))
        rest_order = stable_argsort_desc(torch.where(key_outputs, torch.full_like(score, -math.inf), score))
        n_key = int(key_outputs.sum())
        order = torch.cat([key_order[:n_key], rest_order[: merged.num_outputs - n_key]])
        kept = torch.sort(order[:budget]).values
        return merged.then(TokenAssignment.from_kept(kept, merged.num_outputs))
