"""The tiny LLaVA-OneVision for quality rows: the bundled trained tiny LLaVA's tensors in transformers'
LLaVA-OneVision classes (CLIP tower with [CLS] dropped, Llama LM), its HF processor's placeholder counts equal to
vLLM's, its chat template the one the LLaVA was trained on, and loading in transformers."""

import numpy as np
import pytest
import torch

from vllm_tokcomp.tiny import llava_builder as llava
from vllm_tokcomp.tiny import llava_onevision_vqa_builder as tiny

transformers = pytest.importorskip("transformers")

SIZES = [(336, 336), (500, 300), (300, 500), (1200, 1500)]
VIDEO_FRAMES = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.build_tiny_llava_onevision_vqa(tmp_path_factory.mktemp("tiny-llava-onevision-vqa"))


def _image(seed: int, width: int, height: int):
    from tests.e2e.images import make_image

    return make_image(seed).resize((width, height))


def test_config_and_processor(model_dir):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(model_dir)
    assert type(config).__name__ == "LlavaOnevisionConfig" and config.architectures == [tiny.ARCHITECTURE]
    assert type(config.vision_config).__name__ == "CLIPVisionConfig" and config.text_config.model_type == "llama"
    assert (config.vision_feature_select_strategy, config.vision_aspect_ratio) == ("default", "anyres_max_9")
    assert (config.image_token_index, config.video_token_index) == (llava.IMAGE_TOKEN_ID, tiny.VIDEO_TOKEN_ID)
    processor = AutoProcessor.from_pretrained(model_dir)
    assert len(processor.tokenizer) == config.text_config.vocab_size == llava.VOCAB_SIZE + 1
    assert processor.tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [llava.IMAGE_TOKEN_ID,
                                                                                 tiny.VIDEO_TOKEN_ID]


def test_chat_template_is_the_llavas_for_images(model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    llava_tokenizer = llava._hf_tokenizer(llava.train_tokenizer())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    expected = llava_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected
    with_video = [{"role": "user", "content": [{"type": "text", "text": "Moving?"}, {"type": "video"}]}]
    rendered = processor.apply_chat_template(with_video, add_generation_prompt=True)
    assert rendered == "<s>USER: <video>\nMoving? ASSISTANT:"


def test_weights_are_the_trained_llavas(model_dir):
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    trained = llava.load_external_weights(llava.TRAINED_WEIGHTS)
    assert set(state) == set(trained) | {"image_newline"}
    for name, tensor in trained.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(state[name][: llava.VOCAB_SIZE], tensor) and not state[name][tiny.VIDEO_TOKEN_ID].any()
        else:
            assert torch.equal(state[name], tensor), name


def test_hf_processor_counts_equal_vllms(model_dir, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoProcessor
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    processor = AutoProcessor.from_pretrained(model_dir)
    info = MULTIMODAL_REGISTRY.get_processing_info(ModelConfig(model=str(model_dir), max_model_len=4096))
    counts = {}
    for width, height in SIZES:
        ids = processor(text=["<image> hi"], images=[_image(1, width, height)], return_tensors="pt")["input_ids"]
        counts[(width, height)] = int((ids == llava.IMAGE_TOKEN_ID).sum())
        assert info.get_num_image_tokens(image_width=width, image_height=height) == counts[(width, height)]
    assert counts[(336, 336)] == 576 + 24 * 24 + 24  # base view ([CLS] dropped), one 24 x 24 tile, its newlines
    video = np.stack([np.asarray(_image(s, 64, 64)) for s in range(VIDEO_FRAMES)])
    ids = processor(text=["<video> hi"], videos=[video], return_tensors="pt")["input_ids"]
    assert int((ids == tiny.VIDEO_TOKEN_ID).sum()) == VIDEO_FRAMES * 12 * 12 + 1  # 24 x 24 pooled 2 x 2, a newline
    assert info.get_num_video_tokens(image_width=64, image_height=64, num_frames=VIDEO_FRAMES) == VIDEO_FRAMES * 144 + 1


def test_loads_in_transformers(model_dir):
    from transformers import LlavaOnevisionForConditionalGeneration

    _, loading = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True)
    assert not any(loading.values()), loading


def test_a_build_records_its_source_and_follows_the_bundled_weights(model_dir, tmp_path, monkeypatch):
    from vllm_tokcomp.tiny import files

    monkeypatch.setenv(files.MODELS_DIR_ENV, str(tmp_path))
    assert tiny.is_complete_model_dir(model_dir)
    assert files.read_manifest(model_dir)["source"] == files.sha256(llava.TRAINED_WEIGHTS)
    assert tiny.default_model_dir() == tmp_path / tiny.MODEL_SUBDIR and not tiny.is_complete_model_dir(tmp_path)
