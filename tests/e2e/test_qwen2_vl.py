"""Real vLLM, tiny Qwen2-VL: compression off is token-identical to plain vLLM; on, prompts shrink to
text + min(budget, grid) per image, and the M-RoPE positions the engine uses equal an independent
computation from the grid and the kept indices (text after an image keeps its uncompressed positions).

Two engines in fresh processes (this file is also the runner: ``python -m tests.e2e.test_qwen2_vl JOB``):
plain vLLM (``VLLM_PLUGINS=""``) and the plugin, which logs the positions it hands to the runner
(``$TOKCOMP_POSITIONS_LOG``, written in ``CompressedQwen2VL.get_mrope_input_positions``).
"""

import json
import math
import sys

import pytest

from .conftest import run_process_group, run_runner_module

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
IMAGE_PAD, VISION_START = 5, 3  # tiny Qwen2-VL ids
# (seed, width, height) -> merged grid (h, w): 336x336 -> 12x12, 448x224 -> 8x16
WIDE = [5, 448, 224]
BASE_REQUESTS = [
    {"images": [[1, 336, 336]], "question": "What colour is the circle?"},
    {"images": [WIDE], "question": "Is there a square?"},
    {"images": [[3, 336, 336], WIDE], "question": "Which image has more shapes?"},
]
GRIDS = {(336, 336): (12, 12), (448, 224): (8, 16)}
IDENTITY_GROUPS = {
    "unconfigured": None,
    "budget=everything": {"tokcomp_method": "pool", "tokcomp_budget": 10_000},
    "method=none": {"tokcomp_method": "none"},
}
COMPRESSED = [("pool", 36, 0), ("uniform", 50, 1), ("pool", 20, 2), ("bilinear", 30, 0), ("random", 17, 2)]
# A share of each image instead of a count: 0.25 of 12x12 and 8x16 keeps 36 and 32; 0.3 of 144 keeps 44.
RATIOS = [("pool", 0.25, 2), ("uniform", 0.3, 0), ("bilinear", 0.5, 1)]
REFUSED = [{"tokcomp_method": "cls_topk", "tokcomp_budget": 16}, {"tokcomp_method": "pool", "tokcomp_budget": 0},
           {"tokcomp_method": "pool", "tokcomp_budget": "auto"}]


def _plugin_requests():
    requests = [{**r, "mm_kwargs": kwargs} for kwargs in IDENTITY_GROUPS.values() for r in BASE_REQUESTS]
    requests += [
        {**BASE_REQUESTS[i], "mm_kwargs": {"tokcomp_method": m, "tokcomp_budget": b}} for m, b, i in COMPRESSED
    ]
    requests += [{**BASE_REQUESTS[i], "mm_kwargs": {"tokcomp_method": m, "tokcomp_ratio": r}} for m, r, i in RATIOS]
    requests += [{**BASE_REQUESTS[0], "mm_kwargs": kwargs} for kwargs in REFUSED]
    return requests


def start_engine(job, env, plugins, log):
    env = {**env, "VLLM_PLUGINS": plugins, "TOKCOMP_POSITIONS_LOG": str(log)}
    return run_process_group([sys.executable, "-m", "tests.e2e.test_qwen2_vl", json.dumps(job)], env, timeout=900)


def _run(job, env, plugins, log):
    logs = {"positions": ("TOKCOMP_POSITIONS_LOG", log)}
    return run_runner_module("tests.e2e.test_qwen2_vl", job, env, plugins=plugins, logs=logs)


@pytest.fixture(scope="module")
def plain(qwen_dir, vllm_env, tmp_path_factory):
    job = {"model": str(qwen_dir), "requests": BASE_REQUESTS}
    return _run(job, vllm_env, "", tmp_path_factory.mktemp("pos") / "plain.jsonl")


@pytest.fixture(scope="module")
def plugin(qwen_dir, vllm_env, tmp_path_factory):
    job = {"model": str(qwen_dir), "requests": _plugin_requests()}
    return _run(job, vllm_env, "tokcomp", tmp_path_factory.mktemp("pos") / "plugin.jsonl")


def _count(spec, n):
    """Tokens an item of n keeps under a request's settings (``None``: none given), written out plainly."""
    spec = spec or {}
    if spec.get("tokcomp_method", "none") == "none":
        return n
    if "tokcomp_ratio" in spec:
        return max(1, math.ceil(round(spec["tokcomp_ratio"] * n, 6)))
    return min(spec["tokcomp_budget"], n)


def _kept(method, budget, grid):
    """Kept raster indices, independently of the integration: the library method on the bare grid
    (``(h, w)`` of an image or ``(t, h, w)`` of a video)."""
    import torch

    from vllm_tokcomp.methods import VisualTokens, get_method

    n = math.prod(grid)
    if budget >= n:
        return list(range(n))
    grid = tuple(grid) if len(grid) == 3 else (1, *grid)
    return get_method(method).select(VisualTokens(torch.zeros(n, 1), grid), budget).anchor.tolist()


def expected_positions(prompt, images, kept):
    """M-RoPE positions from first principles: text counts up; a kept image token sits at
    item start + (0, row, col) of the patch it stands for; text after an image continues from
    item start + max(h, w), as if the image were uncompressed."""
    pos, nxt, i, item = [], 0, 0, 0
    while i < len(prompt):
        if prompt[i] != IMAGE_PAD:
            pos.append([nxt] * 3)
            nxt += 1
            i += 1
            continue
        h, w = images[item]
        for index in kept[item]:
            pos.append([nxt, nxt + index // w, nxt + index % w])
        i += len(kept[item])
        nxt += max(h, w)
        item += 1
    assert item == len(images)
    return [list(axis) for axis in zip(*pos, strict=True)], nxt - len(prompt)


def _grids(request):
    return [GRIDS[(image[1], image[2])] for image in request["images"]]


def test_baseline_is_not_degenerate(plain):
    outputs = [tuple(r["output"]) for r in plain["results"]]
    assert all(len(o) == MAX_TOKENS for o in outputs) and len(set(outputs)) > 1


@pytest.mark.parametrize("group", range(len(IDENTITY_GROUPS)), ids=list(IDENTITY_GROUPS))
def test_identity_settings_match_plain_vllm_token_for_token(plain, plugin, group):
    n = len(BASE_REQUESTS)
    got = [{k: r[k] for k in ("prompt_tokens", "output")} for r in plugin["results"][group * n : (group + 1) * n]]
    assert got == [{k: r[k] for k in ("prompt_tokens", "output")} for r in plain["results"]]


def test_prompt_tokens_are_text_plus_kept(plain, plugin):
    offset = len(IDENTITY_GROUPS) * len(BASE_REQUESTS)
    for k, (method, budget, base) in enumerate(COMPRESSED):
        grids = _grids(BASE_REQUESTS[base])
        full = sum(h * w for h, w in grids)
        text = plain["results"][base]["prompt_tokens"] - full
        got = plugin["results"][offset + k]
        assert got["prompt_tokens"] == text + sum(min(budget, h * w) for h, w in grids), (method, budget)
        assert got["prompt"].count(IMAGE_PAD) == sum(min(budget, h * w) for h, w in grids)
        assert len(got["output"]) == MAX_TOKENS


def test_ratio_keeps_a_share_of_each_image(plain, plugin):
    offset = len(IDENTITY_GROUPS) * len(BASE_REQUESTS) + len(COMPRESSED)
    expected = {(0.25, 2): [36, 32], (0.3, 0): [44], (0.5, 1): [64]}  # by hand: ceil(r * h * w) per image
    for k, (method, ratio, base) in enumerate(RATIOS):
        grids = _grids(BASE_REQUESTS[base])
        text = plain["results"][base]["prompt_tokens"] - sum(h * w for h, w in grids)
        got = plugin["results"][offset + k]
        assert got["prompt_tokens"] == text + sum(expected[ratio, base]), (method, ratio)
        assert len(got["output"]) == MAX_TOKENS


def test_engine_positions_equal_independent_computation(plain, plugin):
    by_prompt = {tuple(record["prompt"]): record for record in plugin["positions"]}
    checked = 0
    requests = _plugin_requests()
    for request, result in zip(requests, plugin["results"], strict=True):
        if "error" in result:
            continue
        spec = request["mm_kwargs"] or {}
        grids = _grids(request)
        method = spec.get("tokcomp_method", "none")
        kept = [_kept(method, _count(spec, math.prod(grid)), grid) for grid in grids]
        positions, delta = expected_positions(result["prompt"], grids, kept)
        record = by_prompt[tuple(result["prompt"])]
        assert record["positions"] == positions, spec
        assert record["delta"] == delta, spec
        checked += 1
    assert checked == len(requests) - len(REFUSED)
    # The plain engine's positions (in-tree code, no log) give the same greedy tokens as ours at budget=everything,
    # and our formula at budget=everything is the in-tree layout: text after an image continues at start + max(h, w).


def test_content_dependent_method_and_bad_budget_are_refused(plugin):
    cls_topk, zero, auto = plugin["results"][-len(REFUSED):]
    assert "[CLS]" in cls_topk["error"] and "tokcomp_method" in cls_topk["error"]
    assert "tokcomp_budget" in zero["error"]
    assert "tokcomp_budget" in auto["error"] and "tokcomp_ratio" in auto["error"]


def main() -> None:
    job = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    from tests.e2e.images import request_image

    llm = LLM(model=job["model"], max_model_len=2048, enforce_eager=True, seed=0,
              mm_processor_kwargs=job.get("engine_mm_kwargs"), limit_mm_per_prompt={"image": 2, "video": 0},
              **job.get("llm_kwargs", {}))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    results = []
    for request in job["requests"]:
        content = [{"type": "image_pil", "image_pil": request_image(*image)} for image in request["images"]]
        content.append({"type": "text", "text": request["question"]})
        try:
            output = llm.chat([{"role": "user", "content": content}], params,
                              mm_processor_kwargs=request.get("mm_kwargs"), use_tqdm=False)[0]
            results.append({"prompt_tokens": len(output.prompt_token_ids), "prompt": list(output.prompt_token_ids),
                            "output": list(output.outputs[0].token_ids)})
        except ValueError as error:
            results.append({"error": str(error), "error_type": type(error).__name__})
    print("RESULT " + json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    main()
