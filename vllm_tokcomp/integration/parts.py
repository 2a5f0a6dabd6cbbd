"""Items served as several grids: how an item's count is split over its parts, and compressing each part on its own.

LLaVA-NeXT and LLaVA-OneVision serve an image as a base view plus a tile grid (:func:`visual_counts`); Qwen3-VL and
LLaVA-OneVision serve a video as frames (:func:`frame_counts`). Each part keeps its own count and is compressed on
its own grid (:func:`compress_grids`), so the method sees the spatial layout it was written for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import CompressionSpec
from ..methods import Compressor, TokenAssignment, VisualTokens
from . import settings
from .debug_log import log_selection
from .text_signals import with_text_fallback


def visual_counts(spec: CompressionSpec | None, base: int, rows: int, cols: int) -> tuple[int, int] | None:
    """``(base view tokens, tile grid tokens)`` a compressed image keeps, or ``None`` when it is served uncompressed
    (no settings, or a budget covering every placeholder ``base + rows*cols + rows``: the grid's rows end with a
    newline token each). A compressed image keeps ``min(budget, base + rows*cols)`` tokens and no newline (the kept
    tokens are no longer rows), split in proportion to the two grids' sizes, the base view first, at least one token
    each when the budget allows."""
    full = base + rows * cols + rows
    kept = settings.kept_tokens(spec, full)
    if spec is None or kept >= full:
        return None
    kept = min(kept, base + rows * cols)
    grid = rows * cols
    if grid == 0:
        return kept, 0
    on_base = round(kept * base / (base + grid))
    on_base = min(base, max(1 if kept > 0 else 0, min(on_base, kept - 1 if kept > 1 else kept)))
    return on_base, min(grid, kept - on_base)


def frame_counts(spec: CompressionSpec | None, frames: int, per_frame: int) -> list[int]:
    """LM tokens each frame of a video keeps: the video's count (``min(budget, frames * per_frame)``, a ratio
    resolved over all its tokens) spread evenly, the first ``count % frames`` frames one more, and at least one
    per frame (a frame always has its grid)."""
    if spec is None:
        return [per_frame] * frames
    total = settings.kept_tokens(spec, frames * per_frame)
    base, extra = divmod(total, frames)
    return [max(1, min(per_frame, base + (f < extra))) for f in range(frames)]


@dataclass
class Grid:
    """One part of an item: its features ``[rows * cols, D]`` in row-major order, and the tower signals the method
    may read (``VisualTokens`` fields: ``cls_attention``, ``keys``, ...), in the same order."""

    shape: tuple[int, int]
    features: torch.Tensor
    signals: dict = field(default_factory=dict)


def compress_grids(method: Compressor, spec: CompressionSpec, grids: list[Grid], counts: list[int] | tuple[int, ...],
                   text: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each grid compressed to its count (a count of 0 drops the grid), concatenated in order. Returns the
    features ``[sum(counts), D]`` and one destination per input token across the grids (``-1``: dropped; slots
    numbered across the grids), for the preview and metrics. The selection debug log gets one record for the item:
    its grids' shapes and the kept anchors, numbered across the grids."""
    parts, destinations, anchors, served, seen = [], [], [], 0, 0
    for grid, kept in zip(grids, counts, strict=True):
        if kept == 0:
            features = grid.features[:0]
            assignment = TokenAssignment(torch.full((grid.features.shape[0],), -1, dtype=torch.long),
                                         torch.empty(0, dtype=torch.long))
        else:
            tokens = VisualTokens(features=grid.features, grid=grid.shape, text_embeds=text, **grid.signals)
            result = method(with_text_fallback(spec.method, tokens), kept)
            features, assignment = result.features, result.assignment
        parts.append(features)
        destination = assignment.destination.cpu()
        destinations.append(torch.where(destination >= 0, destination + served, destination))
        anchors.append(assignment.anchor.cpu() + seen)
        served += features.shape[0]
        seen += grid.features.shape[0]
    out = torch.cat(parts)
    if out.shape[0] != sum(counts):  # vLLM silently truncates extra rows; a mismatch must fail here instead
        raise RuntimeError(f"tokcomp produced {out.shape[0]} rows for {sum(counts)} placeholders")
    log_selection(spec, tuple(side for grid in grids for side in grid.shape), torch.cat(anchors))
    return out, torch.cat(destinations)


def tiled_image_groups(destinations: torch.Tensor, base: int, rows: int, cols: int) -> torch.Tensor:
    """:func:`compress_grids`' destinations of a tiled image (base view, then its ``rows x cols`` tile grid) in the
    uncompressed placeholder order: the base view's tokens, then each tile row followed by its newline token, which
    a compressed image drops (``-1``). One entry per placeholder, as ``POST /tokcomp/preview``'s ``groups``."""
    if not rows:
        return destinations
    tiles = destinations[base:].reshape(rows, cols)
    newline = torch.full((rows, 1), -1, dtype=destinations.dtype)
    return torch.cat([destinations[:base], torch.cat([tiles, newline], dim=1).flatten()])


def with_trailing_newline(destinations: torch.Tensor) -> torch.Tensor:
    """Destinations of an item whose uncompressed placeholders end in one newline token that compression drops."""
    return torch.cat([destinations, torch.full((1,), -1, dtype=destinations.dtype)])

