"""Runs one real vLLM engine in its own process and prints what it produced as JSON.

Used by the end-to-end tests so that every engine (plugin on / filtered out)
starts from a clean process, as it would for a user. Input: a JSON job on argv[1];
output: one line ``RESULT {...}`` on stdout.
"""

import json
import os
import sys


def main() -> None:
    job = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    from tests.e2e.images import make_image

    llm = LLM(
        model=job["model"],
        max_model_len=job.get("max_model_len", 2048),
        enforce_eager=True,
        seed=0,
        mm_processor_kwargs=job.get("engine_mm_kwargs"),
        scheduler_cls="vllm_tokcomp.integration.kv_probe.BlockRecordingScheduler",
        limit_mm_per_prompt={"image": 2},
        tensor_parallel_size=job.get("tensor_parallel_size", 1),
        pipeline_parallel_size=job.get("pipeline_parallel_size", 1),
        dtype=job.get("dtype", "auto"),
        **job.get("engine_args", {}),  # e.g. chunked prefill's batch size, speculative decoding
    )
    params = SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0.0)
    results = []
    # One request at a time: the KV log then holds exactly one line per request, in order.
    for request in job["requests"]:
        content = [{"type": "image_pil", "image_pil": make_image(seed)} for seed in request["images"]]
        content.append({"type": "text", "text": request["question"]})
        messages = [{"role": "user", "content": content}]
        try:
            output = llm.chat(messages, params, mm_processor_kwargs=request.get("mm_kwargs"), use_tqdm=False)[0]
            results.append({"prompt_tokens": len(output.prompt_token_ids), "output": list(output.outputs[0].token_ids)})
        except ValueError as error:
            results.append({"error": str(error), "error_type": type(error).__name__})
    kv_log = os.environ.get("TOKCOMP_KV_LOG")
    blocks = [json.loads(line) for line in open(kv_log)] if kv_log and os.path.exists(kv_log) else []
    print("RESULT " + json.dumps({"results": results, "kv": blocks}), flush=True)


if __name__ == "__main__":
    main()
