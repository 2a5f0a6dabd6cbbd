"""Deterministic builder of a tiny LLaVA-OneVision model in Hugging Face format (offline, seconds to build).

The geometry that matters for visual-token work is the real one (transformers' ``LlavaOnevisionConfig`` /
``LlavaOnevisionProcessor``, vLLM's ``LlavaOnevisionForConditionalGeneration``): a SigLIP tower (no [CLS]) at
384 px with 14 px patches, 27 x 27 = 729 tokens per view, every token kept (``vision_feature_select_strategy="full"``,
the last layer's hidden states before the post-norm); an image is a 384 px base view plus the tiles of the
best-fitting grid among ``GRID_PINPOINTS`` (1x1, 1x2, 2x1, 2x2 and 3x4 / 4x3 tiles of 384 px), the tiles' features
unpadded to the image's aspect ratio with one ``image_newline`` token per row, and bilinearly shrunk when they
exceed ``anyres_max_9`` (more than 1.1^2 x 9 tiles' worth of tokens: only the 3x4 / 4x3 grids, e.g. a 1200 x 1500
image, 729 + 90 x 72 + 90 = 7299 tokens; a 500 x 300 image: 729 + 27 x 46 + 27 = 1998). A video is every frame
at 384 px, each frame's 27 x 27 features bilinearly shrunk to 14 x 14, plus one newline: 196 per frame + 1. A Qwen2 LM.

The tokenizer is the tiny Qwen2-VL's (:mod:`vllm_tokcomp.tiny.qwen2_vl_builder`) with ``<image>`` and ``<video>``
appended (ids 2048 and 2049, as LLaVA-OneVision appends them to Qwen2's); the chat template is ChatML with a message's
images, then its videos, then its text (as LLaVA-OneVision's own). Weights are random bf16, one seeded generator per
tensor (transformers' checkpoint names, which vLLM's ``hf_to_vllm_mapper`` maps), the LM's attention sharper than
the Qwen builders' so that greedy outputs depend on the image; special tokens' ``lm_head`` rows are zero. For counts
and serving, not answers. Building twice with the same seed gives identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

from . import files
from .qwen2_vl_builder import (
    BIAS_STD,
    ENDOFTEXT_ID,
    IM_END_ID,
    LOGIT_STD,
    MERGER_GAIN,
    NORM_JITTER,
    RESIDUAL_GAIN,
    TEXT_HEAD_DIM,
    TEXT_HEADS,
    TEXT_HIDDEN,
    TEXT_INTERMEDIATE,
    TEXT_KV_HEADS,
    TEXT_LAYERS,
    _hf_tokenizer,
    seeded_random_state,
    train_tokenizer,
)
from .qwen2_vl_builder import VOCAB_SIZE as QWEN_VOCAB_SIZE

BUILDER_VERSION = 1
MODEL_SUBDIR = "tiny-llava-onevision-v1"
ARCHITECTURE = "LlavaOnevisionForConditionalGeneration"
BUILDER = "vllm_tokcomp.tiny.llava_onevision_builder"

IMAGE_SIZE = 384
PATCH_SIZE = 14
PATCHES_PER_SIDE = IMAGE_SIZE // PATCH_SIZE  # 27 (SigLIP's conv drops the last 6 px)
NUM_IMAGE_TOKENS = PATCHES_PER_SIDE * PATCHES_PER_SIDE  # 729 per view, no [CLS]
VIDEO_FRAME_TOKENS = math.ceil(PATCHES_PER_SIDE / 2) ** 2  # 196: 2x2 bilinear pooling per frame
# [height, width]: 1x1, 1x2, 2x1, 2x2 tiles, and 3x4 / 4x3, where anyres_max_9 shrinks the unpadded tiles
GRID_PINPOINTS = [[384, 384], [384, 768], [768, 384], [768, 768], [1152, 1536], [1536, 1152]]
VISION_ASPECT_RATIO = "anyres_max_9"
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]
VISION_HIDDEN = 64
VISION_HEADS = 2
VISION_LAYERS = 2
VISION_INTERMEDIATE = 256
ROPE_THETA = 1000000.0
MAX_POSITION_EMBEDDINGS = 32768

# The Qwen models' init scales, but sharper LM attention: a prompt is mostly image tokens (729 to ~8000), which
# the Qwen gain (1.5) averages into nearly the same greedy output for every image; at 3.0 outputs differ per image.
QK_GAIN = 3.0

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = QWEN_VOCAB_SIZE, QWEN_VOCAB_SIZE + 1  # appended to the tiny Qwen2 tokenizer
VOCAB_SIZE = QWEN_VOCAB_SIZE + 2

# ChatML; in a message, its images, then its videos, then its text (LLaVA-OneVision's order), "\n" after media
# (a {{ '\n' }} expression: chat templates render with trim_blocks, which drops a newline right after a block tag).
# vLLM sends image_url / video_url parts as {"type": "image"} / {"type": "video"}.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% set ns = namespace(sep=false) %}"
    "{% for content in message['content'] %}{% if content['type'] in ('image', 'image_url') %}<image>"
    "{% set ns.sep = true %}{% endif %}{% endfor %}"
    "{% for content in message['content'] %}{% if content['type'] in ('video', 'video_url') %}<video>"
    "{% set ns.sep = true %}{% endif %}{% endfor %}"
    "{% for content in message['content'] %}{% if content['type'] == 'text' %}"
    "{% if ns.sep %}{{ '\\n' }}{% endif %}{{ content['text'] }}{% set ns.sep = true %}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_config():  # noqa: ANN201 - transformers' LlavaOnevisionConfig (lazy import)
    """The tiny LLaVA-OneVision's ``LlavaOnevisionConfig``: SigLIP tower, Qwen2 LM."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_INTERMEDIATE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        num_channels=3,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        head_dim=TEXT_HEAD_DIM,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        max_window_layers=TEXT_LAYERS,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        dtype="bfloat16",
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio=VISION_ASPECT_RATIO,
        image_grid_pinpoints=GRID_PINPOINTS,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.architectures = [ARCHITECTURE]
    config.dtype = "bfloat16"
    return config


_TOWER, _TOWER_ON_DISK = "model.vision_tower.", "model.vision_tower.vision_model."


def checkpoint_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the tiny model as checkpoints hold them, from a meta-device instance:
    transformers' names, the SigLIP tower's under ``vision_model.`` (transformers >= 5 drops that level in memory and
    adds it back on save; vLLM's ``SiglipVisionModel`` needs it)."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(make_config())
    return {(_TOWER_ON_DISK + name.removeprefix(_TOWER) if name.startswith(_TOWER) else name): tuple(t.shape)
            for name, t in model.state_dict().items()}


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"tiny-llava-onevision-v{BUILDER_VERSION}:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _init_std(name: str, shape: tuple[int, ...]) -> tuple[str, float]:
    """As the tiny Qwen models' init (activations near unit RMS, residual updates halved, the projector's output
    layer scaled up), with sharper LM attention (:data:`QK_GAIN`); ``image_newline`` like a token embedding."""
    if name.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight")):
        return "norm", NORM_JITTER
    if name.endswith(".bias"):
        return "bias", BIAS_STD
    if name.endswith(("embed_tokens.weight", "image_newline")):
        return "normal", 1.0
    if name.endswith("position_embedding.weight"):
        return "normal", 0.1
    if name == "lm_head.weight":
        return "normal", LOGIT_STD / math.sqrt(shape[1])
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    gain = 1.0
    if ".language_model." in name:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            gain = QK_GAIN
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            gain = RESIDUAL_GAIN
    elif name.endswith("multi_modal_projector.linear_2.weight"):
        gain = MERGER_GAIN
    return "normal", gain / math.sqrt(fan_in)


def random_state_dict(seed: int = 0) -> dict:
    """Deterministic random bf16 weights, one generator per tensor seeded from ``(seed, name)``; the ``lm_head``
    rows of every special token (``<image>`` and ``<video>`` too) zero."""
    state = seeded_random_state(checkpoint_shapes(), lambda name: _tensor_seed(seed, name), _init_std)
    state["lm_head.weight"][IMAGE_TOKEN_ID:] = 0
    return state


def make_tokenizer():  # noqa: ANN201 - a transformers tokenizer
    """The tiny Qwen2-VL tokenizer with ``<image>`` / ``<video>`` appended as special tokens."""
    tokenizer = _hf_tokenizer(train_tokenizer())
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]},
                                 replace_extra_special_tokens=False)
    found = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN])
    if found != [IMAGE_TOKEN_ID, VIDEO_TOKEN_ID] or len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"<image>/<video> got ids {found} of {len(tokenizer)}, expected "
                           f"{[IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]} of {VOCAB_SIZE}")
    tokenizer.model_max_length = MAX_POSITION_EMBEDDINGS
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_processor(tokenizer=None):  # noqa: ANN001, ANN201 - transformers' LlavaOnevisionProcessor
    """``LlavaOnevisionProcessor`` (image and video processors at 384 px, SigLIP's mean/std) around ``tokenizer``
    (default :func:`make_tokenizer`)."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    pixels = {"size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(**pixels, image_grid_pinpoints=GRID_PINPOINTS, do_pad=True),
        video_processor=LlavaOnevisionVideoProcessor(**pixels),
        tokenizer=tokenizer if tokenizer is not None else make_tokenizer(),
        num_image_tokens=NUM_IMAGE_TOKENS,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=VISION_ASPECT_RATIO,
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llava_onevision(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny LLaVA-OneVision model: config, weights, tokenizer, processors, chat template."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    state = random_state_dict(seed)
    out = Path(out_dir)
    files.start_build(out)
    tokenizer = make_tokenizer()
    make_processor(tokenizer).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    make_config().save_pretrained(str(out))
    GenerationConfig(bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID).save_pretrained(
        str(out)
    )
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    files.write_manifest(out, {
        "builder": BUILDER,
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
    })
    return out


def is_complete_model_dir(path: str | Path) -> bool:
    """A finished build of this builder version."""
    manifest = files.read_manifest(path) or {}
    return (manifest.get("builder"), manifest.get("builder_version")) == (BUILDER, BUILDER_VERSION)


def default_model_dir() -> Path:
    """``$TOKCOMP_MODELS_DIR/tiny-llava-onevision-v1`` (root ``~/.cache/vllm-tokcomp/models``)."""
    return files.models_root() / MODEL_SUBDIR


def ensure_default_model() -> Path:
    """:func:`default_model_dir`, built first (in a temporary sibling renamed into place) if missing."""
    target = default_model_dir()
    return files.build_in_place(target, lambda: is_complete_model_dir(target), build_tiny_llava_onevision)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {BUILDER}", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", help="output directory (default: build/ensure the default model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = ensure_default_model() if args.out_dir is None else build_tiny_llava_onevision(args.out_dir, seed=args.seed)
    print(f"{path} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
