"""Deterministic builder of the tiny LLaVA-OneVision for quality rows: the trained tiny LLaVA in OneVision's layout.

The bundled trained tiny LLaVA (:mod:`vllm_tokcomp.tiny.llava_builder`: CLIP tower of 24 x 24 patches of 14 px at
336 px, projector, Llama LM, tokenizer) in transformers' ``LlavaOnevisionConfig`` / ``LlavaOnevisionProcessor``:
an image is a 336 px base view (576 tokens, [CLS] dropped) plus the tiles of the best-fitting grid among
``GRID_PINPOINTS`` (LLaVA-OneVision's 1x1 .. 2x2 and 3x4 / 4x3 grids at 336 px), the tiles' features unpadded to the
image's aspect ratio with one ``image_newline`` per row and shrunk by ``anyres_max_9``; a video is every frame's
features pooled to 12 x 12 plus one newline. A 336 x 336 image is 576 + 24 x 24 + 24 = 1176 tokens.

The tower, projector and LM are the trained ones; ``image_newline`` is seeded random and ``<video>`` is a new token
(id 2048, its rows zero). The model was trained on one 336 px view, never on tiles or frames: like the tiny
LLaVA-NeXT, its quality rows measure what methods do with OneVision's token layout on a model that reads the base
view well and the tiles as extra context. The random-weight tiny LLaVA-OneVision
(:mod:`vllm_tokcomp.tiny.llava_onevision_builder`) has the family's SigLIP tower and Qwen2 LM, for counts and serving.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import files
from . import llava_builder as base
from .llava_next_builder import image_newline
from .llava_onevision_builder import VISION_ASPECT_RATIO

BUILDER_VERSION = 1
BUILDER = "vllm_tokcomp.tiny.llava_onevision_vqa_builder"
MODEL_SUBDIR = "tiny-llava-onevision-vqa-v1"
ARCHITECTURE = "LlavaOnevisionForConditionalGeneration"
TILE = base.IMAGE_SIZE
# [height, width]: LLaVA-OneVision's grids (1x1, 1x2, 2x1, 2x2, 3x4, 4x3 tiles) at the tiny tower's 336 px
GRID_PINPOINTS = [[TILE, TILE], [TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, 4 * TILE],
                  [4 * TILE, 3 * TILE]]
VIDEO_TOKEN = "<video>"
VIDEO_TOKEN_ID = base.VOCAB_SIZE  # appended to the tiny LLaVA's vocabulary
VOCAB_SIZE = base.VOCAB_SIZE + 1

# the tiny LLaVA's conversation format with videos: a message's images, then its videos, then its text
CHAT_TEMPLATE = base.CHAT_TEMPLATE.replace(
    "            {%- for part in message['content'] if part['type'] == 'text' -%}\n"
    "                {{- part['text'] -}}{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}\n"
    "            {%- endfor -%}\n"
    "        {%- endif -%}\n"
    "        {{- ' ' -}}\n"
    "    {%- elif message['role'] == 'assistant' -%}",
    "            {%- for part in message['content'] if part['type'] == 'video' -%}\n"
    "                {{- '<video>\\n' -}}\n"
    "            {%- endfor -%}\n"
    "            {%- for part in message['content'] if part['type'] == 'text' -%}\n"
    "                {{- part['text'] -}}{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}\n"
    "            {%- endfor -%}\n"
    "        {%- endif -%}\n"
    "        {{- ' ' -}}\n"
    "    {%- elif message['role'] == 'assistant' -%}",
    1,
)
if CHAT_TEMPLATE == base.CHAT_TEMPLATE:  # the tiny LLaVA's template changed shape: fail at import, not silently
    raise RuntimeError("llava_onevision_vqa_builder: could not add videos to the tiny LLaVA's chat template")


def make_config(geometry: base.Geometry = base.Geometry()):  # noqa: ANN201, B008 - transformers' LlavaOnevisionConfig
    """The tiny LLaVA's tower and LM in a ``LlavaOnevisionConfig``."""
    import torch
    from transformers import LlavaOnevisionConfig

    llava = base._make_config(VOCAB_SIZE, geometry)
    config = LlavaOnevisionConfig(
        vision_config=llava.vision_config,
        text_config=llava.text_config,
        image_token_index=base.IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_layer=base.VISION_FEATURE_LAYER,
        vision_feature_select_strategy="default",
        vision_aspect_ratio=VISION_ASPECT_RATIO,
        image_grid_pinpoints=GRID_PINPOINTS,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.architectures = [ARCHITECTURE]
    config.dtype = torch.bfloat16
    return config


def make_tokenizer():  # noqa: ANN201 - a transformers tokenizer
    """The tiny LLaVA's tokenizer with ``<video>`` appended as a special token and videos in its chat template."""
    tokenizer = base._hf_tokenizer(base.train_tokenizer())
    tokenizer.add_special_tokens({"extra_special_tokens": [VIDEO_TOKEN]}, replace_extra_special_tokens=False)
    if tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) != VIDEO_TOKEN_ID or len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"<video> got id {tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)} of {len(tokenizer)}, "
                           f"expected {VIDEO_TOKEN_ID} of {VOCAB_SIZE}")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_processor(tokenizer=None):  # noqa: ANN001, ANN201 - transformers' LlavaOnevisionProcessor
    """``LlavaOnevisionProcessor`` at 336 px with CLIP's mean/std. ``num_image_tokens`` counts the tower's outputs
    with [CLS] (577): the processor takes one off for ``vision_feature_select_strategy="default"``."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    pixels = {"size": {"height": TILE, "width": TILE}, "image_mean": base.OPENAI_CLIP_MEAN,
              "image_std": base.OPENAI_CLIP_STD}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(**pixels, image_grid_pinpoints=GRID_PINPOINTS, do_pad=True),
        video_processor=LlavaOnevisionVideoProcessor(**pixels),
        tokenizer=tokenizer if tokenizer is not None else make_tokenizer(),
        num_image_tokens=base.NUM_IMAGE_TOKENS + 1,
        vision_feature_select_strategy="default",
        vision_aspect_ratio=VISION_ASPECT_RATIO,
        image_token=base.IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def with_video_token(state: dict) -> dict:
    """The tiny LLaVA's weights with a row for ``<video>``: zero in the embedding and ``lm_head`` (never predicted;
    each ``<video>`` position is replaced by frame features before the LM reads it)."""
    import torch

    out = dict(state)
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        table = state[name]
        out[name] = torch.cat([table, torch.zeros(1, table.shape[1], dtype=table.dtype)])
    return out


def build_tiny_llava_onevision_vqa(out_dir: str | Path, *, seed: int = 0, weights: str | Path | None = None) -> Path:
    """Write the model: ``weights`` a tiny-LLaVA safetensors file (default: the bundled trained weights)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    weights = base.TRAINED_WEIGHTS if weights is None else weights
    state = base.load_external_weights(weights)
    geometry = base.Geometry.of(state, base.weights_metadata(weights))
    state = with_video_token(state)
    state["image_newline"] = image_newline(seed, tag=f"tiny-llava-onevision-vqa-v{BUILDER_VERSION}")
    out = Path(out_dir)
    files.start_build(out)
    tokenizer = make_tokenizer()
    make_processor(tokenizer).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    make_config(geometry).save_pretrained(str(out))
    GenerationConfig(bos_token_id=base.BOS_TOKEN_ID, eos_token_id=base.EOS_TOKEN_ID,
                     pad_token_id=base.PAD_TOKEN_ID).save_pretrained(str(out))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", **geometry.metadata()})
    files.write_manifest(out, {
        "builder": BUILDER,
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "source": files.sha256(base._weights_file(weights)),
        "image_token_id": base.IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
    })
    return out


def is_complete_model_dir(path: str | Path) -> bool:
    """A finished build of this builder version, from the weights bundled now."""
    manifest = files.read_manifest(path) or {}
    return ((manifest.get("builder"), manifest.get("builder_version")) == (BUILDER, BUILDER_VERSION)
            and manifest.get("source") == files.sha256(base.TRAINED_WEIGHTS))


def default_model_dir() -> Path:
    """``$TOKCOMP_MODELS_DIR/tiny-llava-onevision-vqa-v1`` (root ``~/.cache/vllm-tokcomp/models``)."""
    return files.models_root() / MODEL_SUBDIR


def ensure_default_model() -> Path:
    """:func:`default_model_dir`, built first (in a temporary sibling renamed into place) if missing."""
    if not base.TRAINED_WEIGHTS.is_file():
        raise FileNotFoundError(f"bundled trained weights not found: {base.TRAINED_WEIGHTS}")
    target = default_model_dir()
    return files.build_in_place(target, lambda: is_complete_model_dir(target), build_tiny_llava_onevision_vqa)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {BUILDER}", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", help="output directory (default: build/ensure the default model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = (ensure_default_model() if args.out_dir is None
            else build_tiny_llava_onevision_vqa(args.out_dir, seed=args.seed))
    print(f"{path} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
