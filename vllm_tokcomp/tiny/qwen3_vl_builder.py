"""Deterministic builder of a tiny Qwen3-VL model in Hugging Face format (offline, seconds to build).

The geometry that matters for visual-token work is the real one (transformers' ``Qwen3VLConfig``, vLLM's
``Qwen3VLForConditionalGeneration``): patch 16 with a 2x2 spatial merge (32 px per LM token), temporal patch 2,
learned position embeddings interpolated to each grid, **DeepStack** (the tower's features after blocks
``DEEPSTACK_LAYERS`` are projected by their own mergers and added to the first LM layers' hidden states at the
image tokens), interleaved M-RoPE, and videos as one ``<t seconds><|vision_start|><|video_pad|>...<|vision_end|>``
span per temporal patch. ``min_pixels``/``max_pixels`` are small: an image becomes an 8x8 .. 16x16 grid of
merged tokens (a 336x336 image: 10x10 = 100 LM tokens).

The tokenizer, corpus, chat template and special-token ids are the tiny Qwen2-VL's
(:mod:`vllm_tokcomp.tiny.qwen2_vl_builder`). Weights are random bf16, one seeded generator per tensor (transformers'
names, which vLLM's ``hf_to_vllm_mapper`` maps); special tokens' ``lm_head`` rows are zero, so greedy decoding
runs to ``max_tokens``. Building twice with the same seed gives identical files.
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
    CHAT_TEMPLATE,
    ENDOFTEXT_ID,
    IM_END_ID,
    IMAGE_TOKEN_ID,
    LOGIT_STD,
    MERGER_GAIN,
    NORM_JITTER,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    QK_GAIN,
    RESIDUAL_GAIN,
    TEXT_HEAD_DIM,
    TEXT_HEADS,
    TEXT_HIDDEN,
    TEXT_INTERMEDIATE,
    TEXT_KV_HEADS,
    TEXT_LAYERS,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB_SIZE,
    _hf_tokenizer,
    seeded_random_state,
    train_tokenizer,
)

BUILDER_VERSION = 1
VARIANTS = ("qwen3_vl", "qwen3_vl_moe")
MODEL_SUBDIRS = {"qwen3_vl": "tiny-qwen3-vl-v1", "qwen3_vl_moe": "tiny-qwen3-vl-moe-v1"}
ARCHITECTURES = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}

PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 32 px per merged token side
MIN_PIXELS = 8 * 8 * FACTOR * FACTOR
MAX_PIXELS = 16 * 16 * FACTOR * FACTOR
VISION_HIDDEN = 64
VISION_HEADS = 2
VISION_DEPTH = 3
VISION_INTERMEDIATE = 256
DEEPSTACK_LAYERS = [0, 1]  # tower blocks whose outputs feed LM layers 0 and 1 (Qwen3-VL-8B: [8, 16, 24])
POSITION_EMBEDDINGS = 256  # a 16 x 16 learned table, bilinearly interpolated to each grid
MROPE_SECTION = [12, 10, 10]  # sums to TEXT_HEAD_DIM / 2, in Qwen3-VL's 24:20:20 proportion
ROPE_THETA = 10000.0
MAX_POSITION_EMBEDDINGS = 8192
# the MoE variant (Qwen3-VL-30B-A3B's layout): every LM layer sparse, EXPERTS experts of MOE_INTERMEDIATE, top-2
EXPERTS, EXPERTS_PER_TOKEN, MOE_INTERMEDIATE = 4, 2, 64
EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def make_config(variant: str = "qwen3_vl"):  # noqa: ANN201 - transformers' Qwen3VLConfig (lazy import)
    """The tiny Qwen3-VL's ``Qwen3VLConfig`` (``Qwen3VLMoeConfig`` for ``variant="qwen3_vl_moe"``: the same model
    with every LM MLP a mixture of experts)."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    _check_variant(variant)
    moe = {"num_experts": EXPERTS, "num_experts_per_tok": EXPERTS_PER_TOKEN, "moe_intermediate_size": MOE_INTERMEDIATE,
           "decoder_sparse_step": 1, "norm_topk_prob": True} if variant == "qwen3_vl_moe" else {}
    config = (Qwen3VLMoeConfig if variant == "qwen3_vl_moe" else Qwen3VLConfig)(
        text_config={
            **moe,
            "vocab_size": VOCAB_SIZE,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": TEXT_INTERMEDIATE,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": TEXT_HEADS,
            "num_key_value_heads": TEXT_KV_HEADS,
            "head_dim": TEXT_HEAD_DIM,
            "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": MROPE_SECTION,
                                "mrope_interleaved": True},
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": IM_END_ID,
            "dtype": "bfloat16",
        },
        vision_config={
            "depth": VISION_DEPTH,
            "hidden_size": VISION_HIDDEN,
            "hidden_act": "gelu_pytorch_tanh",
            "intermediate_size": VISION_INTERMEDIATE,
            "num_heads": VISION_HEADS,
            "in_channels": 3,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
            "out_hidden_size": TEXT_HIDDEN,
            "num_position_embeddings": POSITION_EMBEDDINGS,
            "deepstack_visual_indexes": DEEPSTACK_LAYERS,
        },
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.architectures = [ARCHITECTURES[variant]]
    return config


def checkpoint_shapes(variant: str = "qwen3_vl") -> dict[str, tuple[int, ...]]:
    """Every tensor name (transformers layout) and shape of the tiny model, from a meta-device instance."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    model_class = Qwen3VLMoeForConditionalGeneration if variant == "qwen3_vl_moe" else Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        model = model_class(make_config(variant))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _tensor_seed(seed: int, name: str, variant: str = "qwen3_vl") -> int:
    tag = "tiny-qwen3-vl" if variant == "qwen3_vl" else f"tiny-{variant}"
    digest = hashlib.sha256(f"{tag}-v{BUILDER_VERSION}:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _init_std(name: str, shape: tuple[int, ...]) -> tuple[str, float]:
    """As the tiny Qwen2-VL's init: activations near unit RMS, residual updates halved, the mergers' output layers
    scaled up so that greedy outputs depend on the image."""
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
        return "norm", NORM_JITTER
    if name.endswith(".bias"):
        return "bias", BIAS_STD
    if name.endswith(("embed_tokens.weight", "pos_embed.weight")):
        return "normal", 1.0 if "embed_tokens" in name else 0.1
    if name == "lm_head.weight":
        return "normal", LOGIT_STD / math.sqrt(shape[1])
    # fused experts are [experts, out, in]; every other weight [out, in, ...]
    fan_in = shape[-1] if name.endswith(EXPERT_TENSORS) else math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    gain = 1.0
    if ".language_model." in name:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            gain = QK_GAIN
        elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
            gain = RESIDUAL_GAIN
    elif "merger" in name and name.endswith("linear_fc2.weight"):
        gain = MERGER_GAIN
    return "normal", gain / math.sqrt(fan_in)


def random_state_dict(seed: int = 0, variant: str = "qwen3_vl") -> dict:
    """Deterministic random bf16 weights, one generator per tensor seeded from ``(seed, name)``; fused experts in
    the checkpoints' ``[experts, in, out]`` layout (transformers holds them as ``[experts, out, in]``; vLLM's loader
    reads the checkpoint layout)."""
    state = seeded_random_state(checkpoint_shapes(variant), lambda name: _tensor_seed(seed, name, variant), _init_std)
    return {name: t.transpose(1, 2).contiguous() if name.endswith(EXPERT_TENSORS) else t for name, t in state.items()}


def image_processor_kwargs() -> dict:
    """The tiny model's pixel geometry, for ``Qwen2VLImageProcessor`` / ``Qwen3VLVideoProcessor``."""
    return {
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
    }


def build_tiny_qwen3_vl(out_dir: str | Path, *, seed: int = 0, variant: str = "qwen3_vl") -> Path:
    """Write the tiny Qwen3-VL (or Qwen3-VL-MoE) model: config, weights, tokenizer, processors, chat template."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    _check_variant(variant)
    state = random_state_dict(seed, variant)
    out = Path(out_dir)
    files.start_build(out)
    tokenizer = _hf_tokenizer(train_tokenizer())
    pixels = image_processor_kwargs()
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen3VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    make_config(variant).save_pretrained(str(out))
    GenerationConfig(bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID).save_pretrained(
        str(out)
    )
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    files.write_manifest(out, {
        "builder": "vllm_tokcomp.tiny.qwen3_vl_builder",
        "builder_version": BUILDER_VERSION,
        "variant": variant,
        "seed": seed,
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
    })
    return out


def is_complete_model_dir(path: str | Path, variant: str = "qwen3_vl") -> bool:
    """A finished build of this builder version and variant."""
    manifest = files.read_manifest(path) or {}
    found = manifest.get("builder"), manifest.get("builder_version"), manifest.get("variant")
    return found == ("vllm_tokcomp.tiny.qwen3_vl_builder", BUILDER_VERSION, variant)


def default_model_dir(variant: str = "qwen3_vl") -> Path:
    """``$TOKCOMP_MODELS_DIR/tiny-qwen3-vl-v1`` or ``tiny-qwen3-vl-moe-v1`` (root ``~/.cache/vllm-tokcomp/models``)."""
    _check_variant(variant)
    return files.models_root() / MODEL_SUBDIRS[variant]


def ensure_default_model(variant: str = "qwen3_vl") -> Path:
    """:func:`default_model_dir`, built first (in a temporary sibling renamed into place) if missing."""
    target = default_model_dir(variant)
    return files.build_in_place(target, lambda: is_complete_model_dir(target, variant),
                                lambda tmp: build_tiny_qwen3_vl(tmp, variant=variant))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_tokcomp.tiny.qwen3_vl_builder",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", help="output directory (default: build/ensure the default model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=VARIANTS, default="qwen3_vl")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.out_dir is None:
        path = ensure_default_model(args.variant)
    else:
        path = build_tiny_qwen3_vl(args.out_dir, seed=args.seed, variant=args.variant)
    print(f"{path} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
