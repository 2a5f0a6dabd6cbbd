"""Query-based selection: keep the visual tokens most similar to the text query (training-free)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ._common import cosine_matrix
from .base import ScorePruner, VisualTokens
from .knobs import knob
from .registry import register

REDUCTIONS = ("max", "mean")


@register
@dataclass(frozen=True)
class TextRelevance(ScorePruner):
    """Score each visual token by its cosine similarity to the text embeddings, reduced over text tokens.

    ``reduce="max"``: relevance to the best-matching text token; ``"mean"``: average relevance.
    The highest-scoring ``budget`` tokens are kept in order (cf. the text-guided selection of
    SparseVLM arXiv:2410.04417 and the relevance scoring of query-based pruners).
    """

    reduce: str = knob("max", choices=REDUCTIONS)

    name = "text_relevance"
    paper = "query-based training-free selection by text relevance (cf. SparseVLM, arXiv:2410.04417)"
    family = "query"
    needs_text = True

    def score(self, tokens: VisualTokens) -> Tensor:
        similarity = cosine_matrix(tokens.features, tokens.text_embeds.to(tokens.features.device))
        return similarity.amax(1) if self.reduce == "max" else similarity.mean(1)
