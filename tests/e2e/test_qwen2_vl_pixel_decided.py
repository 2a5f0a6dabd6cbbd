"""Real vLLM, tiny Qwen2-VL and Qwen2.5-VL: content-dependent methods decided on pixels at processing time.

``tome``, ``divprune``, ``adjacent`` and ``evs`` choose which tokens survive from each merged token's pixels
(its ``merge x merge`` patches as the HF processor lays them out, centred on the image's mean), so the M-RoPE
positions are known before the encoder runs. Checked here against an independent computation: the HF image
processor's own unnormalised ``pixel_values`` (what vLLM 0.32 requests) grouped into merged tokens, the
library method's ``select`` on them, and the positions written out from the grid and those anchors
(tests/e2e/test_qwen2_vl.py's ``expected_positions``). Prompt counts are exact, and
methods that need [CLS] attention (Qwen's tower has no [CLS]) are refused naming the field.
"""

import math

import pytest
import torch

from .test_qwen2_vl import BASE_REQUESTS, MAX_TOKENS, _count, _grids, _run, expected_positions

pytestmark = pytest.mark.slow

PIXEL_DECIDED = [("tome", 36, 0), ("divprune", 50, 1), ("adjacent", 20, 2), ("evs", 30, 0)]
RATIOS = [("tome", 0.25, 2)]
REFUSED = [{"tokcomp_method": "cls_topk", "tokcomp_budget": 16}, {"tokcomp_method": "visionzip", "tokcomp_budget": 16}]
# Pixel noise (sigma 6 of 255) as in photographs: with flat synthetic backgrounds most tokens are exactly equal and
# which of them a method keeps is tie-breaking, not content.
NOISE = 6.0
REQUESTS = [{**r, "images": [[*image, NOISE] for image in r["images"]]} for r in BASE_REQUESTS]


def _requests():
    requests = [{**REQUESTS[i], "mm_kwargs": {"tokcomp_method": m, "tokcomp_budget": b}} for m, b, i in PIXEL_DECIDED]
    requests += [{**REQUESTS[i], "mm_kwargs": {"tokcomp_method": m, "tokcomp_ratio": r}} for m, r, i in RATIOS]
    requests += [{**REQUESTS[0], "mm_kwargs": kwargs} for kwargs in REFUSED]
    return requests


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def served(request, qwen_dir, qwen25_dir, vllm_env, tmp_path_factory):
    model = qwen_dir if request.param == "qwen2_vl" else qwen25_dir
    job = {"model": str(model), "requests": _requests()}
    return model, _run(job, vllm_env, "tokcomp", tmp_path_factory.mktemp("pos") / "pixel.jsonl")


def pixel_decided_anchors(pixels, grid, method, budget, patch_size=14):
    """Kept anchors of a pixel-decided method, written out plainly: the HF processor's unnormalised pixels (what
    vLLM 0.32 requests), each 14 x 14 patch plane as its 2 x 2 block means of 7 x 7 pixels, the merge x merge
    patches of each LM token as one row, centred on the item's mean, and the library method's ``select``."""
    from vllm_tokcomp.methods import VisualTokens, get_method

    n = math.prod(grid)
    if budget >= n:
        return list(range(n))
    half = patch_size // 2
    planes = pixels.float().reshape(pixels.shape[0], -1, patch_size, patch_size)
    blocks = [planes[:, :, y:y + half, x:x + half].mean((2, 3)) for y in (0, half) for x in (0, half)]
    per_patch = torch.stack(blocks, -1)  # [patches, planes, 4 blocks], blocks in raster order
    features = per_patch.reshape(n, -1)
    features = features - features.mean(0)
    return get_method(method).select(VisualTokens(features, tuple(grid)), budget).anchor.tolist()


def _pixel_anchors(model_dir, request, method, budgets):
    """Each image's kept anchors from the HF processor's pixels and the library method, outside vLLM."""
    from transformers import AutoProcessor

    from tests.e2e.images import request_image

    processor = AutoProcessor.from_pretrained(model_dir)
    merge = processor.image_processor.merge_size
    anchors = []
    for spec, budget in zip(request["images"], budgets, strict=True):
        # vLLM 0.32 asks the HF processor for unnormalised pixels (the model normalises them on device)
        out = processor.image_processor(images=[request_image(*spec)], return_tensors="pt", do_rescale=False,
                                        do_normalize=False)
        t, gh, gw = out["image_grid_thw"][0].tolist()
        anchors.append(pixel_decided_anchors(out["pixel_values"], (t, gh // merge, gw // merge), method, budget))
    return anchors


def test_prompt_counts_and_positions_follow_the_pixel_decided_selection(served):
    model, result = served
    by_prompt = {tuple(record["prompt"]): record for record in result["positions"]}
    requests = _requests()
    for request, got in zip(requests[: -len(REFUSED)], result["results"], strict=False):
        assert "error" not in got, (request["mm_kwargs"], got)
        spec = request["mm_kwargs"]
        grids = _grids(request)
        budgets = [_count(spec, math.prod(grid)) for grid in grids]
        assert got["prompt_tokens"] == len(got["prompt"])
        assert sum(1 for token in got["prompt"] if token == 5) == sum(budgets)  # <|image_pad|> kept per image
        anchors = _pixel_anchors(model, request, spec["tokcomp_method"], budgets)
        positions, delta = expected_positions(got["prompt"], grids, anchors)
        record = by_prompt[tuple(got["prompt"])]
        assert record["positions"] == positions, spec
        assert record["delta"] == delta, spec
        assert len(got["output"]) == MAX_TOKENS


def test_methods_that_need_cls_attention_are_refused(served):
    _, result = served
    for error in result["results"][-len(REFUSED):]:
        assert "tokcomp_method" in error["error"] and "[CLS]" in error["error"], error
