"""Debug logs the end-to-end tests read: JSON lines appended to the file an environment variable names."""

from __future__ import annotations

import json
import os

import torch

from ..config import CompressionSpec

SELECTION_LOG_ENV = "TOKCOMP_SELECTION_LOG"
POSITIONS_LOG_ENV = "TOKCOMP_POSITIONS_LOG"


def append_record(env_var: str, record: dict) -> None:
    """Append ``record`` as one JSON line to ``$env_var``'s file; nothing when the variable is unset."""
    path = os.environ.get(env_var)
    if path:
        with open(path, "a") as log:
            log.write(json.dumps(record) + "\n")


def log_selection(spec: CompressionSpec, grid: tuple[int, ...], anchors: torch.Tensor) -> None:
    """With ``$TOKCOMP_SELECTION_LOG`` set, which tokens a compressed item kept (its anchors, in output order),
    and the worker's global rank (``None`` outside a distributed group): with tensor or pipeline parallelism
    every rank that embeds the item writes its own record."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else None
    append_record(SELECTION_LOG_ENV, {"method": spec.method, "budget": spec.budget, "grid": list(grid),
                                      "anchors": anchors.tolist(), "rank": rank})
