"""Real vLLM, tiny Qwen2-VL and Qwen2.5-VL: text-guided methods decided on the encoder's embeddings.

``text_relevance``, ``pumer``, ``dart`` and ``cdpruner`` choose the kept tokens in ``embed_multimodal`` from the image
embeddings and the prompt's text embeddings, after the request's M-RoPE positions were computed. The model hands each
kept token's (t, h, w) to vLLM's runner inside the embeddings and the runner's recompute hook
(``recompute_mrope_positions``,
switched on by ``vllm_api.enable_runner_position_recompute``; the CPU runner never calls it by itself) rewrites
the placeholders' positions. Checked here: exact prompt counts; the positions the engine ends with equal the
positions written out from the grid and the kept indices (``expected_positions``), for one image, two images in
one prompt and a ratio; with chunked prefill of 32 tokens (each image split across steps) the same prompts,
positions and greedy tokens; another question on the same image keeps other tokens (the question is part of the
multimodal hash, so no cached selection is reused); [CLS]-attention methods are refused naming the field.
"""

import math

import pytest

from .conftest import run_runner_module
from .test_qwen2_vl import BASE_REQUESTS, IMAGE_PAD, MAX_TOKENS, _count, _grids, expected_positions

pytestmark = pytest.mark.slow

NOISE = 6.0  # as in test_qwen2_vl_pixel_decided: flat synthetic backgrounds would make most scores tie
REQUESTS = [{**r, "images": [[*image, NOISE] for image in r["images"]]} for r in BASE_REQUESTS]
OTHER_QUESTION = "Describe the top left corner."
CASES = [
    (0, {"tokcomp_method": "text_relevance", "tokcomp_budget": 36}),
    (1, {"tokcomp_method": "pumer", "tokcomp_budget": 40}),
    (2, {"tokcomp_method": "text_relevance", "tokcomp_ratio": 0.25}),
    (2, {"tokcomp_method": "pumer", "tokcomp_budget": 30}),
    (1, {"tokcomp_method": "dart", "tokcomp_budget": 28}),
    (2, {"tokcomp_method": "cdpruner", "tokcomp_ratio": 0.2}),
]
REFUSED = [{"tokcomp_method": "cls_topk", "tokcomp_budget": 16}]


def _requests():
    requests = [{**REQUESTS[i], "mm_kwargs": kwargs} for i, kwargs in CASES]
    requests.append({**REQUESTS[0], "question": OTHER_QUESTION, "mm_kwargs": CASES[0][1]})
    requests += [{**REQUESTS[0], "mm_kwargs": kwargs} for kwargs in REFUSED]
    return requests


def _run(model, env, tmp, **llm_kwargs):
    job = {"model": str(model), "requests": _requests(), "llm_kwargs": llm_kwargs}
    logs = {"positions": ("TOKCOMP_POSITIONS_LOG", tmp / "positions.jsonl"),
            "selections": ("TOKCOMP_SELECTION_LOG", tmp / "selections.jsonl")}
    return run_runner_module("tests.e2e.test_qwen2_vl", job, env, plugins="tokcomp", logs=logs)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def served(request, qwen_dir, qwen25_dir, vllm_env, tmp_path_factory):
    model = qwen_dir if request.param == "qwen2_vl" else qwen25_dir
    return _run(model, vllm_env, tmp_path_factory.mktemp("text-guided"))


@pytest.fixture(scope="module")
def chunked(qwen_dir, vllm_env, tmp_path_factory):
    return _run(qwen_dir, vllm_env, tmp_path_factory.mktemp("text-guided-chunked"),
                max_num_batched_tokens=32, enable_chunked_prefill=True)


def _anchors_per_request(result):
    """The selections the engine logged (one record per image, in the order the requests ran), split per request."""
    records = iter(result["selections"])
    anchors = []
    for request, got in zip(_requests(), result["results"], strict=True):
        anchors.append(None if "error" in got else [next(records)["anchors"] for _ in request["images"]])
    assert next(records, None) is None
    return anchors


def _check_counts_and_positions(result):
    final = {}
    for record in result["positions"]:  # the last record of a prompt is what the runner ends with
        final[tuple(record["prompt"])] = record
    for request, got, anchors in zip(_requests(), result["results"], _anchors_per_request(result), strict=True):
        if "error" in got:
            continue
        grids = _grids(request)
        budgets = [_count(request["mm_kwargs"], math.prod(grid)) for grid in grids]
        assert [len(a) for a in anchors] == budgets
        assert all(len(set(a)) == len(a) and 0 <= min(a) and max(a) < math.prod(g)
                   for a, g in zip(anchors, grids, strict=True))
        assert got["prompt"].count(IMAGE_PAD) == sum(budgets) and got["prompt_tokens"] == len(got["prompt"])
        record = final[tuple(got["prompt"])]
        assert "recomputed_from" in record["items"][0], record["items"]  # the runner's hook wrote them
        positions, delta = expected_positions(got["prompt"], grids, anchors)
        assert record["positions"] == positions, request["mm_kwargs"]
        assert record["delta"] == delta, request["mm_kwargs"]
        assert len(got["output"]) == MAX_TOKENS
    return final


def test_prompt_counts_and_engine_positions_follow_the_selection(served):
    _check_counts_and_positions(served)


def test_another_question_keeps_other_tokens(served):
    anchors = _anchors_per_request(served)
    assert anchors[len(CASES)] != anchors[0]  # same image and budget, another question


def test_chunked_prefill_gives_the_same_prompts_positions_and_tokens(served, chunked, request):
    if "qwen2_5" in request.node.callspec.id:
        pytest.skip("chunked run is on Qwen2-VL")
    final_chunked = _check_counts_and_positions(chunked)
    final_whole = _check_counts_and_positions(served)
    assert final_chunked.keys() == final_whole.keys()
    for prompt, record in final_whole.items():
        assert final_chunked[prompt]["positions"] == record["positions"]
    assert [r.get("output") for r in chunked["results"]] == [r.get("output") for r in served["results"]]
    assert _anchors_per_request(chunked) == _anchors_per_request(served)


def test_cls_attention_methods_are_refused_naming_the_field(served):
    for error in served["results"][-len(REFUSED):]:
        assert "tokcomp_method" in error["error"] and "[CLS]" in error["error"], error
