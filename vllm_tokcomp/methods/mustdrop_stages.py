"""MustDrop, the two pre-LM stages: local spatial merging (stage 1) and dual-attention filtering (stage 2).

Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language
Model", arXiv:2411.10803. The decoding-stage cache policy (stage 3) acts on the KV cache
and is not a visual-token compressor.

Both stages protect the *key set*: the ``ceil(key_ratio * N)`` tokens with the highest
[CLS] attention (:func:`mustdrop_key_set`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import assignment_from_labels, stable_argsort_desc, unit_rows
from .base import CompressionResult, Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .registry import register


def mustdrop_key_set(cls_attention: Tensor, ratio: float = 0.08) -> Tensor:
    """Indices (ascending) of the ``ceil(ratio * N)`` tokens with the highest [CLS] attention.

    Ties go to the lower index.
    """
    n = cls_attention.shape[0]
    k = min(n, math.ceil(ratio * n - 1e-9))
    order = stable_argsort_desc(cls_attention)
    return torch.sort(order[:k]).values


# Largest stage-1 window side: a window wider than the token grid acts as the whole grid, so larger
# values would only differ in how far a client could push the index arithmetic.
MAX_WINDOW = 64


def window_ids(grid: tuple[int, ...], window: int, device: torch.device | None = None) -> Tensor:
    """Per token its non-overlapping ``window x window`` spatial window (per frame), raster-numbered."""
    *lead, h, w = grid
    frames = math.prod(lead) if lead else 1
    wh, ww = math.ceil(h / window), math.ceil(w / window)
    rows = torch.arange(h, device=device) // window
    cols = torch.arange(w, device=device) // window
    per_frame = (rows[:, None] * ww + cols[None, :]).reshape(-1)
    offsets = torch.arange(frames, device=device)[:, None] * (wh * ww)
    return (offsets + per_frame[None, :]).reshape(-1)


def window_similarity(features: Tensor, windows: Tensor, num_windows: int) -> Tensor:
    """Mean pairwise cosine similarity inside every window (``-inf`` for windows of one token).

    Uses ``sum_{i<j} u_i.u_j = (|sum u|^2 - sum |u|^2) / 2`` over unit vectors ``u``.
    """
    unit = unit_rows(features)
    total = torch.zeros(num_windows, unit.shape[1], dtype=torch.float32, device=unit.device)
    total.index_add_(0, windows, unit)
    squares = torch.zeros(num_windows, dtype=torch.float32, device=unit.device)
    squares.index_add_(0, windows, (unit * unit).sum(1))
    counts = torch.bincount(windows, minlength=num_windows).to(torch.float32)
    pairs = counts * (counts - 1)
    mean = ((total * total).sum(1) - squares) / pairs.clamp_min(1)
    return torch.where(pairs > 0, mean, torch.full_like(mean, -math.inf))


@register
@dataclass(frozen=True)
class MustDropStage1(Compressor):
    """MustDrop stage 1: local spatial merging of similar windows, with a protected key set.

    Non-overlapping ``window x window`` windows of each frame's patch grid (edge windows are
    smaller). A window whose mean pairwise cosine similarity of the features is ``>= threshold``
    collapses its non-key tokens into one size-weighted token placed at the non-key member
    nearest the window centre (ties: lower index); key tokens always stay themselves.

    Adaptive form (the paper's): merge every qualifying window. Fixed budget: merge the
    qualifying windows most-similar first; the window that would overshoot merges only the
    members most similar to its non-key mean, just enough to hit the budget. If all qualifying
    windows are merged and the count is still above budget, the non-key outputs with the lowest
    mean [CLS] attention are dropped; if the budget is below the key-set size, the key set is cut
    to its top-``budget`` by [CLS] attention.
    """

    threshold: float = knob(0.8, low=-1.0, high=1.0)
    window: int = knob(3, low=1, high=MAX_WINDOW)
    key_ratio: float = knob(0.08, low=0.0, high=1.0)

    name = "mustdrop_s1"
    paper = "MustDrop stage 1 (local spatial merging + key set), Liu et al., arXiv:2411.10803"
    family = "similarity"
    needs_cls_attention = True
    merges = True
    prunes = True  # only in the fixed-budget form, when merging cannot reach the budget
    adaptive = True

    # -- shared pieces -------------------------------------------------------------------------

    def _windows(self, tokens: VisualTokens) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(window id per token, key mask, qualifying windows most-similar first, their similarity)."""
        device = tokens.features.device
        windows = window_ids(tokens.grid, self.window, device)
        num_windows = int(windows.max()) + 1
        key = torch.zeros(tokens.num_tokens, dtype=torch.bool, device=device)
        key[mustdrop_key_set(tokens.cls_attention, self.key_ratio).to(device)] = True
        similarity = window_similarity(tokens.features, windows, num_windows)
        non_key = torch.bincount(windows[~key], minlength=num_windows)
        qualifies = (similarity >= self.threshold) & (non_key >= 2)
        order = stable_argsort_desc(torch.where(qualifies, similarity, torch.full_like(similarity, -math.inf)))
        order = order[: int(qualifies.sum())]
        return windows, key, order, similarity

    def _centre_member(self, tokens: VisualTokens, members: Tensor, window_id: int) -> int:
        """The member nearest the centre of its window (ties: lower index)."""
        coords = tokens.grid_coordinates()[members][:, -2:].to(torch.float32)
        h, w = tokens.grid[-2:]
        per_row = math.ceil(w / self.window)
        local = window_id % (math.ceil(h / self.window) * per_row)
        r0, c0 = (local // per_row) * self.window, (local % per_row) * self.window
        centre = torch.tensor(
            [(r0 + min(r0 + self.window, h) - 1) / 2, (c0 + min(c0 + self.window, w) - 1) / 2],
            device=coords.device,
        )
        distance = ((coords - centre) ** 2).sum(1)
        return int(members[int(torch.argmin(distance))])  # argmin of first occurrence on ties

    def merge_in_tower(self, patches: Tensor, grid: tuple[int, ...], budget: int
                       ) -> tuple[TokenAssignment, Tensor, Tensor]:
        """Stage 1 where the published method runs it, inside the vision tower after its first layer: qualifying
        windows collapse into their mean, never below ``budget`` tokens. No [CLS] weighting or key set there (both
        come from the last layer). Returns (patches -> tokens, patches per token, the merged tokens)."""
        n = patches.shape[0]
        tokens = VisualTokens(patches, grid, cls_attention=torch.zeros(n, device=patches.device))
        assignment = assignment_from_labels(self.merge_labels(tokens, budget))
        sizes = assignment.sum(torch.ones(n, device=patches.device))
        return assignment, sizes, assignment.merge(patches, sizes.new_ones(n))

    def merge_labels(self, tokens: VisualTokens, budget: int | None) -> Tensor:
        windows, key, order, _ = self._windows(tokens)
        n = tokens.num_tokens
        labels = torch.arange(n, device=tokens.features.device)
        remaining = None if budget is None else n - budget
        sizes = tokens.token_sizes()
        for window_id in order.tolist():
            if remaining is not None and remaining <= 0:
                break
            members = torch.nonzero((windows == window_id) & ~key).squeeze(1)
            if remaining is not None and members.numel() - 1 > remaining:
                # partial merge: the remaining+1 members closest to the window's non-key mean
                features = tokens.features[members].to(torch.float32)
                mean = (features * sizes[members, None]).sum(0, keepdim=True)
                closeness = (unit_rows(features) @ unit_rows(mean).T).squeeze(1)
                members = torch.sort(members[stable_argsort_desc(closeness)[: remaining + 1]]).values
            labels[members] = self._centre_member(tokens, members, window_id)
            if remaining is not None:
                remaining -= members.numel() - 1
        return labels

    # -- the two forms -------------------------------------------------------------------------

    def compress_adaptive(self, tokens: VisualTokens) -> CompressionResult:
        """Merge every qualifying window (the paper's content-dependent count)."""
        self.check_inputs(tokens)
        return self.apply(tokens, assignment_from_labels(self.merge_labels(tokens, None)))

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        merged = assignment_from_labels(self.merge_labels(tokens, budget))
        if merged.num_outputs == budget:
            return merged
        # still above budget: drop the non-key outputs with the lowest mean [CLS] attention
        attention = merged.merge(tokens.cls_attention.to(torch.float32)[:, None]).squeeze(1)
        key = torch.zeros(tokens.num_tokens, dtype=torch.bool, device=attention.device)
        key[mustdrop_key_set(tokens.cls_attention, self.key_ratio).to(attention.device)] = True
        is_key = key[merged.anchor]
        # keys rank above every non-key output; inside each group, higher attention first
        rank = torch.where(is_key, attention + 2.0 + attention.abs().max(), attention)
        kept_outputs = torch.sort(stable_argsort_desc(rank)[:budget]).values
        return merged.then(TokenAssignment.from_kept(kept_outputs, merged.num_outputs))


@register
@dataclass(frozen=True)
class MustDropStage2(Compressor):
    """MustDrop stage 2: dual-attention filtering of visual tokens by the text.

    With ``A = text_attention`` (``[T, N]``): global score ``g_i = sum_t A[t, i]`` and individual
    score ``m_i = max_t A[t, i]``. A token is dropped iff ``g_i < global_threshold * sum_j g_j``
    *and* ``m_i < individual_threshold``; survivors plus the key set are kept (adaptive form; at
    least one token). Fixed budget: the key set first (cut to its top-``budget`` by [CLS]
    attention if it is larger), then the other tokens by ``max(g_i / (global_threshold * sum g),
    m_i / individual_threshold)`` descending - the score whose ``>= 1`` region is exactly the
    survivor set, so the fixed form keeps the adaptive survivors first.
    """

    global_threshold: float = knob(0.001, low=0.0, high=1.0)
    individual_threshold: float = knob(0.01, low=0.0, high=1.0)
    key_ratio: float = knob(0.08, low=0.0, high=1.0)

    name = "mustdrop_s2"
    paper = "MustDrop stage 2 (dual-attention filtering), Liu et al., arXiv:2411.10803"
    family = "query"
    needs_cls_attention = True
    needs_text_attention = True
    prunes = True
    adaptive = True

    def survival_score(self, tokens: VisualTokens) -> Tensor:
        """``max(g / (global_threshold * sum g), m / individual_threshold)``: survivors score ``>= 1``."""
        attention = tokens.text_attention.to(torch.float32)
        global_score = attention.sum(0)
        individual = attention.amax(0)
        tiny = torch.finfo(torch.float32).tiny
        global_limit = max(self.global_threshold * float(global_score.sum()), tiny)
        return torch.maximum(global_score / global_limit, individual / max(self.individual_threshold, tiny))

    def _ranking(self, tokens: VisualTokens) -> tuple[Tensor, Tensor]:
        score = self.survival_score(tokens)
        key = torch.zeros(tokens.num_tokens, dtype=torch.bool, device=score.device)
        key[mustdrop_key_set(tokens.cls_attention, self.key_ratio).to(score.device)] = True
        cls = tokens.cls_attention.to(torch.float32)
        # key tokens (ordered by [CLS] attention) before all others (ordered by survival score)
        key_order = stable_argsort_desc(torch.where(key, cls, torch.full_like(cls, -math.inf)))
        rest_order = stable_argsort_desc(torch.where(key, torch.full_like(score, -math.inf), score))
        n_key = int(key.sum())
        return torch.cat([key_order[:n_key], rest_order[: tokens.num_tokens - n_key]]), key

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        order, _ = self._ranking(tokens)
        return TokenAssignment.from_kept(torch.sort(order[:budget]).values, tokens.num_tokens)

    def compress_adaptive(self, tokens: VisualTokens) -> CompressionResult:
        self.check_inputs(tokens)
        score = self.survival_score(tokens)
        order, key = self._ranking(tokens)
        keep = key | (score >= 1.0)
        if not bool(keep.any()):
            keep[order[0]] = True
        kept = torch.nonzero(keep).squeeze(1)
        return self.apply(tokens, TokenAssignment.from_kept(kept, tokens.num_tokens))
