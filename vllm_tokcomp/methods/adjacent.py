"""Adjacent-token merging along the raster or time sequence (a 1-D, neighbour-only ToMe variant).

Greedy agglomeration of neighbours in sequence order, as in the temporal/sequential
merging used by video token mergers (e.g. the "merge consecutive similar tokens" steps of
Chat-UniVi / TESTA / LongVU-style temporal reduction), here applied to one image or video
before the LM: repeatedly merge the most similar *adjacent* pair of groups until the
budget is reached.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import assignment_from_labels, similarity_metric
from .base import Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .registry import register

ORDERS = ("raster", "time")


def sequence_order(grid: tuple[int, ...], order: str) -> Tensor:
    """Input indices in traversal order: raster ``(t, h, w)`` or time-fastest ``(h, w, t)``."""
    n = 1
    for extent in grid:
        n *= extent
    index = torch.arange(n)
    if order == "time" and len(grid) == 3:
        return index.reshape(grid).permute(1, 2, 0).reshape(-1)
    return index


def _cosine(a: Tensor, b: Tensor) -> float:
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else 0.0


def adjacent_merge_labels(metric: Tensor, sizes: Tensor, budget: int, order: Tensor) -> Tensor:
    """Greedy neighbour merging; returns per input the anchor index of its group.

    Groups are runs of consecutive positions in ``order``. A group's vector is the
    size-weighted sum of its members' metrics (cosine ignores the scale, so this is the
    size-weighted mean). The most similar adjacent pair merges first; ties go to the pair
    that starts earlier in the sequence. The anchor of a run is its lower-median member.
    """
    n = metric.shape[0]
    seq_metric = metric[order].to(torch.float32) * sizes[order].to(torch.float32)[:, None]
    vectors = {p: seq_metric[p] for p in range(n)}
    nxt = list(range(1, n)) + [-1]
    prv = [-1] + list(range(n - 1))
    end = list(range(n))  # last position of the run that starts at p
    version = [0] * n
    unit = torch.nn.functional.normalize(seq_metric, dim=1, eps=1e-12)
    initial = (unit[:-1] * unit[1:]).sum(1).tolist() if n > 1 else []
    heap = [(-sim, p, 0, 0) for p, sim in enumerate(initial)]
    heapq.heapify(heap)
    count = n
    while count > budget:
        neg_sim, left, left_version, right_version = heapq.heappop(heap)
        right = nxt[left]
        if right < 0 or version[left] != left_version or version[right] != right_version:
            continue
        vectors[left] = vectors[left] + vectors.pop(right)
        end[left] = end[right]
        nxt[left] = nxt[right]
        if nxt[left] >= 0:
            prv[nxt[left]] = left
        version[left] += 1
        version[right] = -1
        count -= 1
        if prv[left] >= 0:
            p = prv[left]
            heapq.heappush(heap, (-_cosine(vectors[p], vectors[left]), p, version[p], version[left]))
        if nxt[left] >= 0:
            q = nxt[left]
            heapq.heappush(heap, (-_cosine(vectors[left], vectors[q]), left, version[left], version[q]))
    labels = torch.empty(n, dtype=torch.long)
    for start in vectors:
        stop = end[start]
        anchor = order[start + (stop - start) // 2]
        labels[order[start : stop + 1]] = anchor
    return labels


@register
@dataclass(frozen=True)
class AdjacentMerge(Compressor):
    """Merge the most similar adjacent pair in raster (or time) order until the budget is reached.

    Knob ``order``: ``"raster"`` walks the flattened ``(t, h, w)`` sequence (row ends touch the next
    row's start, as the LM sees them); ``"time"`` walks ``(h, w, t)`` so neighbours are the same
    patch in consecutive frames (for an image both are the same). Similarity: cosine of keys when
    given, else features; merged tokens are size-weighted means placed at their run's lower-median
    member. Outputs are in raster order.
    """

    order: str = knob("raster", choices=ORDERS)

    name = "adjacent"
    paper = "sequential neighbour merging (cf. Chat-UniVi arXiv:2311.08046, TESTA arXiv:2310.19060)"
    family = "similarity"
    uses_keys = True  # cosine of keys when given, else of features (see docs/methods.md)
    merges = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        device = tokens.features.device
        metric = similarity_metric(tokens).cpu()
        order = sequence_order(tokens.grid, self.order)
        labels = adjacent_merge_labels(metric, tokens.token_sizes().cpu(), budget, order)
        return assignment_from_labels(labels.to(device))
