"""The real ``tokcomp serve`` (vLLM's OpenAI server + plugin) driven by the real ``openai`` client."""

import base64
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from vllm_tokcomp.launch import ServerProcess

from .conftest import REPO, run_process_group
from .images import make_image

pytestmark = pytest.mark.slow

FULL = 576
DEFAULT_BUDGET = 64


def image_url(seed: int) -> str:
    buffer = io.BytesIO()
    make_image(seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def messages(seed: int = 1, question: str = "What colour is the circle?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url(seed)}},
                {"type": "text", "text": question},
            ],
        }
    ]


@pytest.fixture(scope="module")
def server(tiny_llava_dir, vllm_env, tmp_path_factory, selection_log):
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--method", "tome", "--budget", str(DEFAULT_BUDGET), "--max-model-len", "2048"]
    args += ["--served-model-name", "tiny-llava", "--max-num-seqs", "8", "--preview"]
    env = {**vllm_env, "TOKCOMP_SELECTION_LOG": str(selection_log)}
    with ServerProcess(args, env=env, log_path=log) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def ask(client, mm_kwargs=None, seed=1, question="What colour is the circle?"):
    extra = {"mm_processor_kwargs": mm_kwargs} if mm_kwargs is not None else None
    return client.chat.completions.create(
        model="tiny-llava", messages=messages(seed, question), max_tokens=4, temperature=0.0, extra_body=extra
    )


@pytest.fixture(scope="module")
def text_tokens(client):
    """Prompt tokens that are not image tokens, measured with compression switched off per request."""
    return ask(client, {"tokcomp_method": "none"}).usage.prompt_tokens - FULL


def test_startup_log_shows_effective_config(server):
    assert "tokcomp: compressing images with method=tome budget=64" in server.log_text()


def test_base64_image_request_uses_server_budget(client, text_tokens):
    response = ask(client)
    assert response.choices[0].message.content is not None
    assert response.usage.prompt_tokens == text_tokens + DEFAULT_BUDGET


@pytest.mark.parametrize(
    ("mm_kwargs", "image_tokens"),
    [
        ({"tokcomp_budget": 16}, 16),
        ({"tokcomp_method": "cls_topk", "tokcomp_budget": 100}, 100),
        ({"tokcomp_method": "uniform"}, DEFAULT_BUDGET),
        ({"tokcomp_budget": 5000}, FULL),
        ({"tokcomp_method": "mustdrop", "tokcomp_budget": 20, "tokcomp_options": {"stage1": False}}, 20),
        ({"tokcomp_ratio": 0.25}, 144),  # a share instead of the server's count: 576 / 4
        ({"tokcomp_method": "mustdrop", "tokcomp_budget": "auto", "tokcomp_options": {"auto_estimator": "texture"}},
         None),  # checked below against the estimator itself
    ],
)
def test_per_request_override(client, text_tokens, mm_kwargs, image_tokens):
    if image_tokens is None:  # "auto": the texture estimate of the image's own pixels
        from transformers import CLIPImageProcessor

        from vllm_tokcomp.auto_budget import adaptive_budget
        from vllm_tokcomp.tiny.llava_builder import default_model_dir

        pixels = CLIPImageProcessor.from_pretrained(default_model_dir())(make_image(1), return_tensors="pt")
        image_tokens = adaptive_budget(pixels["pixel_values"][0], FULL, estimator="texture")
        assert image_tokens < FULL
    assert ask(client, mm_kwargs).usage.prompt_tokens == text_tokens + image_tokens


def test_concurrent_requests_with_different_budgets_get_their_own_counts(client, text_tokens):
    budgets = [8, 200, 33, 120]
    with ThreadPoolExecutor(max_workers=len(budgets)) as pool:
        futures = [pool.submit(ask, client, {"tokcomp_budget": b}, seed) for seed, b in enumerate(budgets)]
        counts = [f.result().usage.prompt_tokens for f in futures]
    assert counts == [text_tokens + b for b in budgets]


@pytest.mark.parametrize(
    ("mm_kwargs", "field"),
    [
        ({"tokcomp_method": "bogus"}, "tokcomp_method"),
        ({"tokcomp_method": 7}, "tokcomp_method"),
        ({"tokcomp_budget": 0}, "tokcomp_budget"),
        ({"tokcomp_budget": -3}, "tokcomp_budget"),
        ({"tokcomp_budget": 2.5}, "tokcomp_budget"),
        ({"tokcomp_budget": "64"}, "tokcomp_budget"),
        ({"tokcomp_budget": [64]}, "tokcomp_budget"),
        ({"tokcomp_budget": True}, "tokcomp_budget"),
        ({"tokcomp_rate": 0.5}, "tokcomp_rate"),  # unknown tokcomp key
        ({"tokcomp_ratio": 0}, "tokcomp_ratio"),
        ({"tokcomp_ratio": 0.5, "tokcomp_budget": 8}, "tokcomp_ratio"),
        ({"tokcomp_options": {"no_such_knob": 1}}, "tokcomp_options"),
        ({"tokcomp_method": "mustdrop", "tokcomp_options": {"threshold": 7.0}}, "tokcomp_options"),
        # Not ours: the server trusts request kwargs only for the plugin's own keys.
        ({"size": {"shortest_edge": 4000}}, "size"),
        ({"do_resize": False}, "do_resize"),
    ],
)
def test_bad_request_values_are_400_and_server_keeps_serving(server, client, text_tokens, mm_kwargs, field):
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, mm_kwargs)
    assert error.value.status_code == 400
    assert field in str(error.value)
    assert server.is_healthy()
    assert ask(client).usage.prompt_tokens == text_tokens + DEFAULT_BUDGET


def test_tokcomp_serve_refuses_bad_config_before_starting_vllm(vllm_env):
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_tokcomp.cli", "serve", "--method", "tome", "--budget", "0"],
        env=vllm_env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "tokcomp_budget" in proc.stderr


def test_plain_vllm_serve_with_bad_config_fails_at_startup_naming_the_field(tiny_llava_dir, vllm_env):
    """The documented plain form (`vllm serve` + plugin) validates the config during engine startup."""
    bad = json.dumps({"tokcomp_method": "tome", "tokcomp_budget": -1})
    proc = run_process_group(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(tiny_llava_dir),
         "--mm-processor-kwargs", bad, "--max-model-len", "2048", "--port", "0"],
        {**vllm_env, "VLLM_PLUGINS": "tokcomp"}, timeout=300,
    )
    assert proc.returncode != 0
    assert "mm_processor_kwargs.tokcomp_budget" in proc.stdout + proc.stderr


def test_connector_trained_for_other_weights_stops_startup(tiny_llava_dir, vllm_env):
    """The bundled connectors were trained for the trained tiny LLaVA; this random-init one must refuse them."""
    listing = json.dumps({"tokcomp_connectors": [str(REPO / "connectors" / "qformer-16")]})
    proc = run_process_group(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(tiny_llava_dir),
         "--mm-processor-kwargs", listing, "--max-model-len", "2048", "--port", "0"],
        {**vllm_env, "VLLM_PLUGINS": "tokcomp"}, timeout=300,
    )
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "mm_processor_kwargs.tokcomp_connectors[0]" in output and "other model weights" in output


def _selections(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_text_guided_mustdrop_selects_per_question_and_caches_per_question(client, text_tokens, selection_log):
    """The question travels with the image into the multimodal hash and drives the LM probe."""
    mustdrop = {"tokcomp_method": "mustdrop", "tokcomp_budget": 48}
    image = 7  # not used by other tests, so nothing is cached yet
    before = len(_selections(selection_log))
    first = ask(client, mustdrop, seed=image, question="What colour is the big circle on the left?")
    second = ask(client, mustdrop, seed=image, question="How many squares are there?")
    records = _selections(selection_log)[before:]
    assert [r["method"] for r in records] == ["mustdrop", "mustdrop"]
    assert records[0]["anchors"] != records[1]["anchors"], "different questions should keep different tokens"
    assert len(records[0]["anchors"]) == len(records[1]["anchors"]) == 48
    again = ask(client, mustdrop, seed=image, question="What colour is the big circle on the left?")
    assert len(_selections(selection_log)) == before + 2, "the same question must be served from the cache"
    assert again.choices[0].message.content == first.choices[0].message.content
    questions = ("What colour is the big circle on the left?", "How many squares are there?")
    for response, question in zip((first, second), questions, strict=True):
        plain = ask(client, {"tokcomp_method": "none"}, seed=image, question=question).usage.prompt_tokens
        assert response.usage.prompt_tokens == plain - FULL + 48


@pytest.mark.parametrize("method", ["mustdrop_s2", "text_relevance", "pumer"])
def test_other_text_guided_methods_are_served(client, text_tokens, method):
    assert ask(client, {"tokcomp_method": method, "tokcomp_budget": 40}).usage.prompt_tokens == text_tokens + 40


def test_request_cannot_inject_the_internal_query(client):
    with pytest.raises(openai.BadRequestError, match="tokcomp_query"):
        ask(client, {"tokcomp_query": "1,2,3"})


def preview(server, mm_kwargs=None, seed=1, question="What colour is the circle?", query="") -> tuple[int, dict]:
    """``POST /tokcomp/preview`` with a chat body; (HTTP status, JSON answer)."""
    import urllib.error
    import urllib.request

    body = {"model": "tiny-llava", "messages": messages(seed, question)}
    if mm_kwargs is not None:
        body["mm_processor_kwargs"] = mm_kwargs
    request = urllib.request.Request(f"{server.base_url}/tokcomp/preview{query}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize(("mm_kwargs", "after"), [(None, DEFAULT_BUDGET),
                                                  ({"tokcomp_method": "cls_topk", "tokcomp_budget": 24}, 24),
                                                  ({"tokcomp_method": "pool", "tokcomp_ratio": 0.25}, 144),
                                                  ({"tokcomp_method": "none"}, FULL)])
def test_preview_counts_what_the_chat_request_then_uses(server, client, mm_kwargs, after):
    status, answer = preview(server, mm_kwargs, seed=2, question="Is there a square?")
    assert status == 200, answer
    reply = ask(client, mm_kwargs, seed=2, question="Is there a square?")
    assert answer["prompt_tokens"] == reply.usage.prompt_tokens
    [item] = answer["items"]
    assert (item["modality"], item["tokens_before"], item["tokens_after"]) == ("image", FULL, after)


def test_preview_gives_the_groups_known_before_the_encoder(server):
    """Content-blind methods: the patch -> token map, equal to the method's own, computed in the frontend."""
    import torch

    from vllm_tokcomp.methods import VisualTokens, get_method

    status, answer = preview(server, {"tokcomp_method": "uniform", "tokcomp_budget": 48})
    assert status == 200, answer
    expected = get_method("uniform")(VisualTokens(torch.zeros(FULL, 2), (24, 24)), 48).assignment.destination
    assert answer["items"][0]["groups"] == expected.tolist() and answer["items"][0]["decided"] == "frontend"


@pytest.mark.parametrize(("method", "image"), [("tome", 20), ("cls_topk", 21), ("mustdrop", 22),
                                               ("text_relevance", 23), ("divprune", 24)])
def test_preview_gives_the_selection_the_chat_request_then_makes(server, client, selection_log, method, image):
    """Methods that decide on the encoder's output: the engine's groups, and the chat request with the same body
    then keeps exactly those tokens (its logged anchors each head their own preview group; for pure pruning the
    kept set is the anchors). Fresh images, so the chat request is not served from the encoder cache."""
    settings = {"tokcomp_method": method, "tokcomp_budget": 40}
    question = "What colour is the big circle on the left?"
    status, answer = preview(server, settings, seed=image, question=question)
    assert status == 200, answer
    [item] = answer["items"]
    assert item["decided"] == "engine" and len(item["groups"]) == FULL
    assert sorted({g for g in item["groups"] if g >= 0}) == list(range(40))
    assert preview(server, settings, seed=image, question=question)[1]["items"][0]["groups"] == item["groups"]
    before = len(_selections(selection_log))
    reply = ask(client, settings, seed=image, question=question)
    assert reply.usage.prompt_tokens == answer["prompt_tokens"]
    [record] = _selections(selection_log)[before:]  # the previews logged nothing
    assert [item["groups"][anchor] for anchor in record["anchors"]] == list(range(40))
    if method in ("cls_topk", "divprune"):
        assert [i for i, g in enumerate(item["groups"]) if g >= 0] == sorted(record["anchors"])


def test_compression_time_is_on_the_metrics_per_served_item(server, client):
    """``tokcomp_compression_seconds``: one observation per image the engine compressed (fresh images; a cached
    one is not compressed again), none for previews."""

    def count() -> float:
        prefix = 'tokcomp_compression_seconds_count{method="adjacent",model="tiny-llava"}'
        lines = [line for line in server.get("/metrics").splitlines() if line.startswith(prefix)]
        return float(lines[0].split()[-1]) if lines else 0.0

    settings = {"tokcomp_method": "adjacent", "tokcomp_budget": 32}
    before = count()
    for image in (40, 41, 42):
        ask(client, settings, seed=image)
    assert preview(server, settings, seed=43)[0] == 200
    assert count() == before + 3
    ask(client, settings, seed=40)  # cached encoder output: nothing compressed
    assert count() == before + 3


def test_preview_draws_the_known_groups_on_request(server):
    """``?png=true``: the groups drawn over the image (dropped patches at a quarter of their brightness)."""
    import numpy as np
    from PIL import Image

    status, answer = preview(server, {"tokcomp_method": "uniform", "tokcomp_budget": 48}, query="?png=true")
    assert status == 200, answer
    item = answer["items"][0]
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["png"]))).convert("RGB"), dtype=np.float32)
    original = np.asarray(make_image(1).convert("RGB"), dtype=np.float32)  # 336 px: the processor keeps it
    assert picture.shape == original.shape == (336, 336, 3)
    centres = [(r * 14 + 7, c * 14 + 7) for r in range(24) for c in range(24)]
    for index, group in enumerate(item["groups"]):
        row, col = centres[index]
        dimmed = np.abs(picture[row, col] - 0.25 * original[row, col]).max() <= 3
        assert dimmed == (group < 0), index
    assert "png" not in preview(server, {"tokcomp_method": "uniform", "tokcomp_budget": 48})[1]["items"][0]


@pytest.mark.parametrize(("mm_kwargs", "field"), [({"tokcomp_budget": 0}, "mm_processor_kwargs.tokcomp_budget"),
                                                  ({"tokcomp_method": "nope"}, "mm_processor_kwargs.tokcomp_method"),
                                                  ({"tokcomp_preview": "x"}, "mm_processor_kwargs.tokcomp_preview")])
def test_preview_refuses_bad_settings_like_the_chat_endpoint(server, client, mm_kwargs, field):
    status, answer = preview(server, mm_kwargs)
    assert status == 400 and field in json.dumps(answer), answer
    with pytest.raises(openai.BadRequestError, match=field):
        ask(client, mm_kwargs)


def test_previews_are_not_counted_in_the_metrics(server):
    before = [line for line in server.get("/metrics").splitlines() if line.startswith("tokcomp_")]
    for _ in range(2):
        assert preview(server, {"tokcomp_method": "cls_topk", "tokcomp_budget": 24})[0] == 200
    after = [line for line in server.get("/metrics").splitlines() if line.startswith("tokcomp_")]
    assert after == before and after, "the chat requests before were counted; the previews add nothing"
