"""VisionZip: dominant tokens by [CLS] attention plus a few contextual tokens merged from the rest.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
arXiv:2412.04467 (CVPR 2025).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import assignment_from_labels, first_argmax, similarity_metric, stable_argsort_desc, unit_rows
from .base import DROPPED, Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .registry import register
from .uniform import uniform_indices


@register
@dataclass(frozen=True)
class VisionZip(Compressor):
    """Keep ``round(dominant_ratio * budget)`` dominant tokens; merge the rest into contextual tokens.

    Dominant: the top tokens by [CLS] attention, kept as they are. Contextual: ``budget - dominant``
    targets evenly spaced (raster order) over the remaining tokens; every other remaining token
    merges into its most key-similar target (features when no keys; ties: lower target), as a
    size-weighted mean. With no contextual slots the remaining tokens are dropped. The paper
    emits dominant then contextual tokens; here outputs are in raster order of their anchors.
    Default ratio 54/64 is the paper's 54 dominant + 10 contextual split.
    """

    dominant_ratio: float = knob(54 / 64, low=0.0, high=1.0)

    name = "visionzip"
    paper = "VisionZip, Yang et al., arXiv:2412.04467"
    family = "attention"
    uses_keys = True  # cosine of keys when given, else of features (see docs/methods.md)
    needs_cls_attention = True
    prunes = True  # only when no contextual slot is left
    merges = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        n = tokens.num_tokens
        device = tokens.features.device
        dominant_count = min(budget, max(0, round(self.dominant_ratio * budget)))
        contextual_count = budget - dominant_count
        dominant = stable_argsort_desc(tokens.cls_attention)[:dominant_count].to(device)
        labels = torch.full((n,), DROPPED, dtype=torch.long, device=device)
        labels[dominant] = dominant
        if contextual_count:
            rest = torch.ones(n, dtype=torch.bool, device=device)
            rest[dominant] = False
            remaining = torch.nonzero(rest).squeeze(1)
            targets = remaining[uniform_indices(remaining.numel(), contextual_count, device)]
            unit = unit_rows(similarity_metric(tokens)[remaining])
            target_unit = unit_rows(similarity_metric(tokens)[targets])
            _, nearest = first_argmax(unit @ target_unit.T, dim=1)
            labels[remaining] = targets[nearest]
            labels[targets] = targets
        return assignment_from_labels(labels)
