"""Measurement hooks that live inside the engine, used by the benchmarks only.

* ``BenchScheduler``: vllm_tokcomp's ``BlockRecordingScheduler`` (KV blocks per finished
  request, ``$TOKCOMP_KV_LOG``) plus one JSON line per engine step in
  ``$TOKCOMP_BENCH_STEP_LOG``: how many prompt (prefill) and decode tokens the step ran,
  how many images went through the encoder, ``len(self.running)`` / ``len(self.waiting)``
  after scheduling, preemptions, KV usage, and ``exec_s``: the time from ``schedule()``
  returning to ``update_from_output()`` being called, i.e. the model forward (encoder
  included) plus sampling for that step. With synchronous scheduling (what the benchmarks
  use) steps do not overlap, so these add up to the engine's busy time.
* ``BenchAsyncScheduler``: the same on top of vLLM's ``AsyncScheduler`` (``--async-scheduling``,
  GPU only); there steps overlap, so ``exec_s`` is an upper bound per step, not a partition.
* ``EncoderTimer``: a worker extension (``worker_extension_cls``). After the engine is built
  the benchmark calls ``collective_rpc("tokcomp_bench_install")``, which wraps the model
  instance's ``embed_multimodal`` (vision tower + projector, and for the plugin the
  compression too) and, when the plugin's model is loaded, the compression method call and
  the text-signal step (text embedding / LM probe of text-guided methods) inside it, with
  wall-clock timers (``torch.cuda.synchronize`` around them on CUDA). The CLS-attention /
  key capture during the tower forward is not separated: it counts as encoder time.
  ``collective_rpc("tokcomp_bench_stats")`` returns the running totals.

Nothing here changes what the engine computes. Checked against vLLM 0.32.0.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler

from vllm_tokcomp.bench.common import STEP_LOG_ENV
from vllm_tokcomp.integration.kv_probe import BlockRecordingScheduler


class _StepRecorder:
    """Mixin for a vLLM ``Scheduler``: one JSON line per executed step (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        path = os.environ.get(STEP_LOG_ENV)
        self._bench_log = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - lives with the engine
        self._bench_pending: dict[int, dict] = {}

    def schedule(self, *args: Any, **kwargs: Any):  # noqa: ANN201 - vLLM's SchedulerOutput
        output = super().schedule(*args, **kwargs)
        prefill = decode = 0
        for request_id, count in output.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None:
                continue
            before = request.num_computed_tokens - count  # _update_after_schedule already advanced it
            if count == 1 and request.num_output_tokens > 0 and before == request.num_tokens - 1:
                decode += 1
            else:  # prompt tokens, a prompt chunk, or recomputation after a preemption
                prefill += count
        usage = getattr(self.kv_cache_manager, "usage", None)
        self._bench_pending[id(output)] = {
            "t": time.monotonic(),
            "prefill_tokens": prefill,
            "decode_tokens": decode,
            "encoder_items": sum(len(v) for v in output.scheduled_encoder_inputs.values()),
            "running": len(self.running),
            "waiting": len(self.waiting),
            "preempted": len(output.preempted_req_ids or ()),
            "kv_usage": None if usage is None else round(float(usage), 4),
        }
        return output

    def update_from_output(self, scheduler_output, model_runner_output):  # noqa: ANN001, ANN201
        now = time.monotonic()
        record = self._bench_pending.pop(id(scheduler_output), None)
        result = super().update_from_output(scheduler_output, model_runner_output)
        if record is not None and self._bench_log is not None:
            record["exec_s"] = now - record["t"]
            record["update_s"] = time.monotonic() - now
            self._bench_log.write(json.dumps(record) + "\n")
        return result


class BenchScheduler(_StepRecorder, BlockRecordingScheduler):
    pass


class BenchAsyncScheduler(_StepRecorder, BlockRecordingScheduler, AsyncScheduler):
    pass


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _count_items(output: object) -> int:
    if isinstance(output, (list, tuple)):
        return len(output)
    shape = getattr(output, "shape", None)
    return int(shape[0]) if shape else 0


class _TimedMethod:
    """A compressor whose calls are timed; every other attribute (knobs such as MustDrop's ``threshold``,
    which the in-tower path reads) is the method's own."""

    def __init__(self, method: object, stats: dict) -> None:
        self._method, self._stats = method, stats

    def __call__(self, *args: object, **kwargs: object):  # noqa: ANN204
        _sync()
        start = time.perf_counter()
        result = self._method(*args, **kwargs)
        _sync()
        self._stats["method_s"] += time.perf_counter() - start
        self._stats["method_calls"] += 1
        return result

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._method, name)


class EncoderTimer:
    """Worker extension: wall-clock timers around ``embed_multimodal`` and the compression call."""

    def tokcomp_bench_install(self) -> dict:
        stats = {"encoder_calls": 0, "encoder_items": 0, "encoder_s": 0.0, "method_calls": 0, "method_s": 0.0,
                 "text_signals_s": 0.0}
        self._tokcomp_bench = stats
        model = self.get_model()
        original = model.embed_multimodal

        def timed_embed(**kwargs: object):  # noqa: ANN202
            _sync()
            start = time.perf_counter()
            output = original(**kwargs)
            _sync()
            stats["encoder_s"] += time.perf_counter() - start
            stats["encoder_calls"] += 1
            stats["encoder_items"] += _count_items(output)
            return output

        model.embed_multimodal = timed_embed  # instance attribute: the runner's calls find it first
        if hasattr(model, "_text_signals"):  # the plugin's text embedding / LM probe for text-guided methods
            original_signals = model._text_signals

            def timed_signals(*args: object, **kwargs: object):  # noqa: ANN202
                _sync()
                start = time.perf_counter()
                result = original_signals(*args, **kwargs)
                _sync()
                stats["text_signals_s"] += time.perf_counter() - start
                return result

            model._text_signals = timed_signals
        plugin_model = False
        try:
            from vllm_tokcomp.integration import llava as plugin_llava

            plugin_model = isinstance(model, plugin_llava.CompressedLlava)
        except Exception:  # noqa: BLE001 - plain vLLM may run where the plugin cannot import
            plugin_llava = None
        if plugin_model and not getattr(plugin_llava, "_tokcomp_bench_timed", False):
            original_get_method = plugin_llava.get_method

            def timed_get_method(name: str, **knobs: object):  # noqa: ANN202
                return _TimedMethod(original_get_method(name, **knobs), stats)

            plugin_llava.get_method = timed_get_method
            plugin_llava._tokcomp_bench_timed = True
        return {"model_class": type(model).__name__, "plugin_model": plugin_model}

    def tokcomp_bench_stats(self) -> dict:
        return dict(getattr(self, "_tokcomp_bench", {}))
