"""What the API server asks vLLM's workers: compression timings for /metrics, and a preview's selection.

The models call :func:`report_item` once per compressed image or video, in the worker that embeds it. Outside a
preview it records how long the compression took (kept in a bounded buffer until the API server drains it for
``tokcomp_compression_seconds``); during a preview (:func:`select_for_preview`) it records the item's assignment
instead, and nothing is timed. The API server reaches :func:`handle` through ``collective_rpc``
(``vllm_api.add_worker_call``). Tensors travel as bytes (:func:`pack` / :func:`unpack`): vLLM's utility-call decoder
does not rebuild tensors it was not told to expect.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..config import CompressionSpec

# Timings kept per worker between two drains (a server nobody scrapes must not grow).
TIMINGS_KEPT = 4096
OPS = ("timings", "select")

_timings: deque[tuple[str, float]] = deque(maxlen=TIMINGS_KEPT)
_lock = threading.Lock()
_preview = threading.local()


def report_item(spec: CompressionSpec, destination: torch.Tensor, seconds: float) -> bool:
    """A model compressed one item: ``destination`` per input token its output slot (``-1`` dropped), in
    ``seconds`` (from the encoder's output to the compressed embeddings). False during a preview (the item is not
    served: nothing else should record it)."""
    sink = getattr(_preview, "sink", None)
    if sink is not None:
        sink.append(destination.tolist())
        return False
    with _lock:
        _timings.append((spec.method, seconds))
    return True


def drain_timings() -> list[tuple[str, float]]:
    """The ``(method, seconds)`` recorded since the last drain, oldest first."""
    with _lock:
        drained = list(_timings)
        _timings.clear()
    return drained


@contextmanager
def capturing_selections():
    """While active, :func:`report_item` collects each item's assignment into the yielded list (and times
    nothing)."""
    _preview.sink = []
    try:
        yield _preview.sink
    finally:
        _preview.sink = None


def pack(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Batched model inputs (tensors, or lists of tensors) as ``{"tensor": triple}`` / ``{"tensors": [triple]}``,
    each triple ``(dtype, shape, bytes)``."""
    return {key: {"tensors": [_pack_tensor(t) for t in value]} if isinstance(value, list | tuple)
            else {"tensor": _pack_tensor(value)} for key, value in kwargs.items()}


def unpack(packed: Mapping[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """The inverse of :func:`pack`, on ``device``."""
    return {key: [_unpack_tensor(t, device) for t in value["tensors"]] if "tensors" in value
            else _unpack_tensor(value["tensor"], device) for key, value in packed.items()}


def _pack_tensor(tensor: torch.Tensor) -> tuple[str, list[int], bytes]:
    tensor = torch.as_tensor(tensor).detach().cpu().contiguous()
    data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return str(tensor.dtype).removeprefix("torch."), list(tensor.shape), data


def _unpack_tensor(triple: Any, device: torch.device | str | None) -> torch.Tensor:
    dtype, shape, data = triple
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.view(getattr(torch, dtype)).reshape(shape).to(device)


def select_for_preview(model: nn.Module, packed: Mapping[str, Any]) -> list[list[int]]:
    """Run the model's own multimodal embedding on one request's batched inputs, as the runner would, and return
    each compressed item's assignment (the embeddings are discarded)."""
    device = next(model.parameters()).device
    with capturing_selections() as selections, torch.inference_mode():
        model.embed_multimodal(**unpack(packed, device))
    return selections


def handle(model: nn.Module, op: str, args: tuple) -> Any:
    """A worker's answer to ``tokcomp_call(op, *args)``."""
    if op == "timings":
        return drain_timings()
    if op == "select":
        return select_for_preview(model, *args)
    raise ValueError(f"unknown tokcomp worker call {op!r} (expected one of {', '.join(OPS)})")
