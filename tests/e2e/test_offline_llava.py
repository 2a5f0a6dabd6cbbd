"""Real vLLM, offline API: compression off is token-identical to plain vLLM; on, it shrinks prompts and KV.

Each engine runs in a fresh process (tests/e2e/offline_runner.py). The plain
baseline has the plugin filtered out with ``VLLM_PLUGINS``; KV blocks are read
from inside the engine (vllm_tokcomp.integration.kv_probe), not computed here.
"""

import math

import pytest

from .conftest import run_engine

pytestmark = pytest.mark.slow

FULL = 576
MAX_TOKENS = 8
QUESTION = "What colour is the circle?"
BASE_REQUESTS = [
    {"images": [1], "question": QUESTION},
    {"images": [2], "question": "Is there a square?"},
    {"images": [3, 4], "question": "Which image has more shapes?"},
]
COMPRESSED = [
    ("uniform", 64, 0),
    ("tome", 32, 0),
    ("cls_topk", 100, 0),
    ("uniform", 48, 2),  # two images, each to 48
    ("tome", 1, 1),
    ("mustdrop", 64, 0),  # stage 1 inside the tower, stage 2 from the LM probe
    ("mustdrop", 40, 2),
]
IDENTITY_GROUPS = {
    "unconfigured": None,
    "budget=576": {"tokcomp_method": "tome", "tokcomp_budget": FULL},
    "budget=1000": {"tokcomp_method": "cls_topk", "tokcomp_budget": 1000},
    "method=none": {"tokcomp_method": "none"},
    # Re-running vLLM's CLIP tower layer by layer (MustDrop's in-tower merge path) with nothing to merge.
    "mustdrop budget=576": {"tokcomp_method": "mustdrop", "tokcomp_budget": FULL},
}


def _with(kwargs):
    return [{**r, "mm_kwargs": kwargs} for r in BASE_REQUESTS]


OFFSET = len(IDENTITY_GROUPS) * len(BASE_REQUESTS)  # where the compressed requests start


@pytest.fixture(scope="module")
def plain(tiny_llava_dir, vllm_env, tmp_path_factory):
    job = {"model": str(tiny_llava_dir), "requests": BASE_REQUESTS, "max_tokens": MAX_TOKENS}
    return run_engine(job, vllm_env, plugins="", kv_log=tmp_path_factory.mktemp("kv") / "plain.jsonl")


@pytest.fixture(scope="module")
def plugin(tiny_llava_dir, vllm_env, tmp_path_factory):
    requests = (
        [request for kwargs in IDENTITY_GROUPS.values() for request in _with(kwargs)]
        + [{**BASE_REQUESTS[i], "mm_kwargs": {"tokcomp_method": m, "tokcomp_budget": b}} for m, b, i in COMPRESSED]
        + [{**BASE_REQUESTS[0], "mm_kwargs": {"tokcomp_method": "mustdrop", "tokcomp_budget": "auto"}}]
        + [{**BASE_REQUESTS[2], "mm_kwargs": {"tokcomp_method": "tome", "tokcomp_ratio": 0.25}}]
        + [{**BASE_REQUESTS[0], "mm_kwargs": {"tokcomp_method": "uniform", "tokcomp_budget": 0}}]
    )
    job = {"model": str(tiny_llava_dir), "requests": requests, "max_tokens": MAX_TOKENS}
    return run_engine(job, vllm_env, plugins="tokcomp", kv_log=tmp_path_factory.mktemp("kv") / "plugin.jsonl")


def _group(result, index):
    n = len(BASE_REQUESTS)
    return result["results"][index * n : (index + 1) * n]


def test_baseline_is_not_degenerate(plain):
    outputs = [r["output"] for r in plain["results"]]
    assert all(len(o) == MAX_TOKENS for o in outputs)
    assert len({tuple(o) for o in outputs}) > 1, "different images should give different greedy outputs"


@pytest.mark.parametrize("group", range(len(IDENTITY_GROUPS)), ids=list(IDENTITY_GROUPS))
def test_identity_settings_match_plain_vllm_token_for_token(plain, plugin, group):
    assert _group(plugin, group) == plain["results"]


def test_prompt_tokens_are_text_plus_budget(plain, plugin):
    offset = OFFSET
    for k, (method, budget, base) in enumerate(COMPRESSED):
        result = plugin["results"][offset + k]
        images = len(BASE_REQUESTS[base]["images"])
        text_tokens = plain["results"][base]["prompt_tokens"] - images * FULL
        assert result["prompt_tokens"] == text_tokens + images * budget, (method, budget)


def test_kv_blocks_read_from_engine_drop_with_the_budget(plain, plugin):
    offset = OFFSET
    kv_plain = plain["kv"]
    kv = plugin["kv"]
    assert len(kv) == len(plugin["results"]) - 1  # the rejected request never reached the engine
    for k, (method, budget, base) in enumerate(COMPRESSED):
        record = kv[offset + k]
        block = record["block_size"]
        prompt = plugin["results"][offset + k]["prompt_tokens"]
        assert record["prompt_tokens"] == prompt
        # KV for the prompt plus the generated tokens that were fed back (all but the last).
        assert record["max_blocks"] == math.ceil((prompt + MAX_TOKENS - 1) / block), (method, budget)
        assert record["max_blocks"] < kv_plain[base]["max_blocks"]


def test_bad_request_value_is_a_clear_error(plugin):
    error = plugin["results"][-1]
    assert error["error_type"] in ("RequestSettingError", "ValueError")
    assert "tokcomp_budget" in error["error"]


def test_auto_budget_is_the_pixel_redundancy_estimate(tiny_llava_dir, plain, plugin):
    from transformers import AutoProcessor

    from vllm_tokcomp.auto_budget import adaptive_budget

    from .images import make_image

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    pixels = processor.image_processor(make_image(BASE_REQUESTS[0]["images"][0]), return_tensors="pt")["pixel_values"]
    expected = adaptive_budget(pixels[0], FULL)
    assert expected < FULL  # the test image has flat regions
    text_tokens = plain["results"][0]["prompt_tokens"] - FULL
    assert plugin["results"][OFFSET + len(COMPRESSED)]["prompt_tokens"] == text_tokens + expected


def test_ratio_keeps_a_share_of_every_image(plain, plugin):
    text_tokens = plain["results"][2]["prompt_tokens"] - 2 * FULL
    assert plugin["results"][OFFSET + len(COMPRESSED) + 1]["prompt_tokens"] == text_tokens + 2 * 144  # 576 / 4 each
