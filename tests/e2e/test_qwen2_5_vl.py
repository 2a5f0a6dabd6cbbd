"""Real vLLM, tiny Qwen2.5-VL (window-attention tower): the same contract as Qwen2-VL
(tests/e2e/test_qwen2_vl.py), and vLLM's EVS flag together with tokcomp refuses to start."""

import pytest

from .test_qwen2_vl import BASE_REQUESTS, IMAGE_PAD, MAX_TOKENS, _grids, _kept, _run, expected_positions, start_engine

pytestmark = pytest.mark.slow

IDENTITY = [None, {"tokcomp_method": "pool", "tokcomp_budget": 10_000}]
COMPRESSED = [("pool", 36, 0), ("uniform", 50, 2), ("bilinear", 24, 1)]


def _requests():
    requests = [{**r, "mm_kwargs": kwargs} for kwargs in IDENTITY for r in BASE_REQUESTS]
    return requests + [
        {**BASE_REQUESTS[i], "mm_kwargs": {"tokcomp_method": m, "tokcomp_budget": b}} for m, b, i in COMPRESSED
    ]


@pytest.fixture(scope="module")
def plain(qwen25_dir, vllm_env, tmp_path_factory):
    job = {"model": str(qwen25_dir), "requests": BASE_REQUESTS}
    return _run(job, vllm_env, "", tmp_path_factory.mktemp("pos") / "plain.jsonl")


@pytest.fixture(scope="module")
def plugin(qwen25_dir, vllm_env, tmp_path_factory):
    job = {"model": str(qwen25_dir), "requests": _requests()}
    return _run(job, vllm_env, "tokcomp", tmp_path_factory.mktemp("pos") / "plugin.jsonl")


def _strip(results):
    return [{k: r[k] for k in ("prompt_tokens", "output")} for r in results]


def test_identity_settings_match_plain_vllm_token_for_token(plain, plugin):
    outputs = [tuple(r["output"]) for r in plain["results"]]
    assert all(len(o) == MAX_TOKENS for o in outputs) and len(set(outputs)) > 1
    n = len(BASE_REQUESTS)
    for group in range(len(IDENTITY)):
        assert _strip(plugin["results"][group * n : (group + 1) * n]) == _strip(plain["results"]), IDENTITY[group]


def test_prompt_tokens_and_engine_positions(plain, plugin):
    by_prompt = {tuple(record["prompt"]): record for record in plugin["positions"]}
    requests = _requests()
    for request, result in zip(requests, plugin["results"], strict=True):
        spec = request["mm_kwargs"] or {"tokcomp_method": "none", "tokcomp_budget": 10_000}
        grids = _grids(request)
        kept = [_kept(spec["tokcomp_method"], spec["tokcomp_budget"], grid) for grid in grids]
        assert result["prompt"].count(IMAGE_PAD) == sum(len(k) for k in kept), spec
        positions, delta = expected_positions(result["prompt"], grids, kept)
        record = by_prompt[tuple(result["prompt"])]
        assert (record["positions"], record["delta"]) == (positions, delta), spec


def test_evs_flag_with_tokcomp_refuses_to_start(qwen25_dir, vllm_env, tmp_path):
    job = {
        "model": str(qwen25_dir),
        "requests": BASE_REQUESTS[:1],
        "engine_mm_kwargs": {"tokcomp_method": "pool", "tokcomp_budget": 32},
        "llm_kwargs": {"video_pruning_rate": 0.5},
    }
    proc = start_engine(job, vllm_env, "tokcomp", tmp_path / "pos.jsonl")
    assert proc.returncode != 0 and "RESULT " not in proc.stdout
    assert "cannot be combined with vLLM's video_pruning_rate" in proc.stdout + proc.stderr
