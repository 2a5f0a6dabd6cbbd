"""Shared fixtures for the method tests: synthetic visual tokens with every signal."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vllm_tokcomp.methods import VisualTokens  # noqa: E402


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: one torch thread avoids pool overhead and contention (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tokens(
    grid: tuple[int, ...],
    seed: int = 0,
    dim: int = 32,
    key_dim: int = 16,
    text_len: int = 5,
    dtype: torch.dtype = torch.float32,
    sizes: bool = False,
) -> VisualTokens:
    """Random tokens with all signals: CLS attention, keys, text embeddings and text attention."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(grid)
    features = torch.randn(n, dim, generator=g)
    keys = torch.randn(n, key_dim, generator=g)
    cls_attention = torch.softmax(3 * torch.randn(n, generator=g), dim=0)
    # every tower layer's [CLS] attention, the feature layer's last
    layer_cls_attention = torch.cat([torch.softmax(3 * torch.randn(2, n, generator=g), dim=1), cls_attention[None]])
    text_embeds = torch.randn(text_len, dim, generator=g)
    text_attention = torch.softmax(3 * torch.randn(text_len, n, generator=g), dim=1)
    token_sizes = torch.randint(1, 4, (n,), generator=g).to(torch.float32) if sizes else None
    return VisualTokens(
        features=features.to(dtype),
        grid=grid,
        cls_attention=cls_attention.to(dtype),
        layer_cls_attention=layer_cls_attention.to(dtype),
        keys=keys.to(dtype),
        text_embeds=text_embeds.to(dtype),
        text_attention=text_attention.to(dtype),
        sizes=token_sizes,
    )


def constant_tokens(grid: tuple[int, ...], dim: int = 32, key_dim: int = 16, text_len: int = 5) -> VisualTokens:
    """A constant image: every token, key and attention weight identical."""
    n = math.prod(grid)
    return VisualTokens(
        features=torch.ones(n, dim),
        grid=grid,
        cls_attention=torch.full((n,), 1.0 / n),
        layer_cls_attention=torch.full((3, n), 1.0 / n),
        keys=torch.ones(n, key_dim),
        text_embeds=torch.ones(text_len, dim),
        text_attention=torch.full((text_len, n), 1.0 / n),
    )


@pytest.fixture
def tokens_factory():
    return make_tokens
