"""Small helpers shared by the built-in methods (not part of the public interface)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DROPPED, TokenAssignment, VisualTokens


def similarity_metric(tokens: VisualTokens, prefer_keys: bool = True, head_mean: bool = False) -> Tensor:
    """The vectors a similarity-based method compares, in float32: keys when given, else features.

    ``head_mean``: the keys averaged over their ``key_heads`` heads (``[N, Dk / key_heads]``), the metric of ToMe's
    and VisionZip's official code (``k.mean(1)``); when ``key_heads`` is unknown the keys are used as given.
    """
    if not (prefer_keys and tokens.keys is not None):
        return tokens.features.to(torch.float32)
    keys = tokens.keys.to(torch.float32)
    if head_mean and tokens.key_heads:
        keys = keys.reshape(keys.shape[0], tokens.key_heads, -1).mean(dim=1)
    return keys


def unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm in float32 (zero rows stay zero, so cosine similarities stay finite)."""
    return F.normalize(x.to(torch.float32), dim=-1, eps=1e-12)


def cosine_matrix(a: Tensor, b: Tensor | None = None) -> Tensor:
    """Pairwise cosine similarity of the rows of ``a`` and ``b`` (float32)."""
    ua = unit_rows(a)
    ub = ua if b is None else unit_rows(b)
    return ua @ ub.T


def assignment_from_labels(labels: Tensor) -> TokenAssignment:
    """Build an order-preserving assignment from per-token group labels.

    ``labels[i]`` is the *anchor* (an input index) of the group token ``i`` joins, or
    ``DROPPED``. Every anchor must label itself. Outputs are ordered by anchor.
    """
    labels = labels.to(torch.long)
    kept = labels != DROPPED
    anchors = torch.unique(labels[kept], sorted=True)
    destination = torch.full_like(labels, DROPPED)
    destination[kept] = torch.searchsorted(anchors, labels[kept])
    return TokenAssignment(destination=destination, anchor=anchors)


def stable_argsort_desc(scores: Tensor) -> Tensor:
    """Indices by descending score; ties keep the lower index first."""
    return torch.sort(scores.to(torch.float32), descending=True, stable=True).indices


def first_argmax(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """``(values, indices)`` of the maximum along ``dim``; ties go to the lowest index (guaranteed)."""
    values = x.amax(dim=dim, keepdim=True)
    n = x.shape[dim]
    shape = [1] * x.ndim
    shape[dim] = n
    index = torch.arange(n, device=x.device).reshape(shape).expand_as(x)
    masked = torch.where(x == values, index, torch.full_like(index, n))
    return values.squeeze(dim), masked.amin(dim=dim)
