"""LLaVA with chunked prefill cutting compressed images: the same selections, prompt sizes and greedy outputs.

Two real engines on the tiny LLaVA, identical but for ``max_num_batched_tokens=32``: every compressed prompt
(64 image tokens + text) is prefilled in three or more steps, the image split across them; vLLM takes the split
image's rows from its encoder cache, so compression must run once per image and the cached rows must be the ones
the placeholders were counted for. (Qwen2-VL's chunked prefill, with its M-RoPE positions, is checked in
test_qwen2_vl_serving.py and test_qwen2_vl_text_guided.py.)
"""

import pytest

from .conftest import run_runner_module

pytestmark = pytest.mark.slow

METHODS = ["tome", "cls_topk", "mustdrop", "divprune", "text_relevance", "visionzip", "prumerge_plus", "pool"]
BUDGET = 64
REQUESTS = [{"images": [seed], "question": "How many squares are there?",
             "mm_kwargs": {"tokcomp_method": method, "tokcomp_budget": BUDGET}}
            for method in METHODS for seed in (1, 2)]


def _run(model, engine_args, vllm_env, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("chunked")
    job = {"model": str(model), "requests": REQUESTS, "max_model_len": 1024, "engine_args": engine_args}
    logs = {"selections": ("TOKCOMP_SELECTION_LOG", tmp / "selections.jsonl")}
    return run_runner_module("tests.e2e.offline_runner", job, vllm_env, plugins="tokcomp", logs=logs)


@pytest.fixture(scope="module")
def runs(tiny_llava_dir, vllm_env, tmp_path_factory):
    return {"whole": _run(tiny_llava_dir, {}, vllm_env, tmp_path_factory),
            "chunked": _run(tiny_llava_dir, {"enable_chunked_prefill": True, "max_num_batched_tokens": 32},
                            vllm_env, tmp_path_factory)}


def test_prompts_are_longer_than_a_chunk(runs):
    assert all(result["prompt_tokens"] > BUDGET > 32 for result in runs["whole"]["results"])


def test_chunked_prefill_changes_no_output(runs):
    assert runs["chunked"]["results"] == runs["whole"]["results"]


def test_each_image_is_compressed_once_with_the_same_selection(runs):
    """One selection record per image in both engines (the split image is not compressed again per chunk)."""
    whole, chunked = runs["whole"]["selections"], runs["chunked"]["selections"]
    assert len(whole) == len(REQUESTS)
    assert [(r["method"], r["anchors"]) for r in chunked] == [(r["method"], r["anchors"]) for r in whole]
