"""LLaVA-PruMerge and PruMerge+: IQR outliers of [CLS] attention, pruned tokens merged back.

Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
Models", arXiv:2403.15388 (ICCV 2025).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import assignment_from_labels, first_argmax, similarity_metric, stable_argsort_desc, unit_rows
from .base import CompressionResult, Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .registry import register
from .uniform import uniform_indices


def quantile_linear(values: Tensor, q: float) -> float:
    """The ``q`` quantile with linear interpolation between order statistics (numpy's default)."""
    ordered = torch.sort(values.to(torch.float64)).values
    position = q * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def iqr_outliers(cls_attention: Tensor, factor: float = 1.5) -> Tensor:
    """Indices (ascending) of tokens whose attention exceeds ``Q3 + factor * (Q3 - Q1)``.

    At least one token is returned: when nothing is an outlier (e.g. uniform attention) the
    top-attention token is (ties: lower index).
    """
    q1 = quantile_linear(cls_attention, 0.25)
    q3 = quantile_linear(cls_attention, 0.75)
    fence = q3 + factor * (q3 - q1)
    kept = torch.nonzero(cls_attention.to(torch.float64) > fence).squeeze(1)
    if kept.numel() == 0:
        kept = stable_argsort_desc(cls_attention)[:1]
    return kept


def merge_into_nearest(metric: Tensor, kept: Tensor) -> Tensor:
    """Labels: every token joins its most cosine-similar kept token (ties: lower kept index)."""
    unit = unit_rows(metric)
    _, nearest = first_argmax(unit @ unit[kept].T, dim=1)
    labels = kept[nearest]
    labels[kept] = kept
    return labels.to(torch.long)


@register
@dataclass(frozen=True)
class PruMerge(Compressor):
    """PruMerge: keep [CLS]-attention outliers (IQR rule), merge every pruned token into its nearest kept one.

    Adaptive form (the paper's): keep the tokens above ``Q3 + iqr_factor * IQR`` (at least one).
    Fixed budget: keep the top-``budget`` tokens by [CLS] attention (the IQR set is itself a
    top-k by attention, so both coincide when the IQR count equals the budget). Every pruned
    token is merged into the kept token with the most similar key (features when no keys),
    weighted by [CLS] attention times size. The paper lets a kept token absorb its k nearest
    tokens, which may overlap; here each pruned token goes to exactly one kept token.
    """

    iqr_factor: float = knob(1.5, low=0.0, high=100.0)

    name = "prumerge"
    paper = "LLaVA-PruMerge, Shang et al., arXiv:2403.15388"
    family = "attention"
    uses_keys = True  # cosine of keys when given, else of features (see docs/methods.md)
    needs_cls_attention = True
    merges = True
    adaptive = True

    def merge_weights(self, tokens: VisualTokens) -> Tensor:
        attention = tokens.cls_attention.to(torch.float32).clamp_min(0) + 1e-12
        return tokens.token_sizes() * attention

    def kept_adaptive(self, tokens: VisualTokens) -> Tensor:
        return iqr_outliers(tokens.cls_attention, self.iqr_factor)

    def kept_fixed(self, tokens: VisualTokens, budget: int) -> Tensor:
        return torch.sort(stable_argsort_desc(tokens.cls_attention)[:budget]).values

    def _assign(self, tokens: VisualTokens, kept: Tensor) -> TokenAssignment:
        labels = merge_into_nearest(similarity_metric(tokens), kept.to(tokens.features.device))
        return assignment_from_labels(labels)

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        return self._assign(tokens, self.kept_fixed(tokens, budget))

    def compress_adaptive(self, tokens: VisualTokens) -> CompressionResult:
        self.check_inputs(tokens)
        return self.apply(tokens, self._assign(tokens, self.kept_adaptive(tokens)))


def _with_uniform(n: int, dominant: Tensor, extra: int) -> Tensor:
    """``dominant`` plus ``extra`` tokens evenly spaced (raster order) over the remaining ones."""
    rest = torch.ones(n, dtype=torch.bool)
    rest[dominant.cpu()] = False
    candidates = torch.nonzero(rest).squeeze(1)
    extra = min(extra, candidates.numel())
    picked = candidates[uniform_indices(candidates.numel(), extra)] if extra > 0 else candidates[:0]
    return torch.sort(torch.cat([dominant.cpu(), picked])).values.to(dominant.device)


@register
@dataclass(frozen=True)
class PruMergePlus(PruMerge):
    """PruMerge+: the IQR outliers plus spatially uniform samples, then the same merging.

    Adaptive form: the ``k`` IQR outliers plus ``round(uniform_multiple * k)`` tokens evenly spaced in
    raster order over the non-outliers (default 3, i.e. about 4x PruMerge's count, matching the
    paper's ~25% vs ~5.5% of 576 tokens). Fixed budget: the same mix scaled to the budget: the top
    ``round(budget * k / (k + round(uniform_multiple * k)))`` tokens by [CLS] attention (at least one),
    the rest of the budget evenly spaced over the remaining tokens.
    """

    uniform_multiple: float = knob(3.0, low=0.0, high=100.0)

    name = "prumerge_plus"
    paper = "LLaVA-PruMerge+ (outliers + spatially uniform sampling), Shang et al., arXiv:2403.15388"

    def kept_adaptive(self, tokens: VisualTokens) -> Tensor:
        outliers = iqr_outliers(tokens.cls_attention, self.iqr_factor)
        extra = round(self.uniform_multiple * outliers.numel())
        return _with_uniform(tokens.num_tokens, outliers, extra)

    def kept_fixed(self, tokens: VisualTokens, budget: int) -> Tensor:
        k = iqr_outliers(tokens.cls_attention, self.iqr_factor).numel()
        adaptive_count = k + round(self.uniform_multiple * k)
        dominant_count = min(budget, max(1, round(budget * k / adaptive_count)))
        dominant = stable_argsort_desc(tokens.cls_attention)[:dominant_count]
        return _with_uniform(tokens.num_tokens, dominant, budget - dominant_count)
