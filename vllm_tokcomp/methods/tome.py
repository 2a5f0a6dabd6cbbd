"""ToMe: bipartite soft matching with size-weighted averaging, applied once before the LM.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, arXiv:2210.09461.
Re-derived from the paper's description (Sec. 3); the similarity metric is the official code's (keys averaged
over heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import first_argmax, similarity_metric, stable_argsort_desc, unit_rows
from .base import Compressor, TokenAssignment, VisualTokens
from .registry import register


def bipartite_soft_matching(metric: Tensor, r: int) -> TokenAssignment:
    """One ToMe round on ``[n, d]`` vectors: remove ``min(r, |A|)`` tokens by merging A into B.

    Tokens alternate into sets A (even positions) and B (odd positions). Every A token
    draws an edge to its most cosine-similar B token (ties: lower B index); the ``r``
    edges with the highest similarity are kept (ties: lower A index) and their A tokens
    merge into their B partners. Surviving tokens keep their order; a merged token sits
    where its B token was (its anchor).
    """
    n = metric.shape[0]
    device = metric.device
    a_idx = torch.arange(0, n, 2, device=device)
    b_idx = torch.arange(1, n, 2, device=device)
    r = max(0, min(r, a_idx.shape[0], n - 1))
    if r == 0 or b_idx.numel() == 0:
        return TokenAssignment.identity(n, device)
    unit = unit_rows(metric)
    similarity = unit[a_idx] @ unit[b_idx].T  # [|A|, |B|]
    best_similarity, best_b = first_argmax(similarity, dim=1)
    merged_a = stable_argsort_desc(best_similarity)[:r]
    labels = torch.arange(n, device=device)
    labels[a_idx[merged_a]] = b_idx[best_b[merged_a]]
    survivors = torch.ones(n, dtype=torch.bool, device=device)
    survivors[a_idx[merged_a]] = False
    anchors = torch.nonzero(survivors).squeeze(1)
    destination = torch.searchsorted(anchors, labels)
    return TokenAssignment(destination=destination, anchor=anchors)


def tome_rounds(metric: Tensor, sizes: Tensor, budget: int) -> TokenAssignment:
    """Repeat bipartite soft matching until ``budget`` tokens remain.

    Each round removes ``min(remaining, |A|)`` tokens. Between rounds the metric of a merged
    token is the size-weighted mean of its members' metrics (as ToMe's merged tokens carry
    size-weighted averages into the next layer).
    """
    n = metric.shape[0]
    total = TokenAssignment.identity(n, metric.device)
    metric = metric.to(torch.float32)
    sizes = sizes.to(torch.float32)
    count = n
    while count > budget:
        step = bipartite_soft_matching(metric, min(count - budget, math.ceil(count / 2)))
        metric = step.merge(metric, sizes)
        sizes = step.sum(sizes)
        total = total.then(step)
        count = step.num_outputs
    return total


@register
@dataclass(frozen=True)
class ToMe(Compressor):
    """ToMe bipartite soft matching, run for as many rounds as the budget needs.

    Similarity is the cosine of the attention keys averaged over heads when they are given (the
    official code's ``k.mean(1)``; keys as given when ``key_heads`` is unknown), else of the features.
    Merged features are size-weighted means; a merged token takes the
    position of its B destination; outputs stay in raster/time order.
    """

    name = "tome"
    paper = "ToMe, Bolya et al., ICLR 2023, arXiv:2210.09461"
    family = "similarity"
    uses_keys = True  # cosine of keys when given, else of features (see docs/methods.md)
    merges = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        return tome_rounds(similarity_metric(tokens, head_mean=True), tokens.token_sizes(), budget)
