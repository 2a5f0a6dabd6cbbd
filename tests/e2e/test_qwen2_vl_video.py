"""Real vLLM, tiny Qwen2-VL, videos: compression off (or budget = everything) is token-identical to plain vLLM;
on, a video keeps min(budget, t*h*w) (or ceil(ratio*t*h*w)) tokens, and the M-RoPE positions the engine uses
equal an independent computation: a kept token at (start + frame, start + row, start + col) of the patch it
stands for, text after the video at start + max(t, h, w) as if uncompressed, also next to an image; the same for
text-guided selections (``text_relevance``, ``pumer``), whose positions the runner's recompute hook writes.

Runner: ``python -m tests.e2e.test_qwen2_vl_video JOB`` (one engine per process).
"""

import json
import math
import sys

import pytest

from .conftest import run_runner_module
from .test_qwen2_vl import _count, _kept

pytestmark = pytest.mark.slow

MAX_TOKENS = 6
IMAGE_PAD, VIDEO_PAD = 5, 6  # tiny Qwen2-VL ids
FRAMES, SIDE = 4, 224  # 4 frames of 224x224 -> grid t=2 (temporal patch 2), 8x8 merged: 128 tokens
VIDEO_GRID = (2, 8, 8)
IMAGE_GRID = (1, 12, 12)  # a 336x336 image
BASE = [
    {"video": 1, "image": None, "question": "What moves in the video?"},
    {"video": 2, "image": 3, "question": "Is the shape in the picture also in the video?"},
]
IDENTITY = {"unconfigured": None, "budget=everything": {"tokcomp_method": "pool", "tokcomp_budget": 10_000}}
COMPRESSED = [
    ({"tokcomp_method": "pool", "tokcomp_budget": 32}, 0),  # 2x4x4 cells: both frames keep a pooled grid
    ({"tokcomp_method": "uniform", "tokcomp_ratio": 0.25}, 0),
    ({"tokcomp_method": "bilinear", "tokcomp_budget": 20}, 0),
    ({"tokcomp_method": "pool", "tokcomp_budget": 16}, 1),  # image and video in one prompt, each to 16
    ({"tokcomp_method": "pool", "tokcomp_budget": 2}, 0),  # one pooled token per frame (LLaMA-VID-like extreme)
    ({"tokcomp_method": "evs", "tokcomp_budget": 80}, 0),  # pixel-decided: temporal dissimilarity, first frame first
    ({"tokcomp_method": "tome", "tokcomp_budget": 16}, 1),  # pixel-decided, image and video in one prompt
]
PIXEL_DECIDED = {"tome", "divprune", "adjacent", "evs"}


def _requests():
    requests = [{**r, "mm_kwargs": kwargs} for kwargs in IDENTITY.values() for r in BASE]
    return requests + [{**BASE[base], "mm_kwargs": kwargs} for kwargs, base in COMPRESSED]


def _run(job, env, plugins, tmp):
    logs = {"positions": ("TOKCOMP_POSITIONS_LOG", tmp / "positions.jsonl")}
    return run_runner_module("tests.e2e.test_qwen2_vl_video", job, env, plugins=plugins, logs=logs)


@pytest.fixture(scope="module")
def plain(qwen_dir, vllm_env, tmp_path_factory):
    return _run({"model": str(qwen_dir), "requests": BASE}, vllm_env, "", tmp_path_factory.mktemp("video-plain"))


@pytest.fixture(scope="module")
def plugin(qwen_dir, vllm_env, tmp_path_factory):
    job = {"model": str(qwen_dir), "requests": _requests()}
    return _run(job, vllm_env, "tokcomp", tmp_path_factory.mktemp("video-plugin"))


def expected_positions(prompt, items):
    """items: per multimodal item in prompt order, (pad token, grid (t, h, w), kept raster indices)."""
    pos, nxt, i, item = [], 0, 0, 0
    while i < len(prompt):
        if item < len(items) and prompt[i] == items[item][0]:
            _pad, (t, h, w), kept = items[item]
            for index in kept:
                frame, rest = divmod(index, h * w)
                pos.append([nxt + frame, nxt + rest // w, nxt + rest % w])
            i += len(kept)
            nxt += max(t, h, w)
            item += 1
            continue
        pos.append([nxt] * 3)
        nxt += 1
        i += 1
    assert item == len(items)
    return [list(axis) for axis in zip(*pos, strict=True)], nxt - len(prompt)


def _items(request):
    """(pad, grid, kept) in prompt order: the template renders the image before the video."""
    kwargs = request["mm_kwargs"] or {}
    method = kwargs.get("tokcomp_method", "none")
    out = []
    for pad, grid, present in ((IMAGE_PAD, IMAGE_GRID, request["image"]), (VIDEO_PAD, VIDEO_GRID, request["video"])):
        if present is None:
            continue
        n = math.prod(grid)
        if method in PIXEL_DECIDED:
            kept = _pixel_kept(method, _count(kwargs, n), grid, pad, present)
        else:
            kept = list(range(n)) if method == "none" else _kept(method, _count(kwargs, n), grid)
        out.append((pad, grid, kept))
    return out


def _pixel_kept(method, budget, grid, pad, seed):
    """Anchors of a pixel-decided method from the HF processor's own pixels of this item, outside vLLM."""
    from transformers import AutoProcessor

    from tests.e2e.images import make_image
    from tests.e2e.test_qwen2_vl_pixel_decided import pixel_decided_anchors
    from vllm_tokcomp.tiny.qwen2_vl_builder import ensure_default_model

    processor = AutoProcessor.from_pretrained(ensure_default_model())
    raw = {"do_rescale": False, "do_normalize": False, "return_tensors": "pt"}
    if pad == VIDEO_PAD:
        pixels = processor.video_processor(videos=[make_video(seed)], **raw)["pixel_values_videos"]
    else:
        pixels = processor.image_processor(images=[make_image(seed, size=336)], **raw)["pixel_values"]
    return pixel_decided_anchors(pixels, grid, method, budget)


def test_baseline_sees_the_video(plain):
    outputs = [tuple(r["output"]) for r in plain["results"]]
    assert all(len(o) == MAX_TOKENS for o in outputs)
    assert plain["results"][0]["prompt"].count(VIDEO_PAD) == math.prod(VIDEO_GRID)


@pytest.mark.parametrize("group", range(len(IDENTITY)), ids=list(IDENTITY))
def test_identity_settings_match_plain_vllm_token_for_token(plain, plugin, group):
    got = plugin["results"][group * len(BASE) : (group + 1) * len(BASE)]
    assert [(r["prompt"], r["output"]) for r in got] == [(r["prompt"], r["output"]) for r in plain["results"]]


def test_video_keeps_its_budget(plain, plugin):
    offset = len(IDENTITY) * len(BASE)
    # by hand: pool 32, ceil(0.25 * 128), bilinear 20, image + video 16 each, 2, evs 80, image + video 16 each
    expected = [32, 32, 20, 16 + 16, 2, 80, 16 + 16]
    for k, ((kwargs, base), kept) in enumerate(zip(COMPRESSED, expected, strict=True)):
        full = math.prod(VIDEO_GRID) + (math.prod(IMAGE_GRID) if BASE[base]["image"] is not None else 0)
        text = len(plain["results"][base]["prompt"]) - full
        result = plugin["results"][offset + k]
        assert len(result["prompt"]) == text + kept, kwargs
        assert len(result["output"]) == MAX_TOKENS


def test_engine_positions_equal_independent_computation(plugin):
    # One record per request, in order (requests run one at a time; some share a prompt, e.g. pool@32 and
    # uniform@0.25 of the same video, and differ only in which tokens they keep).
    records = plugin["positions"]
    assert len(records) == len(plugin["results"])
    for request, result, record in zip(_requests(), plugin["results"], records, strict=True):
        assert record["prompt"] == result["prompt"]
        positions, delta = expected_positions(result["prompt"], _items(request))
        assert (record["positions"], record["delta"]) == (positions, delta), request["mm_kwargs"]


TEXT_GUIDED = [
    ({"tokcomp_method": "text_relevance", "tokcomp_budget": 40}, 0),
    ({"tokcomp_method": "pumer", "tokcomp_budget": 24}, 1),  # image and video in one prompt, each to 24
    ({"tokcomp_method": "text_relevance", "tokcomp_ratio": 0.25}, 1),
]


@pytest.fixture(scope="module")
def text_guided(qwen_dir, vllm_env, tmp_path_factory):
    """Text-guided selections on the encoder's embeddings: positions rewritten by the runner's recompute hook."""
    tmp = tmp_path_factory.mktemp("video-text")
    job = {"model": str(qwen_dir), "requests": [{**BASE[base], "mm_kwargs": kwargs} for kwargs, base in TEXT_GUIDED]}
    logs = {"positions": ("TOKCOMP_POSITIONS_LOG", tmp / "positions.jsonl"),
            "selections": ("TOKCOMP_SELECTION_LOG", tmp / "selections.jsonl")}
    return run_runner_module("tests.e2e.test_qwen2_vl_video", job, vllm_env, plugins="tokcomp", logs=logs)


def test_text_guided_video_positions_follow_the_selection(text_guided):
    """Per request: the positions the runner ends with (the last record after the request's provisional one)
    equal the positions written out from each item's grid and the kept indices the model logged, frames included;
    exact counts per item."""
    selections = iter(text_guided["selections"])
    finals, current = [], None
    for record in text_guided["positions"]:
        if "offset" in record["items"][0]:  # get_mrope_input_positions: a new request
            if current is not None:
                finals.append(current)
        current = record
    finals.append(current)
    assert len(finals) == len(TEXT_GUIDED) == len(text_guided["results"])
    for (kwargs, base), result, final in zip(TEXT_GUIDED, text_guided["results"], finals, strict=True):
        assert "recomputed_from" in final["items"][0] and final["prompt"] == result["prompt"]
        present = [(IMAGE_PAD, IMAGE_GRID)] if BASE[base]["image"] is not None else []
        logged = {tuple(r["grid"]): r["anchors"] for r in (next(selections) for _ in range(len(present) + 1))}
        items = [(pad, grid, logged[grid]) for pad, grid in [*present, (VIDEO_PAD, VIDEO_GRID)]]
        for pad, grid, kept in items:
            assert len(kept) == _count(kwargs, math.prod(grid)) == result["prompt"].count(pad), kwargs
        positions, delta = expected_positions(result["prompt"], items)
        assert (final["positions"], final["delta"]) == (positions, delta), kwargs
        assert len(result["output"]) == MAX_TOKENS
    assert next(selections, None) is None


def make_video(seed: int):
    """FRAMES frames of SIDE x SIDE: a shape moving across a plain background."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    frames = []
    for f in range(FRAMES):
        image = Image.new("RGB", (SIDE, SIDE), (200, 200, 200))
        x = 20 + f * 40
        ImageDraw.Draw(image).ellipse([x, 80, x + 60, 140], fill=colour)
        frames.append(np.asarray(image))
    return np.stack(frames)


def main() -> None:
    job = json.loads(sys.argv[1])
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from tests.e2e.images import make_image

    processor = AutoProcessor.from_pretrained(job["model"])
    llm = LLM(model=job["model"], max_model_len=2048, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"image": 1, "video": 1})
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    results = []
    for request in job["requests"]:
        parts = ([{"type": "image"}] if request["image"] is not None else []) + [{"type": "video"}]
        parts.append({"type": "text", "text": request["question"]})
        text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
        data = {"video": make_video(request["video"])}
        if request["image"] is not None:
            data["image"] = make_image(request["image"], size=336)
        prompt = {"prompt": text, "multi_modal_data": data}
        if request.get("mm_kwargs"):
            prompt["mm_processor_kwargs"] = request["mm_kwargs"]
        output = llm.generate([prompt], params, use_tqdm=False)[0]
        results.append({"prompt": list(output.prompt_token_ids), "output": list(output.outputs[0].token_ids)})
    print("RESULT " + json.dumps({"results": results}), flush=True)


if __name__ == "__main__":
    main()
