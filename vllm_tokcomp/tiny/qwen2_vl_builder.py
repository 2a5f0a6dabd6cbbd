"""Deterministic builder of a tiny Qwen2-VL model in Hugging Face format (offline, seconds to build).

Geometry that matters for visual-token work is the real one: dynamic resolution
(``Qwen2VLImageProcessor``, patch 14, 2x2 spatial merge, temporal patch 2), M-RoPE with
``mrope_section`` summing to ``head_dim / 2``, and the Qwen2-VL special tokens
(``<|vision_start|>``, ``<|image_pad|>``, ``<|video_pad|>``, ``<|vision_end|>``) and chat template.
``min_pixels``/``max_pixels`` are small, so an image becomes an 8x8 .. 16x16 grid of merged tokens
(a 336x336 image: 12x12 = 144 LM tokens; 224x448: 8x16 = 128).

Everything is generated locally: a byte-level BPE tokenizer trained on the built-in corpus
(:mod:`vllm_tokcomp.tiny.corpus`), random bf16 weights with one seeded generator per tensor
(names in transformers' layout, ``model.visual.*`` / ``model.language_model.*`` / ``lm_head.*``,
which vLLM's ``hf_to_vllm_mapper`` maps). Building twice with the same seed gives identical files.
Special tokens' ``lm_head`` rows are zero, so random-weight greedy decoding runs to ``max_tokens``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import files
from .tokenizer import train_bpe_tokenizer

BUILDER_VERSION = 1
MODEL_SUBDIR = "tiny-qwen2-vl-v1"
MODEL_SUBDIR_2_5 = "tiny-qwen2.5-vl-v1"
VARIANTS = ("qwen2_vl", "qwen2_5_vl")
_ASSETS = Path(__file__).resolve().parents[1] / "assets"
# the bundled weights trained on the synthetic VQA task (lab/tokcomp_lab/train/qwen2_vl.py), per variant
TRAINED_WEIGHTS_OF = {"qwen2_vl": _ASSETS / "tiny_qwen2_vl_vqa.safetensors",
                      "qwen2_5_vl": _ASSETS / "tiny_qwen2_5_vl_vqa.safetensors"}
TRAINED_MODEL_SUBDIR_OF = {"qwen2_vl": "tiny-qwen2-vl-vqa-v1", "qwen2_5_vl": "tiny-qwen2.5-vl-vqa-v1"}
ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}

# --- geometry -------------------------------------------------------------------------
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28 px per merged token side
MIN_PIXELS = 8 * 8 * FACTOR * FACTOR  # at least ~8x8 merged tokens
MAX_PIXELS = 16 * 16 * FACTOR * FACTOR  # at most ~16x16 merged tokens
VISION_EMBED = 64
VISION_HEADS = 2
VISION_DEPTH = 2
VISION_MLP_RATIO = 4
TEXT_HIDDEN = 256
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_HEAD_DIM = TEXT_HIDDEN // TEXT_HEADS  # 64: vLLM's CPU attention supports 32, 64, 80, ...
TEXT_LAYERS = 2
TEXT_INTERMEDIATE = 512
MROPE_SECTION = [8, 12, 12]  # sums to TEXT_HEAD_DIM / 2 (t, h, w)
ROPE_THETA = 10000.0
MAX_POSITION_EMBEDDINGS = 8192
VOCAB_SIZE = 2048

# --- tokenizer ------------------------------------------------------------------------
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)  # ids 0..6
(ENDOFTEXT_ID, IM_START_ID, IM_END_ID, VISION_START_ID, VISION_END_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID) = range(
    len(SPECIAL_TOKENS)
)

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Init scales: as for the tiny LLaVA (see tiny/llava_builder.py), activations near unit RMS, residual
# updates halved, lm_head logits with a standard deviation of about LOGIT_STD.
QK_GAIN = 1.5
RESIDUAL_GAIN = 0.5
LOGIT_STD = 8.0
MERGER_GAIN = 2.0  # the merger's output layer: image tokens weigh more, greedy outputs depend on the image
NORM_JITTER = 0.1
BIAS_STD = 0.1

# The Qwen2-VL chat template (Qwen/Qwen2-VL-7B-Instruct), media parts rendered where they appear.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer():  # noqa: ANN201 - returns tokenizers.Tokenizer (lazy import)
    """Byte-level BPE on the built-in corpus with the Qwen2-VL special tokens at ids 0..6."""
    return train_bpe_tokenizer(SPECIAL_TOKENS, VOCAB_SIZE)


def _hf_tokenizer(tokenizer):  # noqa: ANN001, ANN202
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=MAX_POSITION_EMBEDDINGS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


@dataclass(frozen=True)
class TextGeometry:
    """The LM sizes a trained model may change (read back from its weights by :meth:`of`); the default is the
    random model's. The trained tiny Qwen2-VL takes its LM from the trained tiny LLaVA (8 layers, 4 KV heads)."""

    layers: int = TEXT_LAYERS
    kv_heads: int = TEXT_KV_HEADS

    @classmethod
    def of(cls, state: Mapping[str, object]) -> TextGeometry:
        found = {int(m.group(1)) for key in state if (m := _LM_LAYER.match(key))}
        k_proj = state.get("model.language_model.layers.0.self_attn.k_proj.weight")
        if not found or k_proj is None:
            raise ValueError("not a Qwen2-VL state dict (transformers names): no language_model layers")
        return cls(layers=max(found) + 1, kv_heads=tuple(k_proj.shape)[0] // TEXT_HEAD_DIM)


_LM_LAYER = re.compile(r"model\.language_model\.layers\.(\d+)\.")


def make_config(variant: str = "qwen2_vl", text: TextGeometry = TextGeometry()):  # noqa: ANN201, B008
    """Qwen2-VL, or Qwen2.5-VL (``variant="qwen2_5_vl"``: SwiGLU RMSNorm tower with window attention,
    window 56 px = 2x2 merged tokens, full attention in the last block, tokens_per_second 2); returns
    transformers' ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig``."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    vision = {
        "depth": VISION_DEPTH,
        "embed_dim": VISION_EMBED,
        "hidden_size": TEXT_HIDDEN,
        "num_heads": VISION_HEADS,
        "mlp_ratio": VISION_MLP_RATIO,
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "hidden_act": "quick_gelu",
    }
    if variant == "qwen2_5_vl":
        vision = {
            "depth": VISION_DEPTH,
            "hidden_size": VISION_EMBED,
            "out_hidden_size": TEXT_HIDDEN,
            "intermediate_size": VISION_EMBED * VISION_MLP_RATIO,
            "num_heads": VISION_HEADS,
            "in_channels": 3,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
            "hidden_act": "silu",
            "window_size": 56,
            "fullatt_block_indexes": [VISION_DEPTH - 1],
            "tokens_per_second": 2,
        }
    config_class = Qwen2_5_VLConfig if variant == "qwen2_5_vl" else Qwen2VLConfig
    config = config_class(
        text_config={
            "vocab_size": VOCAB_SIZE,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": TEXT_INTERMEDIATE,
            "num_hidden_layers": text.layers,
            "num_attention_heads": TEXT_HEADS,
            "num_key_value_heads": text.kv_heads,
            "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
            "max_window_layers": text.layers,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": MROPE_SECTION},
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": IM_END_ID,
            "dtype": "bfloat16",
        },
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.architectures = [ARCHITECTURES[variant]]
    return config


def checkpoint_shapes(variant: str = "qwen2_vl", text: TextGeometry = TextGeometry()) -> dict[str, tuple[int, ...]]:  # noqa: B008
    """Every tensor name (transformers layout) and shape of the tiny model, from a meta-device instance."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    model_class = Qwen2_5_VLForConditionalGeneration if variant == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    with torch.device("meta"):
        model = model_class(make_config(variant, text))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _tensor_seed(seed: int, name: str, variant: str = "qwen2_vl") -> int:
    tag = "tiny-qwen2-vl" if variant == "qwen2_vl" else f"tiny-{variant}"
    digest = hashlib.sha256(f"{tag}-v{BUILDER_VERSION}:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _init_std(name: str, shape: tuple[int, ...]) -> tuple[str, float]:
    if name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight", "ln_q.weight")):
        return "norm", NORM_JITTER
    if name.endswith(".bias"):
        return "bias", BIAS_STD
    if name.endswith("embed_tokens.weight"):
        return "normal", 1.0
    if name == "lm_head.weight":
        return "normal", LOGIT_STD / math.sqrt(shape[1])
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    gain = 1.0
    if ".language_model." in name:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            gain = QK_GAIN
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            gain = RESIDUAL_GAIN
    elif name.endswith("merger.mlp.2.weight"):
        gain = MERGER_GAIN
    return "normal", gain / math.sqrt(fan_in)


def random_state_dict(seed: int = 0, variant: str = "qwen2_vl") -> dict:
    """Deterministic random bf16 weights, one generator per tensor seeded from ``(seed, name)``."""
    return seeded_random_state(checkpoint_shapes(variant), lambda name: _tensor_seed(seed, name, variant), _init_std)


def seeded_random_state(shapes: Mapping[str, tuple[int, ...]], seed_of: Callable[[str], int],
                        init_of: Callable[[str, tuple[int, ...]], tuple[str, float]]) -> dict:
    """bf16 tensors of ``shapes``, each from its own generator (``seed_of(name)``) at the scale ``init_of(name,
    shape)`` gives (``"norm"``: around 1); the special tokens' ``lm_head`` rows zero (random weights never emit
    them)."""
    import torch

    state = {}
    for name, shape in shapes.items():
        generator = torch.Generator(device="cpu").manual_seed(seed_of(name))
        kind, scale = init_of(name, shape)
        tensor = torch.randn(shape, generator=generator, dtype=torch.float32) * scale
        if kind == "norm":
            tensor += 1.0
        if name == "lm_head.weight":
            tensor[: len(SPECIAL_TOKENS)] = 0.0
        state[name] = tensor.to(torch.bfloat16).contiguous()
    return state


def image_processor_kwargs() -> dict:
    """The tiny models' pixel geometry, for ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor``."""
    return {
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
    }


def load_weights(path: str | Path, variant: str = "qwen2_vl") -> dict:
    """A Qwen2-VL (or Qwen2.5-VL) state dict (transformers names) from a safetensors file, checked against the
    tiny model's names and shapes at the LM geometry it has (``ValueError`` naming what differs)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    check_shapes(path, variant, state, checkpoint_shapes(variant, TextGeometry.of(state)))
    return state


def check_shapes(path: str | Path, variant: str, state: Mapping[str, object],
                 expected: Mapping[str, tuple[int, ...]]) -> None:
    """``ValueError`` naming what differs when ``state``'s tensor names and shapes are not ``expected``."""
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    if shapes != expected:
        missing = sorted(set(expected) - set(shapes))[:5]
        unexpected = sorted(set(shapes) - set(expected))[:5]
        wrong = sorted(n for n in set(shapes) & set(expected) if shapes[n] != expected[n])[:5]
        raise ValueError(f"{path}: not the tiny {variant}'s tensors (missing {missing}, unexpected {unexpected}, "
                         f"other shapes {wrong})")


def build_tiny_qwen2_vl(
    out_dir: str | Path, *, seed: int = 0, variant: str = "qwen2_vl", weights: str | Path | None = None
) -> Path:
    """Write the tiny Qwen2-VL (or Qwen2.5-VL) model: config, weights, tokenizer, processors, chat template.
    ``weights``: a safetensors file of that variant's weights (e.g. the bundled trained ones) instead of the random
    init."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    state = load_weights(weights, variant) if weights is not None else random_state_dict(seed, variant)
    out = Path(out_dir)
    files.start_build(out)
    tokenizer = _hf_tokenizer(train_tokenizer())
    pixels = image_processor_kwargs()
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    make_config(variant, TextGeometry.of(state)).save_pretrained(str(out))
    GenerationConfig(bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID).save_pretrained(
        str(out)
    )
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    files.write_manifest(out, {
        "builder": "vllm_tokcomp.tiny.qwen2_vl_builder",
        "builder_version": BUILDER_VERSION,
        "variant": variant,
        "seed": None if weights is not None else seed,
        "source": None if weights is None else files.sha256(Path(weights)),
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
    })
    return out


def is_complete_model_dir(path: str | Path, variant: str = "qwen2_vl", source: str | None = None) -> bool:
    """A finished build of this builder version and variant, from the weights whose sha256 is ``source``
    (None: the random init)."""
    manifest = files.read_manifest(path) or {}
    builder = manifest.get("builder"), manifest.get("builder_version"), manifest.get("variant", "qwen2_vl")
    expected = ("vllm_tokcomp.tiny.qwen2_vl_builder", BUILDER_VERSION, variant)
    return builder == expected and manifest.get("source") == source


def default_model_dir(variant: str = "qwen2_vl") -> Path:
    """``$TOKCOMP_MODELS_DIR/tiny-qwen2-vl-v1`` or ``tiny-qwen2.5-vl-v1`` (root ``~/.cache/vllm-tokcomp/models``)."""
    return files.models_root() / (MODEL_SUBDIR_2_5 if variant == "qwen2_5_vl" else MODEL_SUBDIR)


def ensure_default_model(variant: str = "qwen2_vl") -> Path:
    """:func:`default_model_dir`, built first (in a temporary sibling renamed into place) if missing."""
    target = default_model_dir(variant)
    return files.build_in_place(
        target, lambda: is_complete_model_dir(target, variant), lambda tmp: build_tiny_qwen2_vl(tmp, variant=variant)
    )


def trained_model_dir(variant: str = "qwen2_vl") -> Path:
    """``$TOKCOMP_MODELS_DIR/tiny-qwen2-vl-vqa-v1`` (``tiny-qwen2.5-vl-vqa-v1``): the tiny model with the bundled
    trained weights."""
    return files.models_root() / TRAINED_MODEL_SUBDIR_OF[variant]


def ensure_trained_model(variant: str = "qwen2_vl") -> Path:
    """Like :func:`ensure_default_model`, with the bundled weights trained on the synthetic VQA task
    (``vllm_tokcomp/assets/tiny_qwen2_vl_vqa.safetensors`` / ``tiny_qwen2_5_vl_vqa.safetensors``, see
    ``lab/tokcomp_lab/train/qwen2_vl.py``); rebuilt when that file changes."""
    weights = TRAINED_WEIGHTS_OF[variant]
    if not weights.is_file():
        raise FileNotFoundError(f"bundled trained weights not found: {weights}")
    target, source = trained_model_dir(variant), files.sha256(weights)
    return files.build_in_place(
        target, lambda: is_complete_model_dir(target, variant, source),
        lambda tmp: build_tiny_qwen2_vl(tmp, variant=variant, weights=weights),
    )


def served_model_dir(variant: str = "qwen2_vl") -> Path:
    """The tiny model that ``tokcomp serve tiny-qwen2-vl`` (``tiny-qwen2.5-vl``) uses (not built here): the trained
    one, or the random-weight one where the trained weights are absent (a stripped install)."""
    return trained_model_dir(variant) if TRAINED_WEIGHTS_OF[variant].is_file() else default_model_dir(variant)


def ensure_served_model(variant: str = "qwen2_vl") -> Path:
    """:func:`served_model_dir`, built first if missing."""
    if TRAINED_WEIGHTS_OF[variant].is_file():
        return ensure_trained_model(variant)
    return ensure_default_model(variant)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_tokcomp.tiny.qwen2_vl_builder",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", help="output directory (default: build/ensure the default model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=VARIANTS, default="qwen2_vl")
    parser.add_argument("--weights", default=None,
                        help="safetensors of trained weights of --variant (transformers names)")
    parser.add_argument("--trained", action="store_true",
                        help="build/ensure the --variant model with the bundled trained weights")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.trained:
        path = ensure_trained_model(args.variant) if args.out_dir is None else build_tiny_qwen2_vl(
            args.out_dir, variant=args.variant, weights=TRAINED_WEIGHTS_OF[args.variant])
    elif args.out_dir is None:
        path = ensure_default_model(args.variant)
    else:
        path = build_tiny_qwen2_vl(args.out_dir, seed=args.seed, variant=args.variant, weights=args.weights)
    print(f"{path} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
