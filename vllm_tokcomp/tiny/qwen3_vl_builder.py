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

**The trained tiny Qwen3-VL** (``--trained``, ``tokcomp serve tiny-qwen3-vl-vqa``): the bundled weights
``vllm_tokcomp/assets/tiny_qwen3_vl_vqa.safetensors``, trained on the synthetic VQA task from the trained tiny Qwen2-VL
(``lab/tokcomp_lab/train/qwen2_vl.py --variant qwen3_vl``). Its geometry is the one that transplant needs
(:data:`TRANSPLANTED`: patch 14, two tower blocks with quick-GELU, the LM's 8 layers), read back from the weights
and their metadata (:meth:`Geometry.of`); DeepStack, interleaved M-RoPE and the Qwen3 LM are the family's.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
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
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB_SIZE,
    TextGeometry,
    _hf_tokenizer,
    check_shapes,
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
_ASSETS = Path(__file__).resolve().parents[1] / "assets"
TRAINED_WEIGHTS = _ASSETS / "tiny_qwen3_vl_vqa.safetensors"
TRAINED_MODEL_SUBDIR = "tiny-qwen3-vl-vqa-v1"
VISION_ACT_KEY = "vision_hidden_act"  # safetensors metadata: the tower's activation (shapes cannot tell it)


@dataclass(frozen=True)
class Geometry:
    """The sizes a trained model may change; the default is the random model's (the family's patch 16)."""

    patch_size: int = PATCH_SIZE
    vision_depth: int = VISION_DEPTH
    vision_act: str = "gelu_pytorch_tanh"
    text: TextGeometry = TextGeometry()

    @property
    def factor(self) -> int:
        """Pixels per merged token side."""
        return self.patch_size * MERGE_SIZE

    @classmethod
    def of(cls, state: Mapping[str, object], metadata: Mapping[str, str] | None = None) -> Geometry:
        """Read back from a state dict (transformers names) and its safetensors metadata."""
        conv = state.get("model.visual.patch_embed.proj.weight")
        blocks = {int(key.split(".")[3]) for key in state if key.startswith("model.visual.blocks.")}
        if conv is None or not blocks:
            raise ValueError("not a Qwen3-VL state dict (transformers names): no vision tower")
        return cls(patch_size=tuple(conv.shape)[-1], vision_depth=max(blocks) + 1,
                   vision_act=(metadata or {}).get(VISION_ACT_KEY, cls.vision_act), text=TextGeometry.of(state))

    def metadata(self) -> dict[str, str]:
        """What a safetensors header must carry besides the tensors: the tower's activation where it is not the
        default (safetensors may write several metadata keys in any order; one key keeps builds byte-identical)."""
        return {} if self.vision_act == Geometry.vision_act else {VISION_ACT_KEY: self.vision_act}


# what the transplant from the trained tiny Qwen2-VL needs: its tower (patch 14, 2 quick-GELU blocks), its LM's size
TRANSPLANTED = Geometry(patch_size=14, vision_depth=2, vision_act="quick_gelu", text=TextGeometry(layers=8, kv_heads=4))


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def make_config(variant: str = "qwen3_vl", geometry: Geometry = Geometry()):  # noqa: ANN201, B008 - Qwen3VLConfig
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
            "num_hidden_layers": geometry.text.layers,
            "num_attention_heads": TEXT_HEADS,
            "num_key_value_heads": geometry.text.kv_heads,
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
            "depth": geometry.vision_depth,
            "hidden_size": VISION_HIDDEN,
            "hidden_act": geometry.vision_act,
            "intermediate_size": VISION_INTERMEDIATE,
            "num_heads": VISION_HEADS,
            "in_channels": 3,
            "patch_size": geometry.patch_size,
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


def checkpoint_shapes(variant: str = "qwen3_vl", geometry: Geometry = Geometry()) -> dict[str, tuple[int, ...]]:  # noqa: B008
    """Every tensor name (transformers layout) and shape of the tiny model, from a meta-device instance."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    model_class = Qwen3VLMoeForConditionalGeneration if variant == "qwen3_vl_moe" else Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        model = model_class(make_config(variant, geometry))
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


def image_processor_kwargs(geometry: Geometry = Geometry()) -> dict:  # noqa: B008
    """The tiny model's pixel geometry, for ``Qwen2VLImageProcessor`` / ``Qwen3VLVideoProcessor``: 8x8 to 16x16
    merged tokens per image."""
    return {
        "size": {"shortest_edge": 8 * 8 * geometry.factor**2, "longest_edge": 16 * 16 * geometry.factor**2},
        "patch_size": geometry.patch_size,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
    }


def load_weights(path: str | Path, variant: str = "qwen3_vl") -> tuple[dict, Geometry]:
    """A Qwen3-VL state dict (transformers names) from a safetensors file and the geometry it has, checked against
    the tiny model's names and shapes at that geometry (``ValueError`` naming what differs)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        geometry = Geometry.of(state, handle.metadata())
    check_shapes(path, variant, state, checkpoint_shapes(variant, geometry))
    return state, geometry


def build_tiny_qwen3_vl(out_dir: str | Path, *, seed: int = 0, variant: str = "qwen3_vl",
                        weights: str | Path | None = None) -> Path:
    """Write the tiny Qwen3-VL (or Qwen3-VL-MoE) model: config, weights, tokenizer, processors, chat template.
    ``weights``: a safetensors file of trained weights (e.g. the bundled ones) instead of the random init; the
    model takes their geometry."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    _check_variant(variant)
    if weights is not None:
        state, geometry = load_weights(weights, variant)
    else:
        state, geometry = random_state_dict(seed, variant), Geometry()
    out = Path(out_dir)
    files.start_build(out)
    tokenizer = _hf_tokenizer(train_tokenizer())
    pixels = image_processor_kwargs(geometry)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen3VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    make_config(variant, geometry).save_pretrained(str(out))
    GenerationConfig(bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID).save_pretrained(
        str(out)
    )
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", **geometry.metadata()})
    files.write_manifest(out, {
        "builder": "vllm_tokcomp.tiny.qwen3_vl_builder",
        "builder_version": BUILDER_VERSION,
        "variant": variant,
        "seed": None if weights is not None else seed,
        "source": None if weights is None else files.sha256(Path(weights)),
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
    })
    return out


def is_complete_model_dir(path: str | Path, variant: str = "qwen3_vl", source: str | None = None) -> bool:
    """A finished build of this builder version and variant, from the weights whose sha256 is ``source``
    (None: the random init)."""
    manifest = files.read_manifest(path) or {}
    found = manifest.get("builder"), manifest.get("builder_version"), manifest.get("variant")
    return (found == ("vllm_tokcomp.tiny.qwen3_vl_builder", BUILDER_VERSION, variant)
            and manifest.get("source") == source)


def default_model_dir(variant: str = "qwen3_vl") -> Path:
    """``$TOKCOMP_MODELS_DIR/tiny-qwen3-vl-v1`` or ``tiny-qwen3-vl-moe-v1`` (root ``~/.cache/vllm-tokcomp/models``)."""
    _check_variant(variant)
    return files.models_root() / MODEL_SUBDIRS[variant]


def ensure_default_model(variant: str = "qwen3_vl") -> Path:
    """:func:`default_model_dir`, built first (in a temporary sibling renamed into place) if missing."""
    target = default_model_dir(variant)
    return files.build_in_place(target, lambda: is_complete_model_dir(target, variant),
                                lambda tmp: build_tiny_qwen3_vl(tmp, variant=variant))


def trained_model_dir() -> Path:
    """``$TOKCOMP_MODELS_DIR/tiny-qwen3-vl-vqa-v1``: the tiny Qwen3-VL with the bundled trained weights."""
    return files.models_root() / TRAINED_MODEL_SUBDIR


def ensure_trained_model() -> Path:
    """:func:`trained_model_dir`, built first if missing; rebuilt when the bundled weights change."""
    if not TRAINED_WEIGHTS.is_file():
        raise FileNotFoundError(f"bundled trained weights not found: {TRAINED_WEIGHTS}")
    target, source = trained_model_dir(), files.sha256(TRAINED_WEIGHTS)
    return files.build_in_place(target, lambda: is_complete_model_dir(target, "qwen3_vl", source),
                                lambda tmp: build_tiny_qwen3_vl(tmp, weights=TRAINED_WEIGHTS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_tokcomp.tiny.qwen3_vl_builder",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", help="output directory (default: build/ensure the default model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=VARIANTS, default="qwen3_vl")
    parser.add_argument("--weights", default=None, help="safetensors of trained weights (transformers names)")
    parser.add_argument("--trained", action="store_true",
                        help="build/ensure the model with the bundled trained weights")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.trained:
        path = ensure_trained_model() if args.out_dir is None else build_tiny_qwen3_vl(args.out_dir,
                                                                                         weights=TRAINED_WEIGHTS)
    elif args.out_dir is None:
        path = ensure_default_model(args.variant)
    else:
        path = build_tiny_qwen3_vl(args.out_dir, seed=args.seed, variant=args.variant, weights=args.weights)
    print(f"{path} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
