"""Real vLLM, tiny LLaVA-OneVision (SigLIP tower: a base view plus unpadded, possibly shrunk tiles with a newline per
row; videos as 2x2-pooled frames plus one newline).

Off, or a budget covering every placeholder, is token-identical to plain vLLM, for images and videos. On, an image
keeps exactly ``min(budget, base + grid)`` visual tokens (no newlines; a ratio of every placeholder), split between
the base view and the tile grid (``integration/parts.visual_counts``), and a video ``min(budget, frames * 196)``
spread over its frames (``parts.frame_counts``), both by hand below; several images of different tilings, an image
whose tile grid vLLM shrinks (anyres_max_9), an image and a video in one prompt, every method it serves; chunked
prefill cutting items; methods the SigLIP tower cannot serve are refused naming the field. ``tokcomp serve
tiny-llava-onevision`` with the ``openai`` client: per-request budgets, 400s.

Runner: ``python -m tests.e2e.test_llava_onevision JOB`` (one engine per process).
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
SQUARE, WIDE, LARGE = [1, 384, 384], [5, 500, 300], [7, 1200, 1500]
# Placeholders as vLLM counts them (SigLIP 27 x 27 per view): 384 x 384 -> 729 + 27 x 27 tiles + 27 newlines;
# 500 x 300 -> 729 + 27 x 46 + 27; 1200 x 1500 (3 x 4 tiles, shrunk) -> 729 + 90 x 72 + 90; a video of 4 frames ->
# 4 x 14 x 14 + 1.
FULL = {(384, 384): 1485, (500, 300): 1998, (1200, 1500): 7299}
FRAMES, FRAME_TOKENS = 4, 196
VIDEO_FULL = FRAMES * FRAME_TOKENS + 1
BASE = [
    {"images": [SQUARE], "video": None, "question": "What color is the circle?"},
    {"images": [WIDE], "video": None, "question": "What color is the circle?"},
    {"images": [[3, 384, 384], WIDE], "video": None, "question": "Which image has more shapes?"},
    {"images": [LARGE], "video": None, "question": "What color is the circle?"},
    {"images": [], "video": 1, "question": "Where does the ball go?"},
    {"images": [[2, 384, 384]], "video": 2, "question": "Is the shape in the picture also in the video?"},
]
IDENTITY = {"unconfigured": None, "budget=everything": {"tokcomp_method": "pool", "tokcomp_budget": 100_000}}
# (settings, base request, visual tokens per item by hand: images, then the video)
COMPRESSED = [
    ({"tokcomp_method": "pool", "tokcomp_budget": 64}, 0, [64]),  # 32 on the base view, 32 on the tile grid
    ({"tokcomp_method": "divprune", "tokcomp_ratio": 0.1}, 2, [149, 200]),  # ceil(148.5), ceil(199.8)
    ({"tokcomp_method": "tome", "tokcomp_budget": 30}, 3, [30]),  # on the shrunk grid
    ({"tokcomp_method": "text_relevance", "tokcomp_budget": 20}, 0, [20]),
    ({"tokcomp_method": "uniform", "tokcomp_budget": 1484}, 0, [1458]),  # every visual token, the newlines dropped
    ({"tokcomp_method": "divprune", "tokcomp_budget": 6}, 4, [6]),  # frames keep 2, 2, 1, 1
    ({"tokcomp_method": "bilinear", "tokcomp_ratio": 0.25}, 4, [197]),  # ceil(0.25 * 785): 50, 49, 49, 49
    ({"tokcomp_method": "cdpruner", "tokcomp_budget": 40}, 5, [40, 40]),  # the image's 40, the video's 10 per frame
    ({"tokcomp_method": "tome", "tokcomp_budget": 2}, 4, [4]),  # at least one token per frame
]
REFUSED = [({"tokcomp_method": "visionzip", "tokcomp_budget": 64}, "tokcomp_method"),
           ({"tokcomp_method": "mustdrop", "tokcomp_budget": 64}, "tokcomp_method"),
           ({"tokcomp_method": "pool", "tokcomp_budget": "auto"}, "tokcomp_budget"),
           ({"tokcomp_method": "pool", "tokcomp_budget": 0}, "tokcomp_budget")]
MATRIX_BUDGET = 48  # on the wide image: 17 on the base view, 31 on the tile grid; on the video: 12 per frame


def _served_methods():
    from vllm_tokcomp.integration.llava_onevision import serves
    from vllm_tokcomp.methods import available_methods

    return [m for m in available_methods() if serves(m)]


def _requests():
    requests = [{**r, "mm_kwargs": kwargs} for kwargs in IDENTITY.values() for r in BASE]
    requests += [{**BASE[base], "mm_kwargs": kwargs} for kwargs, base, _ in COMPRESSED]
    requests += [{**BASE[base], "mm_kwargs": {"tokcomp_method": m, "tokcomp_budget": MATRIX_BUDGET}}
                 for m in _served_methods() for base in (1, 4)]
    return requests + [{**BASE[0], "mm_kwargs": kwargs} for kwargs, _ in REFUSED]


def _run(job, env, plugins):
    return run_runner_module("tests.e2e.test_llava_onevision", job, env, plugins=plugins, logs={})


@pytest.fixture(scope="module")
def onevision_dir():
    from vllm_tokcomp.tiny.llava_onevision_builder import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="module")
def token_ids(onevision_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(onevision_dir)
    return config.image_token_index, config.video_token_index


@pytest.fixture(scope="module")
def plain(onevision_dir, vllm_env):
    return _run({"model": str(onevision_dir), "requests": BASE}, vllm_env, "")


@pytest.fixture(scope="module")
def plugin(onevision_dir, vllm_env):
    return _run({"model": str(onevision_dir), "requests": _requests()}, vllm_env, "tokcomp")


@pytest.fixture(scope="module")
def chunked(onevision_dir, vllm_env):
    """Prefill in chunks of 32 tokens: every compressed item is cut across steps."""
    job = {"model": str(onevision_dir), "requests": [{**BASE[base], "mm_kwargs": kw} for kw, base, _ in COMPRESSED],
           "llm_kwargs": {"max_num_batched_tokens": 32, "enable_chunked_prefill": True, "max_num_seqs": 4}}
    return _run(job, vllm_env, "tokcomp")


def _visual(prompt, token_ids):
    return sum(1 for t in prompt if t in token_ids)


def test_plain_vllm_counts_base_tiles_newlines_and_frames(plain, token_ids):
    for request, result in zip(BASE, plain["results"], strict=True):
        assert "error" not in result, result
        full = sum(FULL[(w, h)] for _, w, h in request["images"]) + (VIDEO_FULL if request["video"] else 0)
        assert _visual(result["prompt"], token_ids) == full
        assert result["output"]


def test_outputs_depend_on_the_image(plain):
    """The tiny model's greedy answer to one question changes with the image (else the identity checks below would
    prove little)."""
    same_question = [0, 1, 3]
    assert len({BASE[i]["question"] for i in same_question}) == 1
    assert len({tuple(plain["results"][i]["output"]) for i in same_question}) > 1


@pytest.mark.parametrize("group", range(len(IDENTITY)), ids=list(IDENTITY))
def test_identity_settings_match_plain_vllm_token_for_token(plain, plugin, group):
    got = plugin["results"][group * len(BASE):(group + 1) * len(BASE)]
    assert [(r["prompt"], r["output"]) for r in got] == [(r["prompt"], r["output"]) for r in plain["results"]]


def test_prompt_is_text_plus_each_items_count(plain, plugin, token_ids):
    offset = len(IDENTITY) * len(BASE)
    for k, (kwargs, base, by_hand) in enumerate(COMPRESSED):
        full = plain["results"][base]["prompt"]
        result = plugin["results"][offset + k]
        assert "error" not in result, (kwargs, result)
        assert _visual(result["prompt"], token_ids) == sum(by_hand), kwargs
        assert [t for t in result["prompt"] if t not in token_ids] == [t for t in full if t not in token_ids]
        assert result["output"], kwargs


def test_image_and_video_keep_their_own_counts(plugin, token_ids):
    """In the image + video request each modality's placeholders are its own count."""
    index = len(IDENTITY) * len(BASE) + [k for k, (_kw, base, _c) in enumerate(COMPRESSED) if base == 5][0]
    prompt = plugin["results"][index]["prompt"]
    image_id, video_id = token_ids
    assert (prompt.count(image_id), prompt.count(video_id)) == (40, 40)


def test_every_served_method_keeps_exactly_its_count(plugin, token_ids):
    """Every method LLaVA-OneVision serves (its declared rule, so a new method joins here), on the wide image and
    on the video."""
    offset = len(IDENTITY) * len(BASE) + len(COMPRESSED)
    methods = _served_methods()
    assert {"tome", "divprune", "text_relevance", "pool", "cdpruner"} <= set(methods)
    assert not {"visionzip", "cls_topk", "mustdrop"} & set(methods)
    results = plugin["results"][offset:offset + 2 * len(methods)]
    for k, result in enumerate(results):
        assert "error" not in result, (methods[k // 2], result)
        assert _visual(result["prompt"], token_ids) == MATRIX_BUDGET, methods[k // 2]
        assert result["output"], methods[k // 2]


def test_unservable_settings_are_refused_naming_the_field(plugin):
    for (_kwargs, field), result in zip(REFUSED, plugin["results"][-len(REFUSED):], strict=True):
        assert field in result["error"], result


def test_chunked_prefill_gives_the_same_prompts_and_outputs(plugin, chunked):
    offset = len(IDENTITY) * len(BASE)
    unchunked = plugin["results"][offset:offset + len(COMPRESSED)]
    assert [(r["prompt"], r["output"]) for r in chunked["results"]] == [(r["prompt"], r["output"]) for r in unchunked]


# ----------------------------------------------------------------------------- server + openai client
@pytest.fixture(scope="module")
def server(onevision_dir, vllm_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("llava-onevision-server") / "server.log"
    args = ["tiny-llava-onevision", "--method", "pool", "--budget", "64", "--max-model-len", "8192",
            "--served-model-name", "tiny-onevision", "--preview", "--limit-mm-per-prompt", '{"image": 2, "video": 0}']
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
    return client.chat.completions.create(model="tiny-onevision", messages=messages, max_tokens=4, temperature=0.0,
                                          extra_body=extra)


def test_openai_client_per_request_budgets_and_400s(client):
    full = _ask(client, [SQUARE, WIDE], {"tokcomp_method": "none"}).usage.prompt_tokens
    text = full - 1485 - 1998
    assert _ask(client, [SQUARE, WIDE]).usage.prompt_tokens == text + 64 + 64  # the server's own budget
    kwargs = [{"tokcomp_budget": 10}, {"tokcomp_method": "tome", "tokcomp_budget": 32},
              {"tokcomp_method": "dart", "tokcomp_ratio": 0.05}, {"tokcomp_method": "none"}]
    with ThreadPoolExecutor(4) as pool:
        usage = list(pool.map(lambda kw: _ask(client, [SQUARE, WIDE], kw).usage.prompt_tokens, kwargs))
    assert usage == [text + 20, text + 64, text + 75 + 100, full]  # ceil(0.05 * 1485), ceil(0.05 * 1998)
    with pytest.raises(openai.BadRequestError, match="tokcomp_method"):
        _ask(client, [SQUARE], {"tokcomp_method": "cls_topk"})
    with pytest.raises(openai.BadRequestError, match="tokcomp_budget"):
        _ask(client, [SQUARE], {"tokcomp_budget": "auto"})
    assert _ask(client, [SQUARE]).choices[0].message.content is not None


@pytest.mark.parametrize("kwargs", [{"tokcomp_method": "tome", "tokcomp_budget": 32},
                                    {"tokcomp_method": "pool", "tokcomp_budget": 20}])
def test_preview_groups_follow_the_placeholders_and_match_the_chat_request(server, client, kwargs):
    """The preview's counts and groups (one per placeholder, newlines dropped); the chat request then reports the
    preview's prompt size."""
    images = [SQUARE, WIDE]
    preview = post_preview(server.base_url, {"model": "tiny-onevision", "messages": _messages(images),
                                             "mm_processor_kwargs": kwargs})
    check_tiled_preview(preview, kwargs, full=[1485, 1998], base=729, side=27)
    assert _ask(client, images, kwargs).usage.prompt_tokens == preview["prompt_tokens"]


# ----------------------------------------------------------------------------- runner
def make_video(seed: int):
    """FRAMES frames of 224 x 224: a shape moving across a plain background."""
    from .test_qwen2_vl_video import make_video as moving_shape

    return moving_shape(seed)


def main() -> None:
    job = json.loads(sys.argv[1])
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from tests.e2e.images import request_image

    processor = AutoProcessor.from_pretrained(job["model"])
    engine = {"max_model_len": 16384, "max_num_batched_tokens": 16384, **job.get("llm_kwargs", {})}
    llm = LLM(model=job["model"], enforce_eager=True, seed=0, limit_mm_per_prompt={"image": 2, "video": 1}, **engine)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    results = []
    for request in job["requests"]:
        parts = [{"type": "image"} for _ in request["images"]]
        data = {}
        if request["images"]:
            data["image"] = [request_image(*image) for image in request["images"]]
        if request["video"] is not None:
            parts.append({"type": "video"})
            data["video"] = make_video(request["video"])
        parts.append({"type": "text", "text": request["question"]})
        text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
        prompt = {"prompt": text, "multi_modal_data": data}
        if request.get("mm_kwargs"):
            prompt["mm_processor_kwargs"] = request["mm_kwargs"]
        try:
            output = llm.generate([prompt], params, use_tqdm=False)[0]
            results.append({"prompt": list(output.prompt_token_ids), "output": list(output.outputs[0].token_ids)})
        except ValueError as error:
            results.append({"error": str(error), "error_type": type(error).__name__})
    print("RESULT " + json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    main()
