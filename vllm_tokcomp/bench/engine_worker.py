"""One vLLM engine in its own process, running a list of request batches; the benchmarks' offline runner.

Started by ``benchmarks/throughput.py`` with ``VLLM_PLUGINS`` set for the arm (empty = plain
vLLM). Input: a JSON job file (argv[1]); output: a JSON result file (``job["out"]``) and one
``TOKCOMP_BENCH {...}`` line on stdout per finished batch (progress). Every batch is one
``llm.generate`` call over all its requests at once (like ``vllm bench throughput``), timed
from the call to its return, so it includes input processing. Per batch the result holds the
RequestOutput metrics, the KV-block records of its requests (``kv_probe``), the engine steps
it ran (``vllm_tokcomp.bench.probes``) and the encoder / compression time spent in it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from vllm_tokcomp.bench.common import (
    ASYNC_SCHEDULER_CLS,
    PROGRESS_PREFIX,
    SCHEDULER_CLS,
    STEP_LOG_ENV,
    WORKER_EXTENSION_CLS,
    llava_prompt,
    make_image,
)


def _lines_since(path: Path, offset: int) -> tuple[list[dict], int]:
    if not path.exists():
        return [], offset
    with open(path) as handle:
        handle.seek(offset)
        text = handle.read()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()], offset + len(complete)


def _request_metrics(output) -> dict:  # noqa: ANN001 - vllm RequestOutput
    m = output.metrics
    record = {
        "prompt_tokens": len(output.prompt_token_ids or []),
        "output_tokens": len(output.outputs[0].token_ids),
        "finish_reason": output.outputs[0].finish_reason,
    }
    if m is not None:
        for key in ("queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts", "num_preemptions"):
            record[key] = getattr(m, key, None)
    return record


def _delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    kv_log = Path(os.environ["TOKCOMP_KV_LOG"])
    step_log = Path(os.environ[STEP_LOG_ENV])
    from vllm import LLM, SamplingParams

    engine = dict(job["engine"])
    async_scheduling = bool(engine.pop("async_scheduling", False))
    started = time.perf_counter()
    llm = LLM(
        model=job["model"],
        enforce_eager=engine.pop("enforce_eager", True),
        seed=0,
        scheduler_cls=ASYNC_SCHEDULER_CLS if async_scheduling else SCHEDULER_CLS,
        async_scheduling=async_scheduling,
        worker_extension_cls=WORKER_EXTENSION_CLS,
        disable_log_stats=False,  # fills RequestOutput.metrics
        enable_prefix_caching=False,  # repeated images must cost the same in every arm
        mm_processor_cache_gb=0,
        limit_mm_per_prompt=job.get("limit_mm_per_prompt", {"image": 1}),
        **engine,
    )
    installed = llm.collective_rpc("tokcomp_bench_install")[0]
    startup_s = time.perf_counter() - started
    cache = llm.llm_engine.vllm_config.cache_config
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    info = {
        "startup_s": startup_s,
        "model_class": installed["model_class"],
        "plugin_model": installed["plugin_model"],
        "block_size": cache.block_size,
        "num_kv_blocks": cache.num_gpu_blocks,
        "max_num_seqs": scheduler.max_num_seqs,
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "dtype": str(llm.llm_engine.vllm_config.model_config.dtype),
        "async_scheduling": async_scheduling,
        "plugins_env": os.environ.get("VLLM_PLUGINS"),
    }
    prompt = job.get("prompt") or llava_prompt(job["question"])
    params = SamplingParams(max_tokens=job["output_len"], min_tokens=job["output_len"], ignore_eos=True,
                            temperature=0.0)
    images: dict[int, object] = {}
    batches = []
    kv_offset = step_offset = 0
    for batch in job["batches"]:
        for seed in batch["seeds"]:
            if seed not in images:
                images[seed] = make_image(seed, job.get("image_size", 336))
        prompts = [{"prompt": prompt, "multi_modal_data": {"image": images[s]}} for s in batch["seeds"]]
        _, kv_offset = _lines_since(kv_log, kv_offset)
        _, step_offset = _lines_since(step_log, step_offset)
        enc_before = llm.collective_rpc("tokcomp_bench_stats")[0]
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        mono0 = time.monotonic()
        outputs = llm.generate(prompts, params, use_tqdm=False, mm_processor_kwargs=batch.get("mm_kwargs"))
        wall = time.perf_counter() - t0
        mono1 = time.monotonic()
        enc_after = llm.collective_rpc("tokcomp_bench_stats")[0]
        kv, kv_offset = _lines_since(kv_log, kv_offset)
        steps, step_offset = _lines_since(step_log, step_offset)
        record = {
            "arm": batch["arm"],
            "round": batch.get("round"),
            "timed": batch.get("timed", True),
            "wall_s": wall,
            "t_start": mono0,
            "t_end": mono1,
            "load_avg_1m": load_before,
            "requests": [_request_metrics(o) for o in outputs],
            "kv": kv,
            "steps": steps,
            "encoder": _delta(enc_after, enc_before),
        }
        batches.append(record)
        print(PROGRESS_PREFIX + json.dumps({"arm": batch["arm"], "timed": record["timed"], "wall_s": wall,
                                            "requests": len(outputs)}), flush=True)
    Path(job["out"]).write_text(json.dumps({"engine": info, "batches": batches}) + "\n")
    print(PROGRESS_PREFIX + json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    main()
