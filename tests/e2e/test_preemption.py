"""Compressed requests preempted under a tiny KV cache answer exactly as they do unpreempted; client limits.

The real ``tokcomp serve`` with a KV cache of a few blocks: sixteen concurrent requests (mixed methods, budgets,
compression off) that each fit alone but not together, so vLLM preempts and recomputes them, re-encoding or
re-reading their images; each must get its own count and the same greedy tokens as when it ran alone. The same
server bounds what clients may choose (the client-limit flags), and a request outside them is a 400 naming them.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from vllm_tokcomp.launch import ServerProcess

from .test_request_fuzz import MODEL, image_url

pytestmark = pytest.mark.slow

BLOCK = 128
# One block is vLLM's null block: 896 tokens, one uncompressed request (~635 + output) fits, four compressed do not
BLOCKS = 8
ALLOWED = ("tome", "mustdrop", "pool", "divprune", "text_relevance", "cls_topk")
OUTPUT_TOKENS = 128  # every request grows by a block while decoding: with all blocks taken, vLLM preempts


@pytest.fixture(scope="module")
def server(tiny_llava_dir, vllm_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("preemption-server") / "server.log"
    args = ["--method", "tome", "--budget", "64", "--max-model-len", str(BLOCK * (BLOCKS - 1)),
            "--served-model-name", MODEL, "--max-num-seqs", "16", "--block-size", str(BLOCK),
            "--num-gpu-blocks-override", str(BLOCKS), "--allowed-methods", ",".join(ALLOWED),
            "--budget-range", "16:256", "--ratio-range", "0.05:0.5"]
    with ServerProcess(args, env=vllm_env, log_path=log) as running:
        yield running


def _ask(client: openai.OpenAI, mm_kwargs: dict, seed: int) -> tuple:
    content = [{"type": "image_url", "image_url": {"url": image_url(seed)}},
               {"type": "text", "text": "What colour is the circle?"}]
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=OUTPUT_TOKENS, temperature=0.0,
        extra_body={"mm_processor_kwargs": mm_kwargs, "ignore_eos": True})
    return response.usage.prompt_tokens, response.usage.completion_tokens, response.choices[0].message.content


def _preemptions(server: ServerProcess) -> float:
    found = re.findall(r"^vllm:num_preemptions_total\{[^}]*\} ([0-9.e+]+)$", server.get("/metrics"), re.M)
    return sum(float(value) for value in found)


def _settled_preemptions(server: ServerProcess, wait: float = 10.0) -> float:
    """The preemption counter once it is non-zero or ``wait`` seconds have passed (vLLM publishes it with the
    engine's stats, a little after the requests finish)."""
    import time

    deadline = time.monotonic() + wait
    while (count := _preemptions(server)) == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    return count


def test_preempted_requests_answer_as_when_they_ran_alone(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    settings = [{}, {"tokcomp_budget": 16}, {"tokcomp_method": "mustdrop", "tokcomp_budget": 32},
                {"tokcomp_method": "pool", "tokcomp_ratio": 0.1}, {"tokcomp_method": "divprune", "tokcomp_budget": 48},
                {"tokcomp_method": "none"}, {"tokcomp_method": "text_relevance", "tokcomp_budget": 24},
                {"tokcomp_method": "cls_topk", "tokcomp_budget": 100}]
    requests = [(settings[index % len(settings)], index % 5) for index in range(16)]
    alone = [_ask(client, mm_kwargs, seed) for mm_kwargs, seed in requests]
    assert _preemptions(server) == 0
    # How many requests overlap depends on timing; a round without preemption (rare) is repeated, every round must
    # answer as the requests did alone.
    for _round in range(3):
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            together = list(pool.map(lambda request: _ask(client, *request), requests))
        assert together == alone
        assert all(completion == OUTPUT_TOKENS for _, completion, _ in together)
        if _settled_preemptions(server) > 0:
            break
    else:
        pytest.fail("the KV cache was meant to be too small for all of them at once: no preemption in 3 rounds")


def test_startup_line_names_the_client_limits(server):
    assert ("tokcomp: compressing images with method=tome budget=64; clients limited to methods "
            f"{', '.join(sorted(ALLOWED))}; budget [16, 256]; ratio [0.05, 0.5]") in server.log_text()


@pytest.mark.parametrize(
    ("mm_kwargs", "field", "limit"),
    [
        ({"tokcomp_method": "uniform"}, "tokcomp_method", "tokcomp_allowed_methods"),
        ({"tokcomp_budget": 8}, "tokcomp_budget", "tokcomp_budget_range"),
        ({"tokcomp_method": "pool", "tokcomp_budget": 300}, "tokcomp_budget", "tokcomp_budget_range"),
        ({"tokcomp_ratio": 0.75}, "tokcomp_ratio", "tokcomp_ratio_range"),
        ({"tokcomp_method": "mustdrop", "tokcomp_budget": "auto"}, "tokcomp_budget", "tokcomp_budget_range"),
    ],
)
def test_requests_outside_the_client_limits_are_400_naming_the_limit(server, mm_kwargs, field, limit):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    with pytest.raises(openai.BadRequestError) as error:
        _ask(client, mm_kwargs, seed=1)
    assert f"mm_processor_kwargs.{field}" in str(error.value) and limit in str(error.value)
    assert server.is_healthy()
