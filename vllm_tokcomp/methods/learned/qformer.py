"""Q-Former-style resampler: learned queries cross-attend to the visual tokens.

Li et al., "BLIP-2", arXiv:2301.12597 (Q-Former); the same learned-query resampling is
Flamingo's Perceiver Resampler (arXiv:2204.14198) and Qwen-VL's adapter.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..base import TokenAssignment, VisualTokens
from .base import LearnedCompressor, chunk_assignment


class QFormerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_self = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, queries: Tensor, visual: Tensor) -> Tensor:
        q = self.norm_self(queries)
        queries = queries + self.self_attn(q, q, q, need_weights=False)[0]
        kv = self.norm_kv(visual)
        queries = queries + self.cross_attn(self.norm_q(queries), kv, kv, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class QFormerResampler(LearnedCompressor):
    """``num_queries`` learned queries -> ``depth`` blocks (self-attn, cross-attn to visual, MLP) -> projection.

    Output count: ``num_queries`` per item, whatever the grid (an item with fewer tokens raises).
    Bookkeeping (nominal): the raster sequence is cut into ``num_queries`` contiguous chunks, one per
    query, each anchored at its centre token, so sizes sum to N and positions stay ordered.
    """

    name = "qformer"
    paper = "BLIP-2 Q-Former, Li et al., arXiv:2301.12597"

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        num_queries: int = 32,
        num_heads: int = 8,
        depth: int = 2,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, in_dim) * 0.02)
        self.blocks = nn.ModuleList(QFormerBlock(in_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.proj = nn.Linear(in_dim, out_dim or in_dim)

    def output_count(self, grid: tuple[int, ...]) -> int:
        return self.num_queries

    def assignment(self, grid: tuple[int, ...], device: torch.device) -> TokenAssignment:
        n = 1
        for extent in grid:
            n *= extent
        return chunk_assignment(n, self.num_queries, device)

    def compute(self, tokens: VisualTokens, features: Tensor) -> Tensor:
        if tokens.num_tokens < self.num_queries:
            raise ValueError(f"{tokens.num_tokens} tokens are fewer than num_queries={self.num_queries}")
        queries = self.queries[None]
        visual = features[None]
        for block in self.blocks:
            queries = block(queries, visual)
        return self.proj(queries[0])
