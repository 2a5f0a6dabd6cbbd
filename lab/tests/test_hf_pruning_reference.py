"""The in-LM pruning references on transformers (lab/tokcomp_lab/reference/hf_pruning.py), on the tiny LLaVA.

With both stages off it must be transformers' own greedy decoding, token for token; stage 1 must merge exactly
the windows a plain computation on transformers' own layer-1 output finds; stage 2's dual filter at its
extremes keeps everything or exactly the key set, and stage 3 leaves only survivors in every layer's cache.
FastV must keep exactly the tokens transformers' own attention weights rank highest.
"""

import pytest
import torch

from tests.e2e.images import make_image
from tokcomp_lab.reference.hf_pruning import FastVReference, MustDropReference, generate

QUESTION = "What colour is the circle?"


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vllm_tokcomp.tiny.llava_builder import ensure_default_model

    path = ensure_default_model()
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, processor


def _inputs(processor, seed):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=make_image(seed), text=text, return_tensors="pt")
    return inputs, processor.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("seed", [1, 2])
def test_both_stages_off_is_transformers_greedy_decoding(tiny, seed):
    model, processor = tiny
    inputs, ids = _inputs(processor, seed)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    out = generate(model, ids, inputs["pixel_values"][0], MustDropReference(stage1=False, stage2=False), 8)
    assert out.tokens == expected.tolist()
    assert out.visual_after_stage1 == 576 and out.visual_per_layer == [576, 576]


def test_stage1_merges_exactly_the_similar_windows(tiny):
    model, processor = tiny
    inputs, ids = _inputs(processor, 1)
    with torch.no_grad():
        layer1 = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[1][0, 1:]
    unit = torch.nn.functional.normalize(layer1, dim=-1)
    merged_windows = 0
    for top in range(0, 24, 3):
        for left in range(0, 24, 3):
            members = [r * 24 + c for r in range(top, top + 3) for c in range(left, left + 3)]
            pairs = [float(unit[a] @ unit[b]) for a in members for b in members if a < b]
            merged_windows += sum(pairs) / len(pairs) >= 0.8
    assert 0 < merged_windows < 64  # the test image has both flat and busy windows
    out = generate(model, ids, inputs["pixel_values"][0], MustDropReference(stage2=False), 4)
    assert out.visual_after_stage1 == 576 - 8 * merged_windows
    assert out.key_set_size == -(-8 * out.visual_after_stage1 // 100)  # ceil(0.08 * M)


def test_stage2_extremes_and_the_output_aware_cache(tiny):
    model, processor = tiny
    inputs, ids = _inputs(processor, 2)
    pixels = inputs["pixel_values"][0]
    off = generate(model, ids, pixels, MustDropReference(stage1=False, stage2=False), 6)
    keep_all = MustDropReference(stage1=False, prune_layers=(0,), global_threshold=0.0, individual_threshold=0.0)
    out = generate(model, ids, pixels, keep_all, 6)
    assert out.tokens == off.tokens and out.visual_in_cache == [576, 576]
    drop_all = MustDropReference(stage1=False, prune_layers=(0,), global_threshold=1.0, individual_threshold=1.0)
    out = generate(model, ids, pixels, drop_all, 6)
    assert out.key_set_size == 47  # ceil(0.08 * 576)
    assert out.visual_per_layer == [576, 47]  # layer 0 saw everything, layer 1 only the key set
    assert out.visual_in_cache == [47, 47]  # stage 3: layer 0's cache was cut to the survivors too
    assert len(out.tokens) == 6


def test_fastv_keeps_the_tokens_transformers_attention_ranks_highest(tiny):
    """FastV's selection at layer 0 == the top visual tokens by transformers' own eager attention weights
    (averaged over heads and query rows), an independent computation of the published rule."""
    model, processor = tiny
    inputs, ids = _inputs(processor, 1)
    config = model.model.language_model.config
    before, config._attn_implementation = config._attn_implementation, "eager"  # SDPA returns no weights
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        config._attn_implementation = before
    start = ids.index(model.config.image_token_index)
    received = attentions[0][0].float().mean(0).mean(0)[start:start + 576]
    expected = sorted(torch.sort(received, descending=True, stable=True).indices[:64].tolist())
    out = generate(model, ids, inputs["pixel_values"][0], FastVReference(layer=0, keep=64), 4)
    assert out.visual_kept == expected
    assert out.visual_per_layer == [576, 64]
    assert out.visual_in_cache == [576, 64]  # no stage 3: layer 0 keeps every visual token's KV


def test_fastv_with_room_for_everything_is_plain_decoding(tiny):
    model, processor = tiny
    inputs, ids = _inputs(processor, 2)
    pixels = inputs["pixel_values"][0]
    off = generate(model, ids, pixels, MustDropReference(stage1=False, stage2=False), 6)
    out = generate(model, ids, pixels, FastVReference(layer=0, keep=576), 6)
    assert out.tokens == off.tokens and out.visual_in_cache == [576, 576]
