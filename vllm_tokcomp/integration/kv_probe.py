"""Reads, from inside the engine, how many KV blocks every request really held.

Tests and benchmarks must not *compute* the KV saving from token counts; they
read it here. ``BlockRecordingScheduler`` is vLLM's own scheduler plus a record:
after every scheduling step it notes the blocks each scheduled request holds,
and when a request finishes it appends one JSON line to ``$TOKCOMP_KV_LOG``::

    {"request_id": ..., "prompt_tokens": 76, "output_tokens": 1, "max_blocks": 5, "block_size": 16}

Enable with ``--scheduler-cls vllm_tokcomp.integration.kv_probe.BlockRecordingScheduler``
(``LLM(scheduler_cls=...)`` offline). vLLM calls the scheduler interface "not public";
checked against vLLM 0.32.0 (``Scheduler._update_after_schedule``, ``_free_request``,
``kv_cache_manager.get_block_ids``). tests/test_vllm_api.py fails loudly if they move.
On the CPU build async scheduling is off, so the plain ``Scheduler`` is the one we extend.
"""

from __future__ import annotations

import json
import os

from vllm.v1.core.sched.scheduler import Scheduler

LOG_ENV = "TOKCOMP_KV_LOG"
SCHEDULER_CLS = "vllm_tokcomp.integration.kv_probe.BlockRecordingScheduler"


class BlockRecordingScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - vLLM's signature
        super().__init__(*args, **kwargs)
        self._max_blocks: dict[str, int] = {}
        self._log_path = os.environ.get(LOG_ENV)

    def _blocks_held(self, request_id: str) -> int:
        return sum(len(group) for group in self.kv_cache_manager.get_block_ids(request_id))

    def _update_after_schedule(self, scheduler_output) -> None:  # noqa: ANN001
        super()._update_after_schedule(scheduler_output)
        for request_id in scheduler_output.num_scheduled_tokens:
            held = self._blocks_held(request_id)
            self._max_blocks[request_id] = max(held, self._max_blocks.get(request_id, 0))

    def _free_request(self, request, delay_free_blocks: bool = False):  # noqa: ANN001, ANN201
        record = {
            "request_id": request.request_id,
            "prompt_tokens": request.num_prompt_tokens,
            "output_tokens": request.num_output_tokens,
            "max_blocks": self._max_blocks.pop(request.request_id, 0),
            "block_size": self.block_size,
        }
        if self._log_path:
            with open(self._log_path, "a") as log:
                log.write(json.dumps(record) + "\n")
        return super()._free_request(request, delay_free_blocks)
