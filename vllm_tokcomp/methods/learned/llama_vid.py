"""LLaMA-VID: two tokens per frame, a text-guided context token and a pooled content token.

Li et al., "LLaMA-VID: An Image is Worth 2 Tokens in Large Language Models",
arXiv:2311.17043.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..base import TokenAssignment, VisualTokens
from .base import LearnedCompressor, spatial_grid


class LlamaVidCompressor(LearnedCompressor):
    """Per frame: ``[context, content]``.

    Context: the text queries (``text_embeds`` through a learned projection; a learned query when
    no text is given) attend to the frame's tokens, ``softmax(Q X^T / sqrt(D)) X`` averaged over
    queries, then projected. Content: the frame's tokens average-pooled, then projected.
    Bookkeeping (nominal): the frame's raster sequence is cut in two halves, the first standing
    for the context token and the second for the content token, each anchored at its centre.
    """

    name = "llama_vid"
    paper = "LLaMA-VID, Li et al., arXiv:2311.17043"

    def __init__(self, in_dim: int, out_dim: int, text_dim: int | None = None) -> None:
        super().__init__()
        self.text_proj = nn.Linear(text_dim or in_dim, in_dim)
        self.default_query = nn.Parameter(torch.randn(1, in_dim) * 0.02)
        self.context_proj = nn.Linear(in_dim, out_dim)
        self.content_proj = nn.Linear(in_dim, out_dim)

    def output_count(self, grid: tuple[int, ...]) -> int:
        return 2 * spatial_grid(grid)[0]

    def assignment(self, grid: tuple[int, ...], device: torch.device) -> TokenAssignment:
        frames, h, w = spatial_grid(grid)
        per_frame = h * w
        if per_frame < 2:
            raise ValueError(f"LLaMA-VID bookkeeping needs at least 2 tokens per frame, grid {grid}")
        half = math.ceil(per_frame / 2)
        local = (torch.arange(per_frame, device=device) >= half).to(torch.long)
        destination = (torch.arange(frames, device=device)[:, None] * 2 + local[None, :]).reshape(-1)
        anchors = torch.tensor([(half - 1) // 2, (half + per_frame - 1) // 2], device=device)
        anchor = (torch.arange(frames, device=device)[:, None] * per_frame + anchors[None, :]).reshape(-1)
        return TokenAssignment(destination=destination, anchor=anchor)

    def compute(self, tokens: VisualTokens, features: Tensor) -> Tensor:
        frames, h, w = spatial_grid(tokens.grid)
        d = features.shape[1]
        x = features.reshape(frames, h * w, d)
        if tokens.text_embeds is not None:
            queries = self.text_proj(tokens.text_embeds.to(features.dtype))
        else:
            queries = self.default_query
        attention = torch.softmax(torch.einsum("qd,fnd->fqn", queries, x) / math.sqrt(d), dim=-1)
        context = torch.einsum("fqn,fnd->fqd", attention, x).mean(1)
        content = x.mean(1)
        out = torch.stack([self.context_proj(context), self.content_proj(content)], dim=1)
        return out.reshape(frames * 2, -1)
