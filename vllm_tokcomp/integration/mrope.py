"""M-RoPE positions of an item's kept tokens, and their packing into embedding columns for the runner's hook.

A kept token takes the (t, h, w) position of its anchor; text after an item keeps the position it would have had
uncompressed. For methods that decide on the encoder's output, the positions travel inside the embeddings as
``POSITION_CHANNELS`` extra columns (integer pairs that bf16 holds exactly) until vLLM's M-RoPE recompute hook reads
them. No vLLM import here.
"""

from __future__ import annotations

import numpy as np
import torch

POSITION_CHANNELS = 6  # (t, h, w), each as (value // 128, value % 128): exact even in bf16 (8-bit mantissa)
POSITION_BASE = 128


def item_positions(
    grid: tuple[int, int, int], anchors: torch.Tensor, t_factor: float = 1.0
) -> tuple[np.ndarray, int]:
    """``[3, len(anchors)]`` M-RoPE positions of the kept tokens relative to the item start, and the
    extent of the full item (the next text starts at ``item start + extent``)."""
    indices = np.indices(grid).reshape(3, -1)
    if t_factor != 1.0:
        indices[0] = (indices[0] * t_factor).astype(np.int64)
    return indices[:, anchors.numpy()], int(indices.max()) + 1


def encode_positions(positions: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``[k, POSITION_CHANNELS]`` columns carrying ``[3, k]`` item-relative positions inside an embedding
    (dtype and device of ``like``); each value as a (high, low) pair of integers below 256, which every float
    dtype vLLM runs in (bf16 included) holds exactly."""
    values = torch.as_tensor(np.ascontiguousarray(positions), dtype=torch.int64)
    if values.numel() and (values.min() < 0 or values.max() >= POSITION_BASE * 256):
        raise ValueError(f"tokcomp: positions {int(values.min())}..{int(values.max())} do not fit the channels")
    pairs = torch.stack([values // POSITION_BASE, values % POSITION_BASE], dim=1)  # [3, 2, k]
    return pairs.reshape(POSITION_CHANNELS, -1).T.to(device=like.device, dtype=like.dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """``[3, k]`` int64 positions from :func:`encode_positions`' columns."""
    pairs = channels.float().round().to(torch.int64).T.reshape(3, 2, -1)
    return pairs[:, 0] * POSITION_BASE + pairs[:, 1]
