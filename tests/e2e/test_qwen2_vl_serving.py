"""Real vLLM, tiny Qwen2-VL, the serving situations positions can go wrong in: one batch of requests with
different budgets (count, share, off), chunked prefill splitting an image, an image at the end of the prompt;
KV blocks read from the engine; and ``tokcomp serve`` driven by the ``openai`` client.

Offline engines run in fresh processes (this file is the runner: ``python -m tests.e2e.test_qwen2_vl_serving JOB``).
"""

import base64
import io
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from vllm_tokcomp.launch import ServerProcess

from .conftest import run_runner_module
from .images import request_image_url
from .test_qwen2_vl import GRIDS, IMAGE_PAD, _count, _kept, expected_positions

pytestmark = pytest.mark.slow

MAX_TOKENS = 6
WIDE = [5, 448, 224]
SQUARE = [1, 336, 336]
LONG_TEXT = "Look closely at the picture and think about the shapes, colours and positions before answering. " * 3
# (images, question, text first?, mm_processor_kwargs); the last request puts its image after a long text.
REQUESTS = [
    ([SQUARE], "What colour is the circle?", False, {"tokcomp_method": "pool", "tokcomp_budget": 36}),
    ([WIDE], "Is there a square?", False, {"tokcomp_method": "uniform", "tokcomp_ratio": 0.5}),
    ([SQUARE, WIDE], "Which image has more shapes?", False, {"tokcomp_method": "bilinear", "tokcomp_budget": 20}),
    ([WIDE], "Is there a square?", False, None),
    ([SQUARE], "What colour is the circle?", False, {"tokcomp_method": "random", "tokcomp_budget": 30}),
    ([SQUARE], LONG_TEXT, True, {"tokcomp_method": "pool", "tokcomp_budget": 16}),
]


def _run(job, env, log_dir, name):
    logs = {"positions": ("TOKCOMP_POSITIONS_LOG", log_dir / f"{name}-positions.jsonl"),
            "kv": ("TOKCOMP_KV_LOG", log_dir / f"{name}-kv.jsonl")}
    return run_runner_module("tests.e2e.test_qwen2_vl_serving", job, env, plugins="tokcomp", logs=logs)


@pytest.fixture(scope="module")
def engine(qwen_dir, vllm_env, tmp_path_factory):
    """One engine: every request alone (KV log: one line each), then all of them in one ``generate`` batch."""
    job = {"model": str(qwen_dir), "requests": REQUESTS, "modes": ["solo", "batch"]}
    return _run(job, vllm_env, tmp_path_factory.mktemp("qwen-serving"), "engine")


@pytest.fixture(scope="module")
def chunked(qwen_dir, vllm_env, tmp_path_factory):
    """Prefill in chunks of 32 tokens: every image (16-144 kept tokens) is split across steps."""
    job = {"model": str(qwen_dir), "requests": REQUESTS, "modes": ["solo"],
           "llm_kwargs": {"max_num_batched_tokens": 32, "enable_chunked_prefill": True, "max_num_seqs": 4}}
    return _run(job, vllm_env, tmp_path_factory.mktemp("qwen-chunked"), "chunked")


def _grids(images):
    return [GRIDS[(w, h)] for _, w, h in images]


def test_prompt_tokens_and_positions_per_request(engine):
    by_prompt = {tuple(r["prompt"]): r for r in engine["positions"]}
    text_first = None
    for (images, _question, _first, kwargs), result in zip(REQUESTS, engine["solo"], strict=True):
        grids = _grids(images)
        counts = [_count(kwargs, h * w) for h, w in grids]
        assert result["prompt"].count(IMAGE_PAD) == sum(counts), kwargs
        method = (kwargs or {}).get("tokcomp_method", "none")
        kept = [_kept(method, c, g) if method != "none" else list(range(math.prod(g))) for c, g in zip(
            counts, grids, strict=True)]
        positions, delta = expected_positions(result["prompt"], grids, kept)
        record = by_prompt[tuple(result["prompt"])]
        assert record["positions"] == positions and record["delta"] == delta, kwargs
        text_first = result
    # The last request's image sits near the end: after it come only the template's closing tokens.
    last_image = max(i for i, t in enumerate(text_first["prompt"]) if t == IMAGE_PAD)
    assert len(text_first["prompt"]) - last_image < 12 < last_image - 16


def test_kv_blocks_follow_the_kept_prompt(engine):
    assert len(engine["kv"]) == 2 * len(REQUESTS)  # one record per finished request: solo phase first, in order
    for record, result in zip(engine["kv"][: len(REQUESTS)], engine["solo"], strict=True):
        assert record["prompt_tokens"] == len(result["prompt"])
        assert record["max_blocks"] == math.ceil((len(result["prompt"]) + MAX_TOKENS - 1) / record["block_size"])


def test_mixed_budgets_in_one_batch_match_solo_runs(engine):
    assert [r["prompt"] for r in engine["batch"]] == [r["prompt"] for r in engine["solo"]]
    assert [r["output"] for r in engine["batch"]] == [r["output"] for r in engine["solo"]]
    assert len({tuple(r["output"]) for r in engine["solo"]}) > 1


def test_chunked_prefill_splitting_images_changes_nothing(engine, chunked):
    assert [r["prompt"] for r in chunked["solo"]] == [r["prompt"] for r in engine["solo"]]
    assert [r["output"] for r in chunked["solo"]] == [r["output"] for r in engine["solo"]]
    # Positions are computed once per request, before any chunk runs: identical records.
    solo_positions = engine["positions"][: len(REQUESTS)]
    assert sorted(map(json.dumps, chunked["positions"])) == sorted(map(json.dumps, solo_positions))


# ----------------------------------------------------------------------------- tokcomp serve + openai client
@pytest.fixture(scope="module")
def server(qwen_dir, vllm_env, tmp_path_factory, selection_log):
    log = tmp_path_factory.mktemp("qwen-server") / "server.log"
    args = [str(qwen_dir), "--method", "pool", "--ratio", "0.25", "--max-model-len", "2048",
            "--served-model-name", "tiny-qwen", "--limit-mm-per-prompt", '{"image": 2, "video": 0}', "--preview"]
    with ServerProcess(args, env={**vllm_env, "TOKCOMP_SELECTION_LOG": str(selection_log)}, log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _messages(images):
    content = [{"type": "image_url", "image_url": {"url": request_image_url(*image)}} for image in images]
    content.append({"type": "text", "text": "What colour is the circle?"})
    return [{"role": "user", "content": content}]


def _ask(client, images, mm_kwargs=None):
    extra = {"mm_processor_kwargs": mm_kwargs} if mm_kwargs is not None else None
    return client.chat.completions.create(model="tiny-qwen", messages=_messages(images), max_tokens=4,
                                          temperature=0.0, extra_body=extra)


def test_openai_client_server_ratio_and_per_request_budgets(client):
    full = _ask(client, [SQUARE, WIDE], {"tokcomp_method": "none"}).usage.prompt_tokens
    text = full - 144 - 128
    assert _ask(client, [SQUARE, WIDE]).usage.prompt_tokens == text + 36 + 32  # server: a quarter of each image
    with ThreadPoolExecutor(4) as pool:  # concurrent requests with their own budgets
        kwargs = [{"tokcomp_budget": 10}, {"tokcomp_ratio": 0.5}, {"tokcomp_method": "uniform", "tokcomp_budget": 7},
                  {"tokcomp_method": "none"}]
        usage = list(pool.map(lambda kw: _ask(client, [SQUARE, WIDE], kw).usage.prompt_tokens, kwargs))
    assert usage == [text + 20, text + 72 + 64, text + 14, full]


def test_openai_client_text_guided_requests_next_to_fixed_layout_ones(client):
    """Concurrent requests: text-guided selections (positions rewritten by the runner's hook) next to the server's
    own pooling, each with exactly its own count per image."""
    full = _ask(client, [SQUARE, WIDE], {"tokcomp_method": "none"}).usage.prompt_tokens
    text = full - 144 - 128
    kwargs = [{"tokcomp_method": "text_relevance", "tokcomp_budget": 20},
              {"tokcomp_method": "pumer", "tokcomp_ratio": 0.25},
              {"tokcomp_budget": 10}, {"tokcomp_method": "text_relevance", "tokcomp_budget": 5}]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda kw: _ask(client, [SQUARE, WIDE], kw), kwargs))
    assert [r.usage.prompt_tokens for r in replies] == [text + 40, text + 36 + 32, text + 20, text + 10]
    assert all(r.choices[0].message.content is not None for r in replies)


def test_openai_client_bad_request_is_400_and_server_stays_up(client):
    with pytest.raises(openai.BadRequestError, match="tokcomp_method"):
        _ask(client, [SQUARE], {"tokcomp_method": "cls_topk"})
    with pytest.raises(openai.BadRequestError, match="tokcomp_ratio"):
        _ask(client, [SQUARE], {"tokcomp_ratio": 0})
    assert _ask(client, [SQUARE]).choices[0].message.content is not None


# ----------------------------------------------------------------------------- runner
def main() -> None:
    job = json.loads(sys.argv[1])
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from tests.e2e.images import make_image

    processor = AutoProcessor.from_pretrained(job["model"])
    llm = LLM(model=job["model"], max_model_len=2048, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"image": 2, "video": 0},
              scheduler_cls="vllm_tokcomp.integration.kv_probe.BlockRecordingScheduler", **job.get("llm_kwargs", {}))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    prompts = []
    for images, question, text_first, kwargs in job["requests"]:
        images_part, text_part = [{"type": "image"} for _ in images], [{"type": "text", "text": question}]
        parts = text_part + images_part if text_first else images_part + text_part
        text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
        pixels = [make_image(seed, size=336).resize((w, h)) for seed, w, h in images]
        prompt = {"prompt": text, "multi_modal_data": {"image": pixels}}
        if kwargs:
            prompt["mm_processor_kwargs"] = kwargs
        prompts.append(prompt)

    def record(output):
        return {"prompt": list(output.prompt_token_ids), "output": list(output.outputs[0].token_ids)}

    result = {}
    if "solo" in job["modes"]:
        result["solo"] = [record(llm.generate([p], params, use_tqdm=False)[0]) for p in prompts]
    if "batch" in job["modes"]:
        result["batch"] = [record(o) for o in llm.generate(prompts, params, use_tqdm=False)]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()


# ----------------------------------------------------------------------------- preview endpoint
def _preview(server, images, mm_kwargs, query=""):
    import urllib.request

    body = {"model": "tiny-qwen", "messages": _messages(images), "mm_processor_kwargs": mm_kwargs}
    request = urllib.request.Request(f"{server.base_url}/tokcomp/preview{query}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


@pytest.mark.parametrize(("method", "decided"), [("pool", "frontend"), ("tome", "frontend"),
                                                 ("text_relevance", "engine")])
def test_preview_counts_and_groups_match_the_chat_request(server, client, selection_log, method, decided):
    """Two images of different grids: per image the merged-token count and a group map covering the kept count,
    from the processor (fixed layout, pixel-decided) or the engine (text-guided); the chat request then reports
    the same prompt size, and a text-guided one keeps what the preview said (its logged anchors head their own
    preview groups). Fresh images for the engine-decided method, so the encoder runs for the chat request."""
    seeds = {"pool": (3, 4), "tome": (5, 6), "text_relevance": (7, 8)}[method]
    images = [(seeds[0], *SQUARE[1:]), (seeds[1], *WIDE[1:])]
    kwargs = {"tokcomp_method": method, "tokcomp_budget": 12}
    answer = _preview(server, images, kwargs)
    items = answer["items"]
    assert [(i["tokens_before"], i["tokens_after"], i["decided"]) for i in items] == [(144, 12, decided),
                                                                                      (128, 12, decided)]
    for item in items:
        assert len(item["groups"]) == item["tokens_before"]
        assert sorted({g for g in item["groups"] if g >= 0}) == list(range(12))
    if method == "pool":  # fixed layout: the library's own pooling of each merged grid
        import torch

        from vllm_tokcomp.methods import VisualTokens, get_method

        for item, (h, w) in zip(items, [(12, 12), (8, 16)], strict=True):
            tokens = VisualTokens(torch.zeros(h * w, 1), (1, h, w))
            assert item["groups"] == get_method("pool")(tokens, 12).assignment.destination.tolist()
    before = len(_selections(selection_log))
    assert _ask(client, images, kwargs).usage.prompt_tokens == answer["prompt_tokens"]
    if decided == "engine":
        records = _selections(selection_log)[before:]
        assert len(records) == 2
        for item, record in zip(items, records, strict=True):
            assert [item["groups"][anchor] for anchor in record["anchors"]] == list(range(12))


def test_preview_draws_each_image_at_its_own_size(server):
    """``?png=true`` on Qwen2-VL: each image rebuilt from the processor's patches at the size the model sees, one
    28 px cell per merged token, dropped cells at a quarter of their brightness, kept ones tinted."""
    import numpy as np
    from PIL import Image

    from .images import make_image

    images = [(9, *SQUARE[1:]), (10, *WIDE[1:])]
    answer = _preview(server, images, {"tokcomp_method": "uniform", "tokcomp_budget": 12}, query="?png=true")
    for item, (seed, width, height) in zip(answer["items"], images, strict=True):
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["png"]))).convert("RGB"), dtype=np.float32)
        original = np.asarray(make_image(seed, size=336).resize((width, height)).convert("RGB"), dtype=np.float32)
        assert picture.shape == original.shape == (height, width, 3)
        columns = width // 28
        for index, group in enumerate(item["groups"]):
            row, col = divmod(index, columns)
            y, x = row * 28 + 14, col * 28 + 14
            dimmed = np.abs(picture[y, x] - 0.25 * original[y, x]).max() <= 3
            assert dimmed == (group < 0), (seed, index)


def _selections(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
