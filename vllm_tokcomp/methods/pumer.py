"""PuMer, image side: text-informed pruning, then similarity merging of what is left.

Cao et al., "PuMer: Pruning and Merging Tokens for Efficient Vision Language Models",
ACL 2023, arXiv:2305.17530. PuMer prunes and merges inside the cross-modal encoder layers;
here the same two steps run once on the visual tokens before the LM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import similarity_metric, stable_argsort_desc
from .base import Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .registry import register
from .tome import tome_rounds


def text_informed_relevance(features: Tensor, text_embeds: Tensor) -> Tensor:
    """Per visual token the text-to-image attention it receives, averaged over text tokens.

    ``softmax_over_image(text @ image.T / sqrt(D))`` in float32: the cross-attention map a text
    query would draw over the image (PuMer ranks image tokens by text-to-image attention).
    """
    x = features.to(torch.float32)
    t = text_embeds.to(device=x.device, dtype=torch.float32)
    attention = torch.softmax(t @ x.T / math.sqrt(x.shape[1]), dim=1)
    return attention.mean(0)


@register
@dataclass(frozen=True)
class PuMer(Compressor):
    """Text-informed pruning, then ToMe-style bipartite merging of the survivors.

    Of the ``N - budget`` removals, ``round(prune_share * (N - budget))`` are pruned (the least
    text-relevant tokens, see :func:`text_informed_relevance`) and the rest are merged by
    bipartite soft matching on keys (features when no keys), size-weighted, as in ``tome``.
    """

    prune_share: float = knob(0.5, low=0.0, high=1.0)

    name = "pumer"
    paper = "PuMer, Cao et al., ACL 2023, arXiv:2305.17530"
    family = "query"
    uses_keys = True  # cosine of keys when given, else of features (see docs/methods.md)
    needs_text = True
    prunes = True
    merges = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        n = tokens.num_tokens
        pruned = round(self.prune_share * (n - budget))
        relevance = text_informed_relevance(tokens.features, tokens.text_embeds)
        kept = torch.sort(stable_argsort_desc(relevance)[: n - pruned]).values
        prune_step = TokenAssignment.from_kept(kept, n)
        metric = similarity_metric(tokens)[kept]
        merge_step = tome_rounds(metric, tokens.token_sizes()[kept], budget)
        return prune_step.then(merge_step)
