"""Tiny LLaVA-OneVision builder: deterministic, the real config/processor classes (SigLIP tower, Qwen2 LM), checkpoint
names vLLM loads, the HF processor's placeholder counts (anyres_max_9 shrinking included) equal to vLLM's, and
loading and generating per image in transformers."""

import json

import numpy as np
import pytest
import torch

from vllm_tokcomp.tiny import files
from vllm_tokcomp.tiny import llava_onevision_builder as tiny
from vllm_tokcomp.tiny.qwen2_vl_builder import SPECIAL_TOKENS

transformers = pytest.importorskip("transformers")

# (width, height) -> placeholders: base view 729 + unpadded tiles + a newline per tile row
IMAGE_COUNTS = {
    (384, 384): 729 + 27 * 27 + 27,  # 1x1 grid
    (500, 300): 729 + 27 * 46 + 27,  # 1x2 grid, unpadded to 27 x 46
    (300, 500): 729 + 46 * 27 + 46,  # 2x1 grid
    (1200, 1500): 729 + 90 * 72 + 90,  # 4x3 grid, unpadded to 102 x 81, shrunk by anyres_max_9 (ratio 1.12)
}
VIDEO_FRAMES, VIDEO_COUNT = 4, 4 * 14 * 14 + 1  # every frame pooled to 14 x 14, one newline per video


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.build_tiny_llava_onevision(tmp_path_factory.mktemp("tiny-llava-onevision"), seed=0)


def _image(seed: int, width: int, height: int):
    from tests.e2e.images import make_image

    return make_image(seed).resize((width, height))


def test_config_processor_and_tokenizer(model_dir):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(model_dir)
    assert type(config).__name__ == "LlavaOnevisionConfig" and config.architectures == [tiny.ARCHITECTURE]
    vision, text = config.vision_config, config.text_config
    assert type(vision).__name__ == "SiglipVisionConfig" and text.model_type == "qwen2"
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (384, 14, 64, 2)
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (256, 4, 2, 64)
    assert text.max_position_embeddings >= 16384 and text.vocab_size == tiny.VOCAB_SIZE
    assert (config.vision_feature_select_strategy, config.vision_feature_layer, config.vision_aspect_ratio) == (
        "full", -1, "anyres_max_9")
    assert [[384, 384], [384, 768], [768, 384], [768, 768]] == config.image_grid_pinpoints[:4]
    processor = AutoProcessor.from_pretrained(model_dir)
    assert [type(p).__name__ for p in (processor, processor.image_processor, processor.video_processor)] == [
        "LlavaOnevisionProcessor", "LlavaOnevisionImageProcessor", "LlavaOnevisionVideoProcessor"]
    assert processor.num_image_tokens == 729 and processor.vision_feature_select_strategy == "full"
    for pixels in (processor.image_processor, processor.video_processor):  # SigLIP's mean and std
        assert list(pixels.image_mean) == [0.5] * 3 and list(pixels.image_std) == [0.5] * 3
    vocab = processor.tokenizer.get_vocab()
    assert vocab["<image>"] == config.image_token_index and vocab["<video>"] == config.video_token_index
    assert len(processor.tokenizer) == text.vocab_size


def test_chat_template_renders_media_parts(model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    content = [{"type": "text", "text": "Same shape?"}, {"type": "video"}, {"type": "image"}, {"type": "image"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\n<image><image><video>\nSame shape?<|im_end|>\n<|im_start|>assistant\n")
    plain = processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert plain.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_checkpoint_names_and_lm_head(model_dir):
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert state["model.image_newline"].shape == (256,)
    # the SigLIP tower under vision_model. as checkpoints hold it (vLLM's SiglipVisionModel needs that level)
    assert "model.vision_tower.vision_model.embeddings.patch_embedding.weight" in state
    assert not any(k.startswith("model.vision_tower.") and ".vision_model." not in k for k in state)
    assert not any(".head." in k for k in state)  # vision_use_head=False
    head = state["lm_head.weight"]
    assert (head[: len(SPECIAL_TOKENS)] == 0).all() and (head[tiny.IMAGE_TOKEN_ID:] == 0).all()


def test_builds_are_deterministic_and_seeded(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(files.MODELS_DIR_ENV, str(tmp_path))
    again = tiny.ensure_default_model()
    assert again == tmp_path / tiny.MODEL_SUBDIR and tiny.is_complete_model_dir(again)
    first, second = (json.loads((d / files.MANIFEST_NAME).read_text()) for d in (model_dir, again))
    assert first["builder"] == "vllm_tokcomp.tiny.llava_onevision_builder"
    assert first["files"] == second["files"]
    other = tiny.random_state_dict(seed=1)
    assert not torch.equal(other["model.image_newline"], tiny.random_state_dict(seed=0)["model.image_newline"])


@pytest.mark.parametrize(("size", "count"), sorted(IMAGE_COUNTS.items()))
def test_hf_processor_counts(model_dir, size, count):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor(text=["<image> hi"], images=[_image(1, *size)], return_tensors="pt")
    assert int((inputs["input_ids"] == tiny.IMAGE_TOKEN_ID).sum()) == count


def test_hf_processor_video_count(model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    video = np.stack([np.asarray(_image(s, 64, 64)) for s in range(VIDEO_FRAMES)])
    inputs = processor(text=["<video> hi"], videos=[video], return_tensors="pt")
    assert int((inputs["input_ids"] == tiny.VIDEO_TOKEN_ID).sum()) == VIDEO_COUNT
    assert tuple(inputs["pixel_values_videos"].shape) == (1, VIDEO_FRAMES, 3, 384, 384)


def test_vllm_counts_equal_the_hf_processors(model_dir, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    info = MULTIMODAL_REGISTRY.get_processing_info(ModelConfig(model=str(model_dir), max_model_len=16384))
    assert type(info).__name__ == "LlavaOnevisionProcessingInfo"
    for (width, height), count in IMAGE_COUNTS.items():
        assert info.get_num_image_tokens(image_width=width, image_height=height) == count, (width, height)
    assert info.get_num_video_tokens(image_width=64, image_height=64, num_frames=VIDEO_FRAMES) == VIDEO_COUNT


def test_loads_in_transformers_and_generates_per_image(model_dir):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model, loading = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                                            output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched tensors
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    outputs = []
    for seed in (1, 2):
        inputs = processor(text=[prompt], images=[_image(seed, 500, 300)], return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        outputs.append(generated.tolist())
    assert outputs[0] != outputs[1]
