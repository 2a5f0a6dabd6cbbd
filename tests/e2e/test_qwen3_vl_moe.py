"""Real vLLM, tiny Qwen3-VL-MoE (the Qwen3-VL vision path with a mixture-of-experts LM): off and budget=everything are
token-identical to plain vLLM; on, each image keeps its count and each video frame its share, with the engine's
positions equal to the independent computation of ``test_qwen3_vl`` (a fixed-layout and a text-guided method, image and
video in one prompt). Engines run ``tests.e2e.test_qwen3_vl``'s runner."""

import pytest

from .conftest import run_runner_module
from .test_qwen3_vl import BASE, _check_positions, _counts

pytestmark = pytest.mark.slow

REQUESTS = [BASE[1], BASE[2]]
SETTINGS = [None, {"tokcomp_method": "pool", "tokcomp_budget": 10_000},
            {"tokcomp_method": "bilinear", "tokcomp_budget": 20}, {"tokcomp_method": "text_relevance",
                                                                    "tokcomp_ratio": 0.25}]


@pytest.fixture(scope="module")
def moe_dir():
    from vllm_tokcomp.tiny.qwen3_vl_builder import ensure_default_model

    return ensure_default_model("qwen3_vl_moe")


def _run(model, requests, env, plugins, tmp):
    logs = {"positions": ("TOKCOMP_POSITIONS_LOG", tmp / "positions.jsonl"),
            "selections": ("TOKCOMP_SELECTION_LOG", tmp / "selections.jsonl")}
    return run_runner_module("tests.e2e.test_qwen3_vl", {"model": str(model), "requests": requests}, env,
                             plugins=plugins, logs=logs)


@pytest.fixture(scope="module")
def plain(moe_dir, vllm_env, tmp_path_factory):
    return _run(moe_dir, REQUESTS, vllm_env, "", tmp_path_factory.mktemp("moe-plain"))


def _plugin_requests():
    return [{**r, "mm_kwargs": kwargs} for kwargs in SETTINGS for r in REQUESTS]


@pytest.fixture(scope="module")
def plugin(moe_dir, vllm_env, tmp_path_factory):
    return _run(moe_dir, _plugin_requests(), vllm_env, "tokcomp", tmp_path_factory.mktemp("moe-plugin"))


def test_off_and_budget_everything_match_plain_vllm(plain, plugin):
    want = [(r["prompt"], r["output"]) for r in plain["results"]]
    assert len({tuple(o) for _, o in want}) > 1
    for group in range(2):
        got = plugin["results"][group * len(REQUESTS):(group + 1) * len(REQUESTS)]
        assert [(r["prompt"], r["output"]) for r in got] == want, SETTINGS[group]


def test_counts_and_positions(plain, plugin, moe_dir):
    requests = _plugin_requests()
    for request, result, base in zip(requests, plugin["results"], plain["results"] * len(SETTINGS), strict=True):
        visual = sum(1 for t in base["prompt"] if t in (5, 6))
        assert len(result["prompt"]) == len(base["prompt"]) - visual + sum(_counts(request))
    assert _check_positions(plugin, requests, moe_dir) == len(requests) - len(REQUESTS)  # all but the unconfigured
