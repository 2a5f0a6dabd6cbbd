"""Bad and odd client input against the real ``tokcomp serve`` (vLLM's OpenAI server + plugin): every tokcomp
value is a 400 naming its field or a 200 with exactly the promised prompt tokens, never a 500 or a dead engine;
equal settings share vLLM's caches and different ones never do; 64 concurrent mixed requests answer as each
does alone.

Requests go out as raw JSON bytes (``httpx``) where the value is not expressible through the ``openai`` client
(``1e309``, ``NaN``, 1000-digit integers); the rest through the ``openai`` client.
"""

from __future__ import annotations

import base64
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from vllm_tokcomp.launch import ServerProcess

from .images import make_image

pytestmark = pytest.mark.slow

FULL = 576
SERVER_BUDGET = 64
MODEL = "tiny-llava"

# Raw JSON text for each value (what a client can put on the wire), by kind.
VALUES = {
    "true": "true", "false": "false", "null": "null", "list": "[64]", "dict": '{"a": 1}', "zero": "0",
    "minus_zero": "-0.0", "nan": "NaN", "inf": "Infinity", "minus_inf": "-Infinity", "overflow": "1e309",
    "denormal": "5e-324", "int63": str(2**63), "int64": str(2**64), "int1000": "9" * 1000, "negative": "-5",
    "half": "0.5", "one": "1", "one_float": "1.0", "string": '"64"', "long_string": json.dumps("x" * 100_000),
    "unicode": json.dumps("\u00e9\U0001f600"),
}
# Where each value goes: a top-level key, or a knob of a method.
SLOTS = {
    "tokcomp_method": lambda v: f'{{"tokcomp_method": {v}}}',
    "tokcomp_budget": lambda v: f'{{"tokcomp_budget": {v}}}',
    "tokcomp_ratio": lambda v: f'{{"tokcomp_ratio": {v}}}',
    "tokcomp_options": lambda v: f'{{"tokcomp_method": "mustdrop", "tokcomp_options": {v}}}',
    "tokcomp_options.seed": lambda v: f'{{"tokcomp_method": "random", "tokcomp_options": {{"seed": {v}}}}}',
    "tokcomp_options.window": lambda v: f'{{"tokcomp_method": "mustdrop", "tokcomp_options": {{"window": {v}}}}}',
    "tokcomp_options.threshold": lambda v: f'{{"tokcomp_method": "mustdrop", "tokcomp_options": {{"threshold": {v}}}}}',
    "tokcomp_options.uniform_multiple":
        lambda v: f'{{"tokcomp_method": "prumerge_plus", "tokcomp_options": {{"uniform_multiple": {v}}}}}',
    "tokcomp_options.stage1": lambda v: f'{{"tokcomp_method": "mustdrop", "tokcomp_options": {{"stage1": {v}}}}}',
}
# The inputs that took the server down or poisoned its caches, and other shapes of bad input.
NAMED = [
    '{"tokcomp_method": "random", "tokcomp_options": {"seed": 18446744073709551616}}',
    '{"tokcomp_method": "prumerge_plus", "tokcomp_options": {"uniform_multiple": 1e309}}',
    '{"tokcomp_method": "mustdrop", "tokcomp_options": {"window": 9223372036854775808}}',
    '{"tokcomp_method": "mustdrop_s1", "tokcomp_options": {"window": 1000000000000000000000000000000}}',
    '{"tokcomp_budget": 1' + "0" * 1100 + "}",
    '{"tokcomp_method": "none", "tokcomp_options": {"garbage": 1}}',
    '{"tokcomp_method": "tome", "tokcomp_options": {"\u00e9\U0001f600": 1}}',
    '{"tokcomp_\u00e9": 1}',
    '{"tokcomp_method": "tome", "tokcomp_options": {"' + "k" * 100_000 + '": 1}}',
    '{"tokcomp_method": "' + "m" * 100_000 + '"}',
    '{"tokcomp_query": "1,2,3"}',
    '{"tokcomp_resolved": "null"}',
    '{"tokcomp_connectors": ["/etc/passwd"]}',
    '{"tokcomp_allow_off": true}',
    '{"tokcomp_allowed_methods": ["none"]}',
    '{"tokcomp_method": "mustdrop", "tokcomp_budget": "auto", "tokcomp_options": {"window": 64, "threshold": -1}}',
    '{"tokcomp_method": "mustdrop", "tokcomp_budget": 1, "tokcomp_options": {"window": 64, "threshold": 5e-324}}',
    '{"tokcomp_method": "prumerge_plus", "tokcomp_budget": 1, "tokcomp_options": {"uniform_multiple": 100}}',
    '{"tokcomp_method": "random", "tokcomp_budget": 3, "tokcomp_options": {"seed": 9223372036854775807}}',
    '{"tokcomp_method": "pool", "tokcomp_budget": 7, "tokcomp_options": {"max_aspect_change": 1024}}',
    '{"tokcomp_budget": 1048576}',
    '{"tokcomp_ratio": 5e-324}',
]
CORPUS = [slot(value) for slot in SLOTS.values() for value in VALUES.values()] + NAMED


def image_url(seed: int) -> str:
    buffer = io.BytesIO()
    make_image(seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_body(mm_kwargs_json: str, *, seed: int | None = 1, max_tokens: int = 1) -> str:
    """A chat request as JSON text with the mm_processor_kwargs spliced in verbatim (``seed=None``: no image)."""
    content = [{"type": "text", "text": "What colour is the circle?"}]
    if seed is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url(seed)}})
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "temperature": 0.0, "mm_processor_kwargs": "@KWARGS@"})
    return body.replace('"@KWARGS@"', mm_kwargs_json)


def expected_image_tokens(mm_kwargs: dict) -> int:
    """The count a valid request promises on this server (tome, 64), written out independently of the plugin."""
    if mm_kwargs.get("tokcomp_method") == "none":
        return FULL
    if "tokcomp_budget" in mm_kwargs:
        return min(mm_kwargs["tokcomp_budget"], FULL)
    if "tokcomp_ratio" in mm_kwargs:
        return max(1, math.ceil(round(mm_kwargs["tokcomp_ratio"] * FULL, 6)))
    return SERVER_BUDGET


@pytest.fixture(scope="module")
def server(tiny_llava_dir, vllm_env, tmp_path_factory, selection_log):
    log = tmp_path_factory.mktemp("fuzz-server") / "server.log"
    args = ["--method", "tome", "--budget", str(SERVER_BUDGET), "--max-model-len", "2048",
            "--served-model-name", MODEL, "--max-num-seqs", "16"]
    env = {**vllm_env, "TOKCOMP_SELECTION_LOG": str(selection_log)}
    with ServerProcess(args, env=env, log_path=log) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def text_tokens(http):
    response = http.post("/v1/chat/completions", content=chat_body('{"tokcomp_method": "none"}'),
                         headers={"content-type": "application/json"})
    return response.json()["usage"]["prompt_tokens"] - FULL


def post(http, path: str, body: str) -> httpx.Response:
    return http.post(path, content=body.encode(), headers={"content-type": "application/json"})


def test_every_input_is_a_400_naming_its_field_or_an_exact_200(server, http, text_tokens):
    outcomes = {"400": 0, "200": 0}
    for index, mm_kwargs_json in enumerate(CORPUS):
        response = post(http, "/v1/chat/completions", chat_body(mm_kwargs_json, seed=index % 7))
        where = f"input {index}: {mm_kwargs_json[:120]}"
        assert response.status_code in (200, 400), f"{where} -> {response.status_code} {response.text[:500]}"
        assert server.is_healthy(), f"server died on {where}"
        if response.status_code == 400:
            message = response.json()["error"]["message"]
            assert "mm_processor_kwargs" in message or "JSON" in message or "json" in message, f"{where}: {message}"
            assert len(response.text) < 2000, f"{where}: the error echoes the value ({len(response.text)} bytes)"
            outcomes["400"] += 1
            continue
        mm_kwargs = json.loads(mm_kwargs_json)
        image = response.json()["usage"]["prompt_tokens"] - text_tokens
        if mm_kwargs.get("tokcomp_budget") == "auto":
            assert 1 <= image <= FULL, where
        else:
            assert image == expected_image_tokens(mm_kwargs), where
        outcomes["200"] += 1
    print(f"fuzz: {len(CORPUS)} inputs, {outcomes['400']} x 400, {outcomes['200']} x 200")
    assert outcomes["400"] > 150 and outcomes["200"] > 20  # both sides of the frontier were exercised
    good = post(http, "/v1/chat/completions", chat_body("{}"))
    assert good.json()["usage"]["prompt_tokens"] == text_tokens + SERVER_BUDGET


@pytest.mark.parametrize(
    ("mm_kwargs_json", "field"),
    [
        ('{"tokcomp_budget": 0}', "tokcomp_budget"),
        ('{"tokcomp_method": "random", "tokcomp_options": {"seed": 18446744073709551616}}', "tokcomp_options"),
        ('{"tokcomp_method": "none", "tokcomp_options": {"garbage": 1}}', "tokcomp_options"),
        ('{"tokcomp_ratio": 1e309}', "tokcomp_ratio"),
    ],
)
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_bad_values_without_an_image_are_400_too(http, mm_kwargs_json, field, endpoint):
    if endpoint == "chat":
        body = chat_body(mm_kwargs_json, seed=None)
        path = "/v1/chat/completions"
    else:
        body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 1, "mm_processor_kwargs": "@K@"})
        body, path = body.replace('"@K@"', mm_kwargs_json), "/v1/completions"
    response = post(http, path, body)
    assert response.status_code == 400, response.text[:500]
    assert f"mm_processor_kwargs.{field}" in response.json()["error"]["message"]
    good = post(http, path, body.replace(mm_kwargs_json, '{"tokcomp_budget": 8}'))
    assert good.status_code == 200


@pytest.mark.parametrize(("first", "second", "first_again", "seed"), [
    ('{"tokcomp_ratio": 5e-324}', '{"tokcomp_ratio": 1}', '{"tokcomp_ratio": 5e-324}', 101),
    ('{"tokcomp_ratio": 1}', '{"tokcomp_ratio": 5e-324}', '{"tokcomp_ratio": 1.0}', 102),
    ('{"tokcomp_method": "mustdrop", "tokcomp_budget": 40, "tokcomp_options": {"threshold": 5e-324}}',
     '{"tokcomp_method": "mustdrop", "tokcomp_budget": 40, "tokcomp_options": {"threshold": 1}}',
     '{"tokcomp_budget": 40, "tokcomp_options": {"threshold": 5e-324, "window": 3}, "tokcomp_method": "mustdrop"}',
     103),
])
def test_settings_that_hash_alike_in_vllm_never_share_a_cache_entry(http, text_tokens, selection_log, first, second,
                                                                    first_again, seed):
    """A fresh image, then the same image with a setting whose raw value vLLM's hasher cannot tell apart: the
    second request must be compressed anew (a selection record), with its own count; the first setting written
    another way is served from the cache (no record)."""
    records = []
    for mm_kwargs_json in (first, second, first_again):
        before = _count_lines(selection_log)
        response = post(http, "/v1/chat/completions", chat_body(mm_kwargs_json, seed=seed)).json()
        assert response["usage"]["prompt_tokens"] - text_tokens == expected_image_tokens(json.loads(mm_kwargs_json))
        records.append(_count_lines(selection_log) - before)
    assert records == [1, 1, 0]


def _count_lines(path) -> int:
    return sum(1 for _ in open(path)) if path.exists() else 0


def _mixed_requests() -> list[dict]:
    methods = ["tome", "pool", "divprune", "mustdrop", "cls_topk", "uniform", "text_relevance", "prumerge_plus"]
    budgets = [8, 33, 100, 700]
    requests = []
    for index in range(64):
        if index % 9 == 4:
            mm_kwargs = {"tokcomp_method": "none"}
        elif index % 9 == 7:
            mm_kwargs = {"tokcomp_budget": -index}  # bad: a 400 among the good ones
        else:
            mm_kwargs = {"tokcomp_method": methods[index % len(methods)], "tokcomp_budget": budgets[index % 4]}
        requests.append({"mm_kwargs": mm_kwargs, "seed": index % 5})
    return requests


def _ask(client: openai.OpenAI, request: dict) -> tuple:
    content = [{"type": "image_url", "image_url": {"url": image_url(request["seed"])}},
               {"type": "text", "text": "How many squares are there?"}]
    try:
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0.0,
            extra_body={"mm_processor_kwargs": request["mm_kwargs"]})
    except openai.BadRequestError as error:
        return 400, str(error)[:80]
    return 200, response.usage.prompt_tokens, response.choices[0].message.content


def test_64_concurrent_mixed_requests_answer_as_each_does_alone(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    requests = _mixed_requests()
    alone = [_ask(client, request) for request in requests]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        together = list(pool.map(lambda request: _ask(client, request), requests))
    assert together == alone
    assert sum(outcome[0] == 400 for outcome in alone) == 7
    assert server.is_healthy()
