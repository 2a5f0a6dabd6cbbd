"""Per-image compression settings, carried from the processor to the model as a tensor field.

``embed_multimodal`` sees only multimodal kwargs, never the request, so the
processor attaches ``tokcomp_settings`` to every image: the spec as UTF-8 JSON in
a fixed-size uint8 row (all zeros: leave uncompressed). Because the same value
decides the placeholder count (processor) and the rows returned (model), they
cannot drift.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from ..config import QUERY_KEY, CompressionSpec

FIELD = "tokcomp_settings"
VIDEO_FIELD = "tokcomp_video_settings"  # the same row for each video (a field belongs to one modality)
QUERY_FIELD = "tokcomp_query"
QUERY_FIELDS = {"image": QUERY_FIELD, "video": "tokcomp_video_query"}  # per modality, as above
ASSIGNMENT_FIELDS = {"image": "tokcomp_assignment", "video": "tokcomp_video_assignment"}
OFF_INDEX = -1
SETTINGS_BYTES = 1024
# Text tokens kept for text-guided methods: the last ones, where the question sits in a chat prompt.
MAX_QUERY_TOKENS = 256


def encode(spec: CompressionSpec | None) -> torch.Tensor:
    row = torch.zeros(SETTINGS_BYTES, dtype=torch.uint8)
    if spec is not None:
        data = json.dumps(spec.to_dict(), sort_keys=True).encode()
        if len(data) > SETTINGS_BYTES:
            # Bounded knobs keep every valid spec far below this (tests/test_request_bounds.py builds the longest).
            raise RuntimeError(f"tokcomp settings take {len(data)} bytes, more than {SETTINGS_BYTES}")
        row[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return row


def decode(row: torch.Tensor) -> CompressionSpec | None:
    data = bytes(row[row != 0].tolist())
    return CompressionSpec.from_dict(json.loads(data)) if data else None


def item_spec(item: Mapping[str, object] | None, field: str) -> CompressionSpec | None:
    """The settings a processed multimodal item carries under ``field`` (``None``: uncompressed, or the item's data
    is not at hand)."""
    element = None if item is None else item.get(field)
    return None if element is None else decode(element.data)


def kept_tokens(spec: CompressionSpec | None, num_tokens: int) -> int:
    """Tokens an item keeps: exactly ``min(budget, N)`` (a ratio resolved per item first), the contract
    with the placeholder count."""
    if spec is None:
        return num_tokens
    budget = spec.for_item(num_tokens).budget
    if not isinstance(budget, int):
        raise ValueError(f"tokcomp budget {budget!r} was not resolved to a count before processing")
    return min(budget, num_tokens)


def query_ids(prompt: list[int], excluded: set[int]) -> list[int]:
    """The prompt's text tokens (placeholders and special tokens removed), the last ``MAX_QUERY_TOKENS``."""
    return [t for t in prompt if t not in excluded][-MAX_QUERY_TOKENS:]


def with_query(request_kwargs: Mapping[str, object], prompt: list[int], excluded: set[int]) -> dict[str, object]:
    """The request's mm kwargs plus the prompt's text tokens under ``QUERY_KEY`` (``"id,id,..."``): the question
    becomes part of the multimodal hash, so a cached selection is never reused for another question and the same
    question hits the cache."""
    return {**request_kwargs, QUERY_KEY: ",".join(map(str, query_ids(prompt, excluded)))}


def query_rows(hf_processor_mm_kwargs: Mapping[str, object], count: int) -> torch.Tensor:
    """``count`` copies of the :func:`encode_query` row of the ids :func:`with_query` put in the kwargs."""
    query = str(hf_processor_mm_kwargs.get(QUERY_KEY) or "")
    return encode_query([int(t) for t in query.split(",") if t]).expand(count, -1).clone()


def encode_query(ids: list[int]) -> torch.Tensor:
    row = torch.full((MAX_QUERY_TOKENS,), OFF_INDEX, dtype=torch.int64)
    row[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return row


def decode_query(row: torch.Tensor) -> torch.Tensor:
    return row[row != OFF_INDEX]


def encode_assignment(destination: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """One int64 per input token: its output slot, ``-1`` if dropped, ``-2 - slot`` if it is that slot's
    anchor (the token whose position the slot takes). One flat row per item, ``N`` long whatever ``M``."""
    row = destination.to(torch.int64).clone()
    row[anchor] = -2 - torch.arange(anchor.numel(), dtype=torch.int64)
    return row


def decode_assignment(row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(destination, anchor)`` from :func:`encode_assignment`'s row."""
    is_anchor = row <= -2
    destination = torch.where(is_anchor, -2 - row, row)
    anchor = torch.empty(int(is_anchor.sum()), dtype=torch.int64)
    anchor[destination[is_anchor]] = is_anchor.nonzero().flatten()
    return destination, anchor
