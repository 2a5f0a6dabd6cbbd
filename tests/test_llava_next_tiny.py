"""Tiny LLaVA-NeXT builder: the tiny LLaVA in the anyres layout; the HF processor's placeholder counts (base view,
unpadded tiles, a newline per row) and loading and generating in transformers."""

import pytest
import torch

from vllm_tokcomp.tiny import llava_builder as base
from vllm_tokcomp.tiny import llava_next_builder as tiny

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.build_tiny_llava_next(tmp_path_factory.mktemp("tiny-llava-next"))


def test_config_and_weights(model_dir):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    assert config.architectures == ["LlavaNextForConditionalGeneration"]
    assert config.image_grid_pinpoints == tiny.GRID_PINPOINTS
    state = load_file(str(model_dir / "model.safetensors"))
    assert state["image_newline"].shape == (base.TEXT_HIDDEN,)
    if base.TRAINED_WEIGHTS.is_file():  # the tower, projector and LM are the bundled LLaVA's
        trained = load_file(str(base.TRAINED_WEIGHTS))
        shared = set(trained) & set(state)
        assert len(shared) == len(trained) and all(torch.equal(trained[k], state[k]) for k in shared)


@pytest.mark.parametrize(("size", "tokens"), [((336, 336), 576 + 24 * 24 + 24), ((448, 224), 576 + 24 * 48 + 24)])
def test_processor_counts_base_tiles_and_newlines(model_dir, size, tokens):
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor(text=["<image> hi"], images=[Image.new("RGB", size)], return_tensors="pt")
    assert int((inputs["input_ids"] == base.IMAGE_TOKEN_ID).sum()) == tokens


def test_loads_in_transformers_and_generates(model_dir):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from tests.e2e.images import make_image

    processor = AutoProcessor.from_pretrained(model_dir)
    model, info = LlavaNextForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[make_image(1)], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(generated) <= 4
