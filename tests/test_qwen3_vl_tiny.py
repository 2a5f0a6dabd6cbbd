"""Tiny Qwen3-VL builder: deterministic, the real config/processor classes, DeepStack and interleaved M-RoPE, loads
and generates in transformers."""

import pytest
import torch

from vllm_tokcomp.tiny import qwen3_vl_builder as tiny
from vllm_tokcomp.tiny.qwen2_vl_builder import SPECIAL_TOKENS

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl"), seed=0)


def test_weights_are_deterministic_and_seeded():
    a, b = tiny.random_state_dict(0), tiny.random_state_dict(0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], tiny.random_state_dict(1)["lm_head.weight"])
    assert (a["lm_head.weight"][: len(SPECIAL_TOKENS)] == 0).all()
    # one projector per DeepStack level, besides the main merger
    assert {k.split(".")[3] for k in a if ".deepstack_merger_list." in k} == {"0", "1"}


def test_geometry_and_special_tokens(model_dir):
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(model_dir)
    text = config.text_config
    assert config.architectures == ["Qwen3VLForConditionalGeneration"]
    assert config.vision_config.deepstack_visual_indexes == tiny.DEEPSTACK_LAYERS
    assert text.rope_parameters["mrope_interleaved"] is True
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    processor = AutoProcessor.from_pretrained(model_dir)
    assert type(processor).__name__ == "Qwen3VLProcessor"
    vocab = processor.tokenizer.get_vocab()
    assert vocab["<|image_pad|>"] == config.image_token_id and vocab["<|video_pad|>"] == config.video_token_id
    # 32 px per merged token: 336 -> 10 (nearest multiple of 32 is 320 or 352; the processor rounds to 320)
    for (width, height), merged in [((336, 336), (10, 10)), ((448, 224), (7, 14)), ((1000, 1000), (16, 16))]:
        grid = processor.image_processor(Image.new("RGB", (width, height)), return_tensors="pt")["image_grid_thw"]
        assert tuple(grid[0].tolist()) == (1, merged[0] * 2, merged[1] * 2), (width, height)


def test_loads_in_transformers_and_generates_per_image(model_dir):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from tests.e2e.images import make_image

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    outputs = []
    for seed in (1, 2, 3):
        inputs = processor(text=[prompt], images=[make_image(seed)], return_tensors="pt")
        assert int((inputs["input_ids"] == tiny.IMAGE_TOKEN_ID).sum()) == 100
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert len(generated) == 8
        outputs.append(tuple(generated.tolist()))
    assert len(set(outputs)) > 1  # the image changes the answer


def test_building_twice_gives_identical_files(tmp_path):
    a = tiny.build_tiny_qwen3_vl(tmp_path / "a", seed=0)
    b = tiny.build_tiny_qwen3_vl(tmp_path / "b", seed=0)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert tiny.is_complete_model_dir(a)


def test_moe_variant_loads_in_transformers_and_generates(tmp_path):
    """The MoE variant's fused experts are written in the checkpoint layout ([experts, in, out]) that transformers
    converts on load (and vLLM reads): the model loads without missing weights and answers per image."""
    from transformers import AutoConfig, AutoProcessor, Qwen3VLMoeForConditionalGeneration

    from tests.e2e.images import make_image

    model_dir = tiny.build_tiny_qwen3_vl(tmp_path / "moe", variant="qwen3_vl_moe")
    config = AutoConfig.from_pretrained(model_dir)
    assert config.architectures == ["Qwen3VLMoeForConditionalGeneration"]
    assert config.text_config.num_experts == tiny.EXPERTS
    model, info = Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    outputs = set()
    for seed in (1, 2, 3):
        inputs = processor(text=[prompt], images=[make_image(seed)], return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        outputs.add(tuple(generated.tolist()))
    assert len(outputs) > 1
