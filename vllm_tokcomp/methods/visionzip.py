"""VisionZip: dominant tokens by [CLS] attention plus a few contextual tokens merged from the rest.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
arXiv:2412.04467 (CVPR 2025); code github.com/dvlab-research/VisionZip (``visionzip/clip_encoder.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import assignment_from_labels, first_argmax, similarity_metric, stable_argsort_desc, unit_rows
from .base import DROPPED, CompressionResult, Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .registry import register


def contextual_targets(remaining: int, count: int, device: torch.device | None = None) -> Tensor:
    """Positions among the ``remaining`` tokens that become contextual targets, as the official code spaces them:
    ``arange(0, remaining, max(1, remaining // count))[:count]``."""
    step = max(1, remaining // count)
    return torch.arange(0, remaining, step, device=device)[:count]


@register
@dataclass(frozen=True)
class VisionZip(Compressor):
    """Keep ``round(dominant_ratio * budget)`` dominant tokens; merge the rest into contextual tokens.

    Dominant: the top tokens by [CLS] attention, kept as they are. Contextual: ``budget - dominant``
    targets over the remaining tokens (raster order), one every ``remaining // contextual`` from the
    first; every other remaining token joins its most similar target by cosine of the keys averaged
    over heads (features when no keys; ties: lower target). A contextual token is its target plus the
    plain mean of its members (``contextual_merge="official"``, the official code), or the size-weighted
    mean of target and members (``"mean"``, which keeps the features' scale). With no contextual slots
    the remaining tokens are dropped. Outputs are in raster order of their anchors (the paper emits
    dominant then contextual tokens). Default ratio 54/64 is the paper's 54 dominant + 10 contextual.
    """

    dominant_ratio: float = knob(54 / 64, low=0.0, high=1.0)
    contextual_merge: str = knob("official", choices=("official", "mean"))

    name = "visionzip"
    paper = "VisionZip, Yang et al., arXiv:2412.04467"
    family = "attention"
    uses_keys = True  # cosine of head-averaged keys when given, else of features (see docs/methods.md)
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
            targets = remaining[contextual_targets(remaining.numel(), contextual_count, device)]
            metric = similarity_metric(tokens, head_mean=True)
            _, nearest = first_argmax(unit_rows(metric[remaining]) @ unit_rows(metric[targets]).T, dim=1)
            labels[remaining] = targets[nearest]
            labels[targets] = targets
        return assignment_from_labels(labels)

    def apply(self, tokens: VisualTokens, assignment: TokenAssignment) -> CompressionResult:
        if self.contextual_merge == "mean" or assignment.is_identity():
            return super().apply(tokens, assignment)
        # Official: target + mean(members), members unweighted; a slot without members is its anchor alone.
        features = tokens.features
        members = assignment.kept_mask()
        members[assignment.anchor] = False
        slots = assignment.destination[members]
        total = torch.zeros(assignment.num_outputs, features.shape[1], dtype=torch.float32, device=features.device)
        total.index_add_(0, slots, features[members].to(torch.float32))
        count = torch.zeros(assignment.num_outputs, dtype=torch.float32, device=features.device)
        count.index_add_(0, slots, torch.ones_like(slots, dtype=torch.float32))
        merged = features[assignment.anchor].to(torch.float32) + total / count.clamp_min(1.0)[:, None]
        return CompressionResult(merged.to(features.dtype), assignment, assignment.sum(tokens.token_sizes()))
