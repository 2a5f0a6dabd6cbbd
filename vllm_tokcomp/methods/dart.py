"""DART: keep the tokens least duplicated by a few pivot tokens.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
arXiv:2502.11494; code github.com/ZichenWen1/DART (``get_retained_image_token``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import unit_rows
from .base import Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .registry import register

MAX_PIVOTS = 256


@register
@dataclass(frozen=True)
class DART(Compressor):
    """Pivots, then per pivot the remaining tokens least similar to it (duplication-aware pruning).

    Pivots: the ``pivot_image_tokens`` visual tokens with the largest L1 norm, and, when the prompt's text is
    given, the ``pivot_text_tokens`` text tokens with the largest L1 norm of their embeddings. The image pivots
    are kept. Then each pivot in turn (image pivots, then text pivots, each in position order) keeps the ``k``
    candidates with the lowest cosine similarity to it and removes them from the candidates, so no two pivots
    keep the same token. ``k`` spreads ``budget - image pivots`` over the pivots (the first pivots take one more
    when it does not divide), so exactly ``budget`` tokens are kept. Norms and similarities are on the features
    (the LM's input embeddings). Pure pruning, raster order; ties go to the lower index.
    """

    pivot_image_tokens: int = knob(4, low=1, high=MAX_PIVOTS)  # at least one pivot, so the loop has one to follow
    pivot_text_tokens: int = knob(4, low=0, high=MAX_PIVOTS)

    name = "dart"
    paper = "DART, Wen et al., arXiv:2502.11494"
    family = "similarity"
    uses_text = True  # text pivots when the text embeddings are given (see docs/methods.md)
    prunes = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        features = tokens.features.to(torch.float32)
        n = tokens.num_tokens
        image_pivots = _largest_l1(features, min(self.pivot_image_tokens, budget))
        text = tokens.text_embeds
        text_pivots = (text[_largest_l1(text.to(torch.float32), min(self.pivot_text_tokens, text.shape[0]))]
                       if text is not None and text.shape[0] and self.pivot_text_tokens else features[:0])
        pivots = torch.cat([features[image_pivots], text_pivots.to(features)])
        kept = torch.zeros(n, dtype=torch.bool, device=features.device)
        kept[image_pivots] = True
        share, extra = divmod(budget - image_pivots.numel(), pivots.shape[0])
        unit = unit_rows(features)
        pivot_unit = unit_rows(pivots)
        for index in range(pivots.shape[0]):
            count = share + (1 if index < extra else 0)
            candidates = torch.nonzero(~kept).squeeze(1)
            if count == 0 or candidates.numel() == 0:
                continue
            dissimilarity = -(unit[candidates] @ pivot_unit[index])
            order = torch.sort(dissimilarity, descending=True, stable=True).indices[:count]
            kept[candidates[order]] = True
        return TokenAssignment.from_kept(torch.nonzero(kept).squeeze(1), n)


def _largest_l1(vectors: Tensor, count: int) -> Tensor:
    """Positions of the ``count`` rows with the largest L1 norm (ties: lower position), ascending."""
    norms = vectors.abs().sum(dim=-1)
    return torch.sort(torch.sort(norms, descending=True, stable=True).indices[:count]).values
