"""CDPruner: the visual tokens a conditional determinantal point process picks (relevant to the instruction and
diverse).

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs",
arXiv:2506.10967; code github.com/Theia-4869/CDPruner (what OpenVINO GenAI ships per request).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import unit_rows
from .base import Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .registry import register

# A residual this small means the kernel's rank is used up (e.g. duplicate tokens): no further token adds volume.
EXHAUSTED = 1e-10


@register
@dataclass(frozen=True)
class CDPruner(Compressor):
    """Greedy MAP of the DPP with kernel ``L = diag(r) S diag(r)``: ``S`` the cosine similarity of the features, ``r``
    each token's relevance to the prompt's text.

    Relevance, as the official LLaVA code computes it: the cosine of each token with each text token, averaged over
    the text, negated (``negate_relevance``; the official code ranks by the negated cosine), min-max normalised to
    ``[0, 1]`` (``(r - min) / (max - min + 1e-6)``). Without text every token is equally relevant (plain DPP
    diversity). The greedy MAP inference is the official fast one (Chen et al., NeurIPS 2018: incremental Cholesky,
    each step the token of largest residual ``d_i^2``; ties: lower index). When the residuals run out (the kernel's
    rank is used up, e.g. duplicate tokens) the remaining slots go to the most relevant tokens left. Pure pruning,
    raster order.
    """

    negate_relevance: bool = knob(True)

    name = "cdpruner"
    paper = "CDPruner, Zhang et al., arXiv:2506.10967"
    family = "query"
    uses_text = True  # the relevance term; without text the kernel is the similarity alone (see docs/methods.md)
    prunes = True

    def relevance(self, tokens: VisualTokens) -> Tensor:
        """``[N]`` in ``[0, 1]``: each token's (negated, by default) mean cosine with the text, min-max normalised."""
        text = tokens.text_embeds
        if text is None or text.shape[0] == 0:
            return torch.ones(tokens.num_tokens, dtype=torch.float32, device=tokens.features.device)
        cosine = (unit_rows(tokens.features) @ unit_rows(text.to(tokens.features.device)).T).mean(dim=1)
        if self.negate_relevance:
            cosine = -cosine
        return (cosine - cosine.min()) / (cosine.max() - cosine.min() + 1e-6)

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        unit = unit_rows(tokens.features)
        relevance = self.relevance(tokens)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(1.0)  # exactly: rounding would otherwise break the ties of equal relevance
        kernel = relevance[:, None] * similarity * relevance[None, :]
        selected = greedy_dpp(kernel, budget)
        if selected.numel() < budget:  # rank used up: the most relevant of the rest
            rest = torch.ones(tokens.num_tokens, dtype=torch.bool, device=kernel.device)
            rest[selected] = False
            candidates = torch.nonzero(rest).squeeze(1)
            order = torch.sort(relevance[candidates], descending=True, stable=True).indices
            selected = torch.cat([selected, candidates[order[: budget - selected.numel()]]])
        return TokenAssignment.from_kept(torch.sort(selected).values, tokens.num_tokens)


def greedy_dpp(kernel: Tensor, count: int) -> Tensor:
    """Up to ``count`` indices picked by fast greedy MAP inference of the DPP with ``kernel`` (in picking order);
    stops early when no residual exceeds :data:`EXHAUSTED`."""
    n = kernel.shape[0]
    cis = torch.zeros(count, n, dtype=kernel.dtype, device=kernel.device)
    residual = torch.diagonal(kernel).clone()
    picked = []
    for step in range(min(count, n)):
        best = residual.max()
        if not best > EXHAUSTED:
            break
        j = int(torch.nonzero(residual == best)[0, 0])  # ties: the lower index
        picked.append(j)
        e = (kernel[j] - cis[:step, j] @ cis[:step]) / torch.sqrt(residual[j])
        cis[step] = e
        residual = residual - e * e
        residual[j] = -torch.inf
    return torch.tensor(picked, dtype=torch.long, device=kernel.device)
