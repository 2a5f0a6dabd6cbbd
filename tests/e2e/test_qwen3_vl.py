"""Real vLLM, tiny Qwen3-VL (DeepStack, interleaved M-RoPE, one timestamped span per video frame).

Compression off, or a budget covering everything, is token-identical to plain vLLM. On, a prompt holds its text plus
each image's count and each video frame's share of the video's count (spread evenly, at least one per frame), and
the M-RoPE positions the engine uses equal an independent computation: a kept token sits at its span's start +
(0, row, col) of the token it stands for, text after an image or frame continues as if uncompressed. Layout
methods' kept tokens come from the library on the bare grid, pixel-decided ones from the HF processor's pixels
outside vLLM, text-guided ones from the selections the model logged (positions rewritten by the runner's hook). The
same with chunked prefill cutting images and frames; ``tokcomp serve tiny-qwen3-vl`` with the ``openai`` client.

Runner: ``python -m tests.e2e.test_qwen3_vl JOB`` (one engine per process).
"""

import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from vllm_tokcomp.launch import ServerProcess

from .conftest import run_runner_module
from .images import request_image_url
from .test_qwen2_vl import _count, _kept
from .test_qwen2_vl_pixel_decided import pixel_decided_anchors

pytestmark = pytest.mark.slow

MAX_TOKENS = 6
IMAGE_PAD, VIDEO_PAD = 5, 6  # tiny Qwen3-VL ids (the tiny Qwen2-VL's tokenizer)
PATCH = 16
GRIDS = {(336, 336): (10, 10), (448, 224): (7, 14)}  # 32 px per merged token
FRAMES, SIDE = 4, 224  # 4 frames -> 2 temporal patches of 7 x 7 merged tokens
FRAME_GRID, VIDEO_FRAMES = (7, 7), 2
SQUARE, WIDE = [1, 336, 336], [5, 448, 224]
BASE = [
    {"images": [SQUARE], "video": None, "question": "What colour is the circle?"},
    {"images": [[3, 336, 336], WIDE], "video": None, "question": "Which image has more shapes?"},
    {"images": [[3, 336, 336]], "video": 1, "question": "Is the shape in the picture also in the video?"},
]
IDENTITY = {"unconfigured": None, "budget=everything": {"tokcomp_method": "pool", "tokcomp_budget": 10_000}}
# (settings, base request, visual tokens by hand: per image, then per video frame)
LAYOUT = [
    ({"tokcomp_method": "pool", "tokcomp_budget": 25}, 0, [25]),
    ({"tokcomp_method": "uniform", "tokcomp_ratio": 0.35}, 1, [35, 35]),  # ceil(0.35 * 100), ceil(0.35 * 98)
    ({"tokcomp_method": "bilinear", "tokcomp_budget": 20}, 2, [20, 10, 10]),
    ({"tokcomp_method": "pool", "tokcomp_budget": 1}, 2, [1, 1, 1]),  # every frame keeps one token
    ({"tokcomp_method": "random", "tokcomp_budget": 17}, 2, [17, 9, 8]),  # the remainder to the first frame
]
PIXEL = [
    ({"tokcomp_method": "tome", "tokcomp_budget": 30}, 1, [30, 30]),
    ({"tokcomp_method": "divprune", "tokcomp_budget": 9}, 2, [9, 5, 4]),
]
TEXT_GUIDED = [
    ({"tokcomp_method": "text_relevance", "tokcomp_budget": 20}, 0, [20]),
    ({"tokcomp_method": "cdpruner", "tokcomp_ratio": 0.25}, 2, [25, 13, 12]),  # ceil(24.5) = 25 over the video
]
COMPRESSED = LAYOUT + PIXEL + TEXT_GUIDED
REFUSED = [{"tokcomp_method": "cls_topk", "tokcomp_budget": 16}, {"tokcomp_method": "pool", "tokcomp_budget": 0}]


def _requests():
    requests = [{**r, "mm_kwargs": kwargs} for kwargs in IDENTITY.values() for r in BASE]
    requests += [{**BASE[base], "mm_kwargs": kwargs} for kwargs, base, _ in COMPRESSED]
    return requests + [{**BASE[0], "mm_kwargs": kwargs} for kwargs in REFUSED]


def _run(job, env, plugins, tmp):
    logs = {"positions": ("TOKCOMP_POSITIONS_LOG", tmp / "positions.jsonl"),
            "selections": ("TOKCOMP_SELECTION_LOG", tmp / "selections.jsonl")}
    return run_runner_module("tests.e2e.test_qwen3_vl", job, env, plugins=plugins, logs=logs)


@pytest.fixture(scope="module")
def plain(qwen3_dir, vllm_env, tmp_path_factory):
    return _run({"model": str(qwen3_dir), "requests": BASE}, vllm_env, "", tmp_path_factory.mktemp("q3-plain"))


@pytest.fixture(scope="module")
def plugin(qwen3_dir, vllm_env, tmp_path_factory):
    return _run({"model": str(qwen3_dir), "requests": _requests()}, vllm_env, "tokcomp",
                tmp_path_factory.mktemp("q3-plugin"))


@pytest.fixture(scope="module")
def chunked(qwen3_dir, vllm_env, tmp_path_factory):
    """Prefill in chunks of 32 tokens: images (up to 30 kept tokens) and videos are cut across steps."""
    job = {"model": str(qwen3_dir), "requests": [{**BASE[base], "mm_kwargs": kwargs} for kwargs, base, _ in COMPRESSED],
           "llm_kwargs": {"max_num_batched_tokens": 32, "enable_chunked_prefill": True, "max_num_seqs": 4}}
    return _run(job, vllm_env, "tokcomp", tmp_path_factory.mktemp("q3-chunked"))


# ----------------------------------------------------------------------------- independent computations
def _spans(request):
    """Per pad run in prompt order (the template renders images before the video): (pad, (h, w))."""
    spans = [(IMAGE_PAD, GRIDS[(w, h)]) for _, w, h in request["images"]]
    if request["video"] is not None:
        spans += [(VIDEO_PAD, FRAME_GRID)] * VIDEO_FRAMES
    return spans


def _frame_counts(kwargs, frames, per_frame):
    """The video's count over all its tokens, spread evenly (earlier frames first), at least one per frame."""
    total = _count(kwargs, frames * per_frame)
    return [max(1, min(per_frame, total // frames + (f < total % frames))) for f in range(frames)]


def _counts(request):
    kwargs = request["mm_kwargs"]
    counts = [_count(kwargs, math.prod(GRIDS[(w, h)])) for _, w, h in request["images"]]
    if request["video"] is not None:
        counts += _frame_counts(kwargs, VIDEO_FRAMES, math.prod(FRAME_GRID))
    return counts


def expected_positions(prompt, runs):
    """runs: per pad run in prompt order, ((h, w), kept raster indices). Text counts up; a kept token sits at its
    run's start + (0, row, col); the next text starts at the run's start + max(h, w)."""
    pos, nxt, i, k = [], 0, 0, 0
    while i < len(prompt):
        if prompt[i] in (IMAGE_PAD, VIDEO_PAD):
            (h, w), kept = runs[k]
            pos.extend([nxt, nxt + index // w, nxt + index % w] for index in kept)
            i, nxt, k = i + len(kept), nxt + max(h, w), k + 1
            continue
        pos.append([nxt] * 3)
        nxt, i = nxt + 1, i + 1
    assert k == len(runs)
    return [list(axis) for axis in zip(*pos, strict=True)], nxt - len(prompt)


def _pixel_runs(model_dir, request, method, counts):
    """Each image's and frame's anchors from the HF processor's unnormalised pixels, outside vLLM."""
    from transformers import AutoProcessor

    from tests.e2e.images import make_image

    processor = AutoProcessor.from_pretrained(model_dir)
    raw = {"do_rescale": False, "do_normalize": False, "return_tensors": "pt"}
    pixels = [processor.image_processor(images=[make_image(seed, size=336).resize((w, h))], **raw)["pixel_values"]
              for seed, w, h in request["images"]]
    if request["video"] is not None:
        video = processor.video_processor(videos=[make_video(request["video"])], video_metadata=[
            {k: v for k, v in _metadata().items() if k != "do_sample_frames"}],
                                          do_sample_frames=False, **raw)["pixel_values_videos"]
        pixels += list(video.reshape(VIDEO_FRAMES, -1, video.shape[-1]))
    return [((h, w), pixel_decided_anchors(p, (1, h, w), method, c, patch_size=PATCH))
            for p, (_pad, (h, w)), c in zip(pixels, _spans(request), counts, strict=True)]


def _logged_runs(request, selections):
    """The anchors the model logged for each image and video of a text-guided request, as pad runs."""
    runs = []
    for pad, (h, w) in _spans(request):
        if pad == IMAGE_PAD or not runs or runs[-1][2] != "video":
            record = next(selections)
        if pad == IMAGE_PAD:
            runs.append(((h, w), record["anchors"], "image"))
        else:  # one record per video, anchors over its (t, h, w) grid: split by frame
            frame = sum(1 for r in runs if r[2] == "video")
            anchors = [a - frame * h * w for a in record["anchors"] if a // (h * w) == frame]
            runs.append(((h, w), anchors, "video"))
    return [(grid, kept) for grid, kept, _ in runs]


def _check_positions(engine, requests, qwen3_dir):
    """Records are found by prompt: every checked request must have a prompt of its own."""
    prompts = [tuple(r["prompt"]) for q, r in zip(requests, engine["results"], strict=True)
               if "error" not in r and (q["mm_kwargs"] or {}).get("tokcomp_method", "none") != "none"]
    assert len(set(prompts)) == len(prompts)
    selections = iter(engine["selections"])
    checked = 0
    for request, result in zip(requests, engine["results"], strict=True):
        kwargs = request["mm_kwargs"] or {}
        method = kwargs.get("tokcomp_method", "none")
        if "error" in result or method == "none":
            continue
        counts = _counts(request)
        spans = _spans(request)
        if method in {m["tokcomp_method"] for m, _, _ in TEXT_GUIDED}:
            runs = _logged_runs(request, selections)
        elif method in {m["tokcomp_method"] for m, _, _ in PIXEL}:
            runs = _pixel_runs(qwen3_dir, request, method, counts)
        else:
            runs = [((h, w), _kept(method, c, (1, h, w))) for (_pad, (h, w)), c in zip(spans, counts, strict=True)]
        assert [len(kept) for _, kept in runs] == counts, kwargs
        # the last record for the prompt: a text-guided request's provisional one is followed by one per prefill
        # step that rewrote its positions
        records = [r for r in engine["positions"] if r["prompt"] == result["prompt"]]
        assert records, kwargs
        positions, delta = expected_positions(result["prompt"], runs)
        assert (records[-1]["positions"], records[-1]["delta"]) == (positions, delta), kwargs
        checked += 1
    assert next(selections, None) is None
    return checked


# ----------------------------------------------------------------------------- tests
def test_baseline_is_not_degenerate(plain):
    outputs = [tuple(r["output"]) for r in plain["results"]]
    assert all(len(o) == MAX_TOKENS for o in outputs) and len(set(outputs)) > 1
    assert plain["results"][2]["prompt"].count(VIDEO_PAD) == VIDEO_FRAMES * math.prod(FRAME_GRID)


@pytest.mark.parametrize("group", range(len(IDENTITY)), ids=list(IDENTITY))
def test_identity_settings_match_plain_vllm_token_for_token(plain, plugin, group):
    got = plugin["results"][group * len(BASE):(group + 1) * len(BASE)]
    assert [(r["prompt"], r["output"]) for r in got] == [(r["prompt"], r["output"]) for r in plain["results"]]


def test_prompt_is_text_plus_each_items_count(plain, plugin):
    offset = len(IDENTITY) * len(BASE)
    for k, (kwargs, base, by_hand) in enumerate(COMPRESSED):
        request = {**BASE[base], "mm_kwargs": kwargs}
        assert _counts(request) == by_hand, kwargs
        full = plain["results"][base]["prompt"]
        visual = sum(1 for t in full if t in (IMAGE_PAD, VIDEO_PAD))
        result = plugin["results"][offset + k]
        assert len(result["prompt"]) == len(full) - visual + sum(by_hand), kwargs
        # the text (timestamps and every frame's vision start/end included) is untouched
        assert [t for t in result["prompt"] if t not in (IMAGE_PAD, VIDEO_PAD)] == [
            t for t in full if t not in (IMAGE_PAD, VIDEO_PAD)]
        assert len(result["output"]) == MAX_TOKENS


def test_engine_positions_equal_independent_computation(plugin, qwen3_dir):
    checked = _check_positions(plugin, _requests(), qwen3_dir)
    assert checked == len(BASE) + len(COMPRESSED)  # budget=everything goes through the plugin's positions too


def test_chunked_prefill_keeps_counts_and_positions(plugin, chunked, qwen3_dir):
    requests = [{**BASE[base], "mm_kwargs": kwargs} for kwargs, base, _ in COMPRESSED]
    assert _check_positions(chunked, requests, qwen3_dir) == len(COMPRESSED)
    offset = len(IDENTITY) * len(BASE)
    unchunked = plugin["results"][offset:offset + len(COMPRESSED)]
    assert [r["prompt"] for r in chunked["results"]] == [r["prompt"] for r in unchunked]


def test_unservable_method_and_bad_budget_are_refused(plugin):
    cls_topk, zero = plugin["results"][-len(REFUSED):]
    assert "[CLS]" in cls_topk["error"] and "tokcomp_method" in cls_topk["error"]
    assert "tokcomp_budget" in zero["error"]


def test_vllms_own_video_pruning_with_tokcomp_refuses_to_start(qwen3_dir, vllm_env):
    """vLLM's EVS on Qwen3-VL (``video_pruning_rate``) and tokcomp are not composed: the engine stops at startup,
    naming both."""
    from .conftest import run_process_group

    job = {"model": str(qwen3_dir), "requests": BASE[:1], "llm_kwargs": {"video_pruning_rate": 0.5},
           "engine_mm_kwargs": {"tokcomp_method": "pool", "tokcomp_budget": 16}}
    proc = run_process_group([sys.executable, "-m", "tests.e2e.test_qwen3_vl", json.dumps(job)],
                             {**vllm_env, "VLLM_PLUGINS": "tokcomp"}, timeout=900)
    assert proc.returncode != 0 and "RESULT " not in proc.stdout
    assert "cannot be combined with vLLM's video_pruning_rate" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- server + openai client
@pytest.fixture(scope="module")
def server(qwen3_dir, vllm_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("q3-server") / "server.log"
    args = ["tiny-qwen3-vl", "--method", "pool", "--ratio", "0.25", "--max-model-len", "2048",
            "--served-model-name", "tiny-qwen3", "--limit-mm-per-prompt", '{"image": 2, "video": 0}', "--preview"]
    with ServerProcess(args, env=vllm_env, log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _messages(images):
    content = [{"type": "image_url", "image_url": {"url": request_image_url(*image)}} for image in images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": "What colour is the circle?"}]}]


def _ask(client, images, mm_kwargs=None):
    extra = {"mm_processor_kwargs": mm_kwargs} if mm_kwargs is not None else None
    return client.chat.completions.create(model="tiny-qwen3", messages=_messages(images), max_tokens=4,
                                          temperature=0.0, extra_body=extra)


def test_openai_client_per_request_budgets(client):
    full = _ask(client, [SQUARE, WIDE], {"tokcomp_method": "none"}).usage.prompt_tokens
    text = full - 100 - 98
    assert _ask(client, [SQUARE, WIDE]).usage.prompt_tokens == text + 25 + 25  # server: a quarter of each image
    kwargs = [{"tokcomp_budget": 10}, {"tokcomp_method": "text_relevance", "tokcomp_budget": 12},
              {"tokcomp_method": "tome", "tokcomp_ratio": 0.5}, {"tokcomp_method": "none"}]
    with ThreadPoolExecutor(4) as pool:  # concurrent requests, each with its own settings
        usage = list(pool.map(lambda kw: _ask(client, [SQUARE, WIDE], kw).usage.prompt_tokens, kwargs))
    assert usage == [text + 20, text + 24, text + 50 + 49, full]


def test_openai_client_bad_request_is_400_and_server_stays_up(client):
    with pytest.raises(openai.BadRequestError, match="tokcomp_method"):
        _ask(client, [SQUARE], {"tokcomp_method": "cls_topk"})
    with pytest.raises(openai.BadRequestError, match="tokcomp_budget"):
        _ask(client, [SQUARE], {"tokcomp_budget": -3})
    assert _ask(client, [SQUARE]).choices[0].message.content is not None


def test_preview_counts_match_the_chat_request(server, client):
    import urllib.request

    for kwargs in ({"tokcomp_method": "pool", "tokcomp_budget": 9}, {"tokcomp_method": "text_relevance",
                                                                      "tokcomp_budget": 7}):
        body = {"model": "tiny-qwen3", "messages": _messages([[11, 336, 336], [12, 448, 224]]),
                "mm_processor_kwargs": kwargs}
        request = urllib.request.Request(f"{server.base_url}/tokcomp/preview", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=300) as response:
            preview = json.loads(response.read())
        items = preview["items"]
        assert [(i["tokens_before"], i["tokens_after"]) for i in items] == [(100, kwargs["tokcomp_budget"]),
                                                                            (98, kwargs["tokcomp_budget"])]
        for item in items:
            kept_slots = {g for g in item["groups"] if g >= 0}
            assert kept_slots == set(range(kwargs["tokcomp_budget"])), kwargs
        full = _ask(client, [[11, 336, 336], [12, 448, 224]], {"tokcomp_method": "none"}).usage.prompt_tokens
        got = _ask(client, [[11, 336, 336], [12, 448, 224]], kwargs).usage.prompt_tokens
        assert got == full - 198 + 2 * kwargs["tokcomp_budget"]


# ----------------------------------------------------------------------------- runner
def _metadata():
    return {"total_num_frames": FRAMES, "fps": 2.0, "duration": FRAMES / 2.0, "video_backend": "opencv",
            "frames_indices": list(range(FRAMES)), "do_sample_frames": False}


def make_video(seed: int):
    from .test_qwen2_vl_video import make_video as qwen2_video

    return qwen2_video(seed)


def main() -> None:
    job = json.loads(sys.argv[1])
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from tests.e2e.images import make_image

    processor = AutoProcessor.from_pretrained(job["model"])
    llm = LLM(model=job["model"], max_model_len=2048, enforce_eager=True, seed=0,
              mm_processor_kwargs=job.get("engine_mm_kwargs"), limit_mm_per_prompt={"image": 2, "video": 1},
              **job.get("llm_kwargs", {}))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    results = []
    for request in job["requests"]:
        parts = [{"type": "image"} for _ in request["images"]]
        data = {"image": [make_image(seed, size=336).resize((w, h)) for seed, w, h in request["images"]]}
        if request["video"] is not None:
            parts.append({"type": "video"})
            data["video"] = (make_video(request["video"]), _metadata())
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
