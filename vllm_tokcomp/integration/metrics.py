"""tokcomp series on vLLM's own ``/metrics``, counted where each image's token count is decided.

The frontend's multimodal processor fixes every image's placeholder count before the request reaches an engine, so
it records there, in the API-server process, into ``prometheus_client``'s registry that vLLM's ``/metrics`` serves.
With several API servers vLLM switches ``prometheus_client`` to its multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``)
before they start, and these series, created lazily, aggregate across them like vLLM's own; data-parallel engines
do not matter (the frontend decides). Only the processor vLLM builds for serving records (the one its renderer
holds, see :func:`enable_for`), not the copies vLLM builds to profile memory with dummy images.

Series, labelled by ``model`` (the served model name) and ``method``:

- ``tokcomp_images_total``: images (and videos) compressed;
- ``tokcomp_image_tokens_before_total`` / ``tokcomp_image_tokens_after_total``: their LM tokens without and with
  compression, so ``rate(before) - rate(after)`` is tokens saved per second;
- ``tokcomp_image_kept_fraction``: per image, after / before (histogram);
- ``tokcomp_requests_opted_out_total`` (``model`` only): requests that asked for ``tokcomp_method: "none"``;
- ``tokcomp_compression_seconds``: per compressed item, the seconds its worker spent from the vision encoder's output
  to the compressed embeddings (histogram; wall time on the host, without a device synchronisation, so on a GPU it
  counts what the work waited for, not kernels still queued). Measured in the workers (``worker_rpc.report_item``) and
  pulled from every engine when ``/metrics`` is scraped, by the endpoint plugin (``integration/preview.py``; loaded
  by ``tokcomp serve --preview``): without it this series is absent.

No series exists until the first image is compressed or a request opts out: a server that never compresses shows
none.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from ..config import METHOD_KEY, OFF

KEPT_FRACTION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class FrontendMetrics:
    """The counters one serving processor records into; the Prometheus objects are shared by the process."""

    def __init__(self, model: str) -> None:
        self.model = model

    def record_items(self, items: Iterable[tuple[str, int, int]]) -> None:
        """Each compressed item as ``(method, tokens before, tokens after)``."""
        series = None
        for method, before, after in items:
            series = series or _series()
            series.images.labels(self.model, method).inc()
            series.before.labels(self.model, method).inc(before)
            series.after.labels(self.model, method).inc(after)
            series.kept.labels(self.model, method).observe(after / before if before else 1.0)

    def record_opt_out(self) -> None:
        _series().opted_out.labels(self.model).inc()


class _Series:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        labels = ("model", "method")
        self.images = Counter("tokcomp_images", "Images and videos compressed by vllm-tokcomp.", labels)
        self.before = Counter("tokcomp_image_tokens_before", "LM tokens of the compressed items without compression.",
                              labels)
        self.after = Counter("tokcomp_image_tokens_after", "LM tokens of the compressed items as served.", labels)
        self.kept = Histogram("tokcomp_image_kept_fraction", "Per compressed item, tokens served / tokens without "
                              "compression.", labels, buckets=KEPT_FRACTION_BUCKETS)
        self.opted_out = Counter("tokcomp_requests_opted_out", "Requests that set tokcomp_method to none.",
                                 ("model",))


_lock = threading.Lock()
_created: _Series | None = None
_seconds = None


def record_compression_seconds(model: str, timings: Iterable[tuple[str, float]]) -> None:
    """Workers' ``(method, seconds)`` per compressed item into ``tokcomp_compression_seconds`` (created on the first
    timing)."""
    timings = list(timings)
    if not timings:
        return
    histogram = _seconds_histogram()
    for method, seconds in timings:
        histogram.labels(model, method).observe(seconds)


def _seconds_histogram():  # noqa: ANN202 - a prometheus_client Histogram
    """The process's compression-time histogram, created on first use (separate from :func:`_series`: it is fed
    only where the endpoint plugin drains the workers)."""
    global _seconds
    with _lock:
        if _seconds is None:
            from prometheus_client import Histogram

            _seconds = Histogram("tokcomp_compression_seconds", "Per compressed item, seconds from the vision "
                                 "encoder's output to the compressed embeddings, in the worker.",
                                 ("model", "method"), buckets=SECONDS_BUCKETS)
        return _seconds


def _series() -> _Series:
    """The process's series, created on first use (so a server that never compresses exports none)."""
    global _created
    with _lock:
        if _created is None:
            _created = _Series()
        return _created


def record_processed(processor: object, client_kwargs: Mapping[str, object] | None, result: object) -> None:
    """After a request's processing: its compressed items (``processor._compressed_items(result)``) and whether
    the client opted out, counted when ``processor`` is the one vLLM serves with (a no-op for every other one)."""
    metrics = getattr(processor, "tokcomp_metrics", None)
    if metrics is None:
        return
    if client_kwargs and client_kwargs.get(METHOD_KEY) == OFF:
        metrics.record_opt_out()
    metrics.record_items(processor._compressed_items(result))


def enable_for(processor: object, model: str) -> None:
    """Make ``processor`` (one of ours, the one vLLM serves with) record into the series."""
    processor.tokcomp_metrics = FrontendMetrics(model)
