"""Per-image compression settings, carried from the processor to the model as a tensor field.

``embed_multimodal`` sees only multimodal kwargs, never the request, so the
processor attaches ``tokcomp_settings = [method_index, budget]`` to every image
(``method_index = -1``: leave uncompressed). Because the same value decides the
placeholder count (processor) and the rows returned (model), they cannot drift.
"""

from __future__ import annotations

import torch

from ..config import CompressionSpec
from ..methods import available_methods

FIELD = "tokcomp_settings"
QUERY_FIELD = "tokcomp_query"
OFF_INDEX = -1
# Text tokens kept for text-guided methods: the last ones, where the question sits in a chat prompt.
MAX_QUERY_TOKENS = 256


def encode(spec: CompressionSpec | None) -> torch.Tensor:
    if spec is None:
        return torch.tensor([OFF_INDEX, 0], dtype=torch.int64)
    return torch.tensor([available_methods().index(spec.method), spec.budget], dtype=torch.int64)


def decode(row: torch.Tensor) -> CompressionSpec | None:
    method_index, budget = (int(v) for v in row.tolist())
    if method_index == OFF_INDEX:
        return None
    return CompressionSpec(method=available_methods()[method_index], budget=budget)


def kept_tokens(spec: CompressionSpec | None, num_tokens: int) -> int:
    """Tokens an item keeps: exactly ``min(budget, N)``, the contract with the placeholder count."""
    return num_tokens if spec is None else min(spec.budget, num_tokens)


def query_ids(prompt: list[int], excluded: set[int]) -> list[int]:
    """The prompt's text tokens (placeholders and special tokens removed), the last ``MAX_QUERY_TOKENS``."""
    return [t for t in prompt if t not in excluded][-MAX_QUERY_TOKENS:]


def encode_query(ids: list[int]) -> torch.Tensor:
    row = torch.full((MAX_QUERY_TOKENS,), OFF_INDEX, dtype=torch.int64)
    row[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return row


def decode_query(row: torch.Tensor) -> torch.Tensor:
    return row[row != OFF_INDEX]
