"""Tiny Qwen2-VL builder: deterministic, loads in transformers with the real processor and chat template."""

import pytest
import torch

from vllm_tokcomp.tiny import qwen2_vl_builder as tiny

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"), seed=0)


def test_weights_are_deterministic_and_seeded():
    a, b = tiny.random_state_dict(0), tiny.random_state_dict(0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = tiny.random_state_dict(1)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert (a["lm_head.weight"][: len(tiny.SPECIAL_TOKENS)] == 0).all()


def test_geometry_and_special_tokens(model_dir):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(model_dir)
    text = config.text_config
    assert config.architectures == ["Qwen2VLForConditionalGeneration"]
    assert text.hidden_size // text.num_attention_heads == 64
    assert sum(text.rope_parameters["mrope_section"]) == 32
    processor = AutoProcessor.from_pretrained(model_dir)
    vocab = processor.tokenizer.get_vocab()
    assert vocab["<|image_pad|>"] == config.image_token_id == tiny.IMAGE_TOKEN_ID
    assert vocab["<|video_pad|>"] == config.video_token_id
    assert vocab["<|vision_start|>"] == config.vision_start_token_id
    from PIL import Image

    for (width, height), merged in [((336, 336), (12, 12)), ((448, 224), (8, 16)), ((1000, 1000), (16, 16))]:
        grid = processor.image_processor(Image.new("RGB", (width, height)), return_tensors="pt")["image_grid_thw"]
        assert tuple(grid[0].tolist()) == (1, merged[0] * 2, merged[1] * 2), (width, height)


def test_loads_in_transformers_and_generates_per_image(model_dir):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from tests.e2e.images import make_image

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16)
    question = {"type": "text", "text": "What colour is the circle?"}
    messages = [{"role": "user", "content": [{"type": "image"}, question]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt
    outputs = []
    for seed in (1, 2, 3):
        inputs = processor(text=[prompt], images=[make_image(seed)], return_tensors="pt")
        assert int((inputs["input_ids"] == tiny.IMAGE_TOKEN_ID).sum()) == 144
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        assert len(generated) == 8 and len(set(generated.tolist())) > 2
        outputs.append(generated.tolist())
    assert len({tuple(o) for o in outputs}) > 1, "different images should give different greedy outputs"


def test_qwen2_5_variant_config_and_weights():
    config = tiny.make_config("qwen2_5_vl")
    assert config.architectures == ["Qwen2_5_VLForConditionalGeneration"]
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size == tiny.TEXT_HIDDEN
    assert config.vision_config.fullatt_block_indexes == [tiny.VISION_DEPTH - 1]
    shapes = tiny.checkpoint_shapes("qwen2_5_vl")
    assert "model.visual.blocks.0.mlp.gate_proj.weight" in shapes  # the SwiGLU tower, not Qwen2-VL's
    state = tiny.random_state_dict(0, "qwen2_5_vl")
    assert state.keys() == shapes.keys()
    with pytest.raises(ValueError, match="variant"):
        tiny.make_config("qwen3_vl")
