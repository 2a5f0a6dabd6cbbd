"""Deterministic builder of a tiny LLaVA-NeXT (anyres) model in Hugging Face format (offline, seconds to build).

The tiny LLaVA (:mod:`vllm_tokcomp.tiny.llava_builder`: CLIP tower of 24 x 24 patches of 14 px at 336 px, projector,
Llama LM, tokenizer and chat template) in transformers' ``LlavaNextConfig`` / ``LlavaNextProcessor`` layout: an
image is a 336 px base view plus the tiles of the best-fitting grid among ``GRID_PINPOINTS`` (336 x 672, 672 x
336, 672 x 672), the tiles' features unpadded to the image's aspect ratio with one ``image_newline`` token after
each row. With the bundled LLaVA weights (the default) the tower, projector and LM are the trained ones and
``image_newline`` is a seeded random vector: the model has not been trained on tiles, so it is a yardstick for
counts and serving, not for answers.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from . import files
from . import llava_builder as base

BUILDER_VERSION = 1
MODEL_SUBDIR = "tiny-llava-next-v1"
ARCHITECTURE = "LlavaNextForConditionalGeneration"
GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672]]


def make_config(geometry: base.Geometry = base.Geometry()):  # noqa: ANN201, B008 - transformers' LlavaNextConfig
    """The tiny LLaVA's tower and LM in a ``LlavaNextConfig``."""
    import torch
    from transformers import LlavaNextConfig

    llava = base._make_config(base.VOCAB_SIZE, geometry)
    config = LlavaNextConfig(
        vision_config=llava.vision_config,
        text_config=llava.text_config,
        image_token_index=base.IMAGE_TOKEN_ID,
        image_grid_pinpoints=GRID_PINPOINTS,
        projector_hidden_act="gelu",
        vision_feature_layer=base.VISION_FEATURE_LAYER,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        image_seq_length=base.NUM_IMAGE_TOKENS,
    )
    config.architectures = [ARCHITECTURE]
    config.dtype = torch.bfloat16
    return config


def image_newline(seed: int = 0, tag: str = f"tiny-llava-next-v{BUILDER_VERSION}"):  # noqa: ANN201 - a torch tensor
    """The ``image_newline`` vector (bf16, the LM's width), seeded from ``tag`` and ``seed``, about unit RMS like the
    projector's outputs."""
    import torch

    digest = hashlib.sha256(f"{tag}:{seed}:image_newline".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randn(base.TEXT_HIDDEN, generator=generator).to(torch.bfloat16)


def build_tiny_llava_next(out_dir: str | Path, *, seed: int = 0, weights: str | Path | None = None) -> Path:
    """Write the tiny LLaVA-NeXT: ``weights`` a tiny-LLaVA safetensors file (default: the bundled trained weights
    when present, else the random init)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlavaNextImageProcessor, LlavaNextProcessor

    if weights is None and base.TRAINED_WEIGHTS.is_file():
        weights = base.TRAINED_WEIGHTS
    state = base.load_external_weights(weights) if weights is not None else base.random_state_dict(seed)
    geometry = base.Geometry.of(state, base.weights_metadata(weights) if weights is not None else None)
    state["image_newline"] = image_newline(seed)
    out = Path(out_dir)
    files.start_build(out)
    tokenizer = base._hf_tokenizer(base.train_tokenizer())
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": base.IMAGE_SIZE},
        crop_size={"height": base.IMAGE_SIZE, "width": base.IMAGE_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS,
        do_pad=True,
        image_mean=base.OPENAI_CLIP_MEAN,
        image_std=base.OPENAI_CLIP_STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=base.PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=base.IMAGE_TOKEN,
        chat_template=base.CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    make_config(geometry).save_pretrained(str(out))
    GenerationConfig(bos_token_id=base.BOS_TOKEN_ID, eos_token_id=base.EOS_TOKEN_ID,
                     pad_token_id=base.PAD_TOKEN_ID).save_pretrained(str(out))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", **geometry.metadata()})
    files.write_manifest(out, {
        "builder": "vllm_tokcomp.tiny.llava_next_builder",
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "source": None if weights is None else files.sha256(base._weights_file(weights)),
        "image_token_id": base.IMAGE_TOKEN_ID,
    })
    return out


def _source() -> str | None:
    return files.sha256(base.TRAINED_WEIGHTS) if base.TRAINED_WEIGHTS.is_file() else None


def is_complete_model_dir(path: str | Path) -> bool:
    """A finished build of this builder version, from the weights bundled now."""
    manifest = files.read_manifest(path) or {}
    return ((manifest.get("builder"), manifest.get("builder_version")) == ("vllm_tokcomp.tiny.llava_next_builder",
                                                                           BUILDER_VERSION)
            and manifest.get("source") == _source())


def default_model_dir() -> Path:
    """``$TOKCOMP_MODELS_DIR/tiny-llava-next-v1`` (root ``~/.cache/vllm-tokcomp/models``)."""
    return files.models_root() / MODEL_SUBDIR


def ensure_default_model() -> Path:
    """:func:`default_model_dir`, built first (in a temporary sibling renamed into place) if missing."""
    target = default_model_dir()
    return files.build_in_place(target, lambda: is_complete_model_dir(target), build_tiny_llava_next)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_tokcomp.tiny.llava_next_builder",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", help="output directory (default: build/ensure the default model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = ensure_default_model() if args.out_dir is None else build_tiny_llava_next(args.out_dir, seed=args.seed)
    print(f"{path} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
