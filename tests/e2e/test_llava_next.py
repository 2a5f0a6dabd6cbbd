"""Real vLLM, tiny LLaVA-NeXT (anyres: a base view plus unpadded tiles with a newline token per row).

Off, or a budget covering every placeholder, is token-identical to plain vLLM. On, an image keeps exactly its count
(``min(budget, base + grid)`` visual tokens, no newlines; a ratio of every placeholder), split between the base view
and the tile grid (``integration/parts.visual_counts``, by hand below), for layout, similarity, [CLS]-attention
and text-guided methods, several images of different tilings in one prompt; methods the integration cannot serve are
refused naming the field. ``tokcomp serve tiny-llava-next`` with the ``openai`` client: per-request budgets, 400s.

Runner: ``python -m tests.e2e.test_llava_next JOB`` (one engine per process).
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from vllm_tokcomp.launch import ServerProcess

from .conftest import check_tiled_preview, post_preview, run_runner_module
from .images import request_image_url

pytestmark = pytest.mark.slow

MAX_TOKENS = 6
IMAGE_TOKEN = 4  # the tiny LLaVA's <image>
SQUARE, WIDE = [1, 336, 336], [5, 448, 224]
# placeholders per image, as vLLM counts them: 336 x 336 -> 576 + 24 x 24 tiles grid + 24 newlines;
# 448 x 224 -> 576 + 24 x 48 + 24
FULL = {(336, 336): 1176, (448, 224): 1752}
BASE = [
    {"images": [SQUARE], "question": "What color is the circle?"},
    {"images": [WIDE], "question": "Is there a square?"},
    {"images": [[3, 336, 336], WIDE], "question": "Which image has more shapes?"},
]
IDENTITY = {"unconfigured": None, "budget=everything": {"tokcomp_method": "pool", "tokcomp_budget": 10_000}}
# (settings, base request, tokens per image by hand)
COMPRESSED = [
    ({"tokcomp_method": "pool", "tokcomp_budget": 64}, 0, [64]),
    ({"tokcomp_method": "vispruner", "tokcomp_budget": 64}, 1, [64]),
    ({"tokcomp_method": "divprune", "tokcomp_ratio": 0.1}, 2, [118, 176]),  # ceil(0.1 * 1176), ceil(0.1 * 1752)
    ({"tokcomp_method": "tome", "tokcomp_budget": 30}, 2, [30, 30]),
    ({"tokcomp_method": "text_relevance", "tokcomp_budget": 20}, 0, [20]),
    ({"tokcomp_method": "scope", "tokcomp_budget": 48}, 1, [48]),
    ({"tokcomp_method": "cdpruner", "tokcomp_budget": 40}, 2, [40, 40]),
    ({"tokcomp_method": "uniform", "tokcomp_budget": 1175}, 0, [1152]),  # every visual token, the newlines dropped
]
REFUSED = [({"tokcomp_method": "mustdrop", "tokcomp_budget": 64}, "tokcomp_method"),
           ({"tokcomp_method": "pool", "tokcomp_budget": "auto"}, "tokcomp_budget"),
           ({"tokcomp_method": "pool", "tokcomp_budget": 0}, "tokcomp_budget")]


def _served_methods():
    from vllm_tokcomp.integration.llava_next import serves
    from vllm_tokcomp.methods import available_methods

    return [m for m in available_methods() if serves(m)]


MATRIX_BUDGET = 48  # on the wide image: 16 on the base view, 32 on the tile grid


def _requests():
    requests = [{**r, "mm_kwargs": kwargs} for kwargs in IDENTITY.values() for r in BASE]
    requests += [{**BASE[base], "mm_kwargs": kwargs} for kwargs, base, _ in COMPRESSED]
    requests += [{**BASE[1], "mm_kwargs": {"tokcomp_method": m, "tokcomp_budget": MATRIX_BUDGET}}
                 for m in _served_methods()]
    return requests + [{**BASE[0], "mm_kwargs": kwargs} for kwargs, _ in REFUSED]


def _run(job, env, plugins):
    return run_runner_module("tests.e2e.test_llava_next", job, env, plugins=plugins, logs={})


@pytest.fixture(scope="module")
def llava_next_dir():
    from vllm_tokcomp.tiny.llava_next_builder import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="module")
def plain(llava_next_dir, vllm_env):
    return _run({"model": str(llava_next_dir), "requests": BASE}, vllm_env, "")


@pytest.fixture(scope="module")
def plugin(llava_next_dir, vllm_env):
    return _run({"model": str(llava_next_dir), "requests": _requests()}, vllm_env, "tokcomp")


@pytest.fixture(scope="module")
def chunked(llava_next_dir, vllm_env):
    """Prefill in chunks of 32 tokens: every compressed image (20-294 tokens) is cut across steps."""
    job = {"model": str(llava_next_dir), "requests": [{**BASE[base], "mm_kwargs": kw} for kw, base, _ in COMPRESSED],
           "llm_kwargs": {"max_num_batched_tokens": 32, "enable_chunked_prefill": True, "max_num_seqs": 4}}
    return _run(job, vllm_env, "tokcomp")


def test_chunked_prefill_gives_the_same_prompts_and_outputs(plugin, chunked):
    """vLLM takes a cut image's rows from its encoder cache: compression runs once per image, and the cached rows
    are the ones the placeholders were counted for."""
    offset = len(IDENTITY) * len(BASE)
    unchunked = plugin["results"][offset:offset + len(COMPRESSED)]
    assert [(r["prompt"], r["output"]) for r in chunked["results"]] == [(r["prompt"], r["output"]) for r in unchunked]


def test_plain_vllm_counts_base_tiles_and_newlines(plain):
    for request, result in zip(BASE, plain["results"], strict=True):
        assert result["prompt"].count(IMAGE_TOKEN) == sum(FULL[(w, h)] for _, w, h in request["images"])
        assert result["output"]


@pytest.mark.parametrize("group", range(len(IDENTITY)), ids=list(IDENTITY))
def test_identity_settings_match_plain_vllm_token_for_token(plain, plugin, group):
    got = plugin["results"][group * len(BASE):(group + 1) * len(BASE)]
    assert [(r["prompt"], r["output"]) for r in got] == [(r["prompt"], r["output"]) for r in plain["results"]]


def test_prompt_is_text_plus_each_images_count(plain, plugin):
    offset = len(IDENTITY) * len(BASE)
    for k, (kwargs, base, by_hand) in enumerate(COMPRESSED):
        full = plain["results"][base]["prompt"]
        result = plugin["results"][offset + k]
        assert "error" not in result, (kwargs, result)
        assert result["prompt"].count(IMAGE_TOKEN) == sum(by_hand), kwargs
        assert [t for t in result["prompt"] if t != IMAGE_TOKEN] == [t for t in full if t != IMAGE_TOKEN]
        assert result["output"], kwargs


def test_every_served_method_keeps_exactly_its_count(plugin):
    """Every method LLaVA-NeXT serves (its declared rule, so a new method joins here), on the wide image."""
    offset = len(IDENTITY) * len(BASE) + len(COMPRESSED)
    methods = _served_methods()
    assert {"cls_topk", "tome", "text_relevance", "pool"} <= set(methods) and "mustdrop" not in methods
    for method, result in zip(methods, plugin["results"][offset:offset + len(methods)], strict=True):
        assert "error" not in result, (method, result)
        assert result["prompt"].count(IMAGE_TOKEN) == MATRIX_BUDGET, method
        assert result["output"], method


def test_unservable_settings_are_refused_naming_the_field(plugin):
    for (_kwargs, field), result in zip(REFUSED, plugin["results"][-len(REFUSED):], strict=True):
        assert field in result["error"], result


# ----------------------------------------------------------------------------- server + openai client
@pytest.fixture(scope="module")
def server(llava_next_dir, vllm_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("llava-next-server") / "server.log"
    args = ["tiny-llava-next", "--method", "pool", "--budget", "64", "--max-model-len", "4096",
            "--served-model-name", "tiny-next", "--preview", "--limit-mm-per-prompt", '{"image": 2}']
    with ServerProcess(args, env=vllm_env, log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _messages(images) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": request_image_url(*image)}} for image in images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": "What color is the circle?"}]}]


def _ask(client, images, mm_kwargs=None):
    messages = _messages(images)
    extra = {"mm_processor_kwargs": mm_kwargs} if mm_kwargs is not None else None
    return client.chat.completions.create(model="tiny-next", messages=messages, max_tokens=4, temperature=0.0,
                                          extra_body=extra)


def test_openai_client_per_request_budgets_and_400s(client):
    full = _ask(client, [SQUARE, WIDE], {"tokcomp_method": "none"}).usage.prompt_tokens
    text = full - 1176 - 1752
    assert _ask(client, [SQUARE, WIDE]).usage.prompt_tokens == text + 64 + 64  # the server's own budget
    kwargs = [{"tokcomp_budget": 10}, {"tokcomp_method": "cls_topk", "tokcomp_budget": 32},
              {"tokcomp_method": "dart", "tokcomp_ratio": 0.05}, {"tokcomp_method": "none"}]
    with ThreadPoolExecutor(4) as pool:
        usage = list(pool.map(lambda kw: _ask(client, [SQUARE, WIDE], kw).usage.prompt_tokens, kwargs))
    assert usage == [text + 20, text + 64, text + 59 + 88, full]  # ceil(0.05 * 1176), ceil(0.05 * 1752)
    with pytest.raises(openai.BadRequestError, match="tokcomp_method"):
        _ask(client, [SQUARE], {"tokcomp_method": "mustdrop_s2"})
    with pytest.raises(openai.BadRequestError, match="tokcomp_budget"):
        _ask(client, [SQUARE], {"tokcomp_budget": "auto"})
    assert _ask(client, [SQUARE]).choices[0].message.content is not None


@pytest.mark.parametrize("kwargs", [{"tokcomp_method": "tome", "tokcomp_budget": 32},
                                    {"tokcomp_method": "pool", "tokcomp_budget": 20}])
def test_preview_groups_follow_the_placeholders_and_match_the_chat_request(server, client, kwargs):
    """The preview's counts and groups (one per placeholder, newlines dropped); the chat request then reports the
    preview's prompt size."""
    images = [SQUARE, WIDE]
    preview = post_preview(server.base_url, {"model": "tiny-next", "messages": _messages(images),
                                             "mm_processor_kwargs": kwargs})
    check_tiled_preview(preview, kwargs, full=[1176, 1752], base=576, side=24)
    assert _ask(client, images, kwargs).usage.prompt_tokens == preview["prompt_tokens"]


# ----------------------------------------------------------------------------- runner
def main() -> None:
    job = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    from tests.e2e.images import request_image

    engine = {"max_model_len": 4096, "max_num_batched_tokens": 4096, **job.get("llm_kwargs", {})}
    llm = LLM(model=job["model"], enforce_eager=True, seed=0, limit_mm_per_prompt={"image": 2}, **engine)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    results = []
    for request in job["requests"]:
        content = [{"type": "image_pil", "image_pil": request_image(*image)} for image in request["images"]]
        content.append({"type": "text", "text": request["question"]})
        try:
            output = llm.chat([{"role": "user", "content": content}], params,
                              mm_processor_kwargs=request.get("mm_kwargs"), use_tqdm=False)[0]
            results.append({"prompt": list(output.prompt_token_ids), "output": list(output.outputs[0].token_ids)})
        except ValueError as error:
            results.append({"error": str(error), "error_type": type(error).__name__})
    print("RESULT " + json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    main()
