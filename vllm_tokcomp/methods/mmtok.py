"""MMTok: multimodal coverage maximization.

Dong et al., "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs" (arXiv:2508.18264);
code: github.com/Ironieser/MMTok (``mmtok/core/semantic_selector.py``, ``mm_coverage_selection``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import unit_rows
from .base import Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .registry import register


@register
@dataclass(frozen=True)
class MMTok(Compressor):
    """Greedy maximum coverage of the question's tokens and of the image.

    As the official code: with unit vectors, ``P = softmax(cos(text, image) / text_temperature) / m`` (one row per
    question token, ``m`` rows) and ``Q = softmax(cos(image, image) / vision_temperature) / n`` (one row per image
    token); the rows of ``[P; alpha * Q]`` are to be covered, the coverage of a row being its largest entry among the
    kept columns; each step keeps the image token with the largest total gain ``sum_rows max(0, entry - coverage)``
    (ties: lower index); pure pruning, kept tokens in raster order. Without text only the image is covered.
    Differences, as everywhere in this library where a signal is not among those handed to methods: the image-image
    similarity is on the features the method is given (the official code: the tower's hidden states of the feature
    layer, before the projector), and the question is every question token the integration hands over (the official
    code drops its own list of stopwords first).
    """

    alpha: float = knob(0.5, low=0.0, high=16.0)  # weight of covering the image vs covering the question
    text_temperature: float = knob(0.02, low=1e-3, high=10.0)  # softmax temperature of text-image similarity
    vision_temperature: float = knob(0.2, low=1e-3, high=10.0)  # softmax temperature of image-image similarity

    name = "mmtok"
    paper = "MMTok, Dong et al., arXiv:2508.18264"
    family = "query"
    uses_text = True
    prunes = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        image = unit_rows(tokens.features).to(torch.float32)
        n = image.shape[0]
        rows = [torch.softmax(image @ image.T / self.vision_temperature, dim=1) / n * self.alpha]
        if tokens.text_embeds is not None and tokens.text_embeds.shape[0] > 0:
            text = unit_rows(tokens.text_embeds).to(device=image.device, dtype=torch.float32)
            rows.insert(0, torch.softmax(text @ image.T / self.text_temperature, dim=1) / text.shape[0])
        targets = torch.cat(rows)  # [rows to cover, n]
        coverage = torch.zeros(targets.shape[0], device=image.device)
        available = torch.ones(n, dtype=torch.bool, device=image.device)
        kept = []
        for _ in range(budget):
            gain = (targets - coverage[:, None]).clamp_min(0).sum(0).masked_fill(~available, float("-inf"))
            best = int(torch.argmax(gain))  # the first maximum: ties go to the lower index
            kept.append(best)
            available[best] = False
            coverage = torch.maximum(coverage, targets[:, best])
        return TokenAssignment.from_kept(torch.tensor(sorted(kept), device=image.device), n)
