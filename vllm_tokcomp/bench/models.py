"""Model shapes for the benchmarks, written locally (nothing is downloaded).

* ``tiny``: the bundled tiny LLaVA (``vllm_tokcomp.tiny.llava_builder``), real random weights. CI smoke.
* ``tiny-qwen2-vl`` / ``tiny-qwen2.5-vl``: the bundled tiny Qwen builders (``vllm_tokcomp.tiny.qwen2_vl_builder``);
  a 336 x 336 image is 144 LM tokens there. Only the fixed-layout methods are served on Qwen.
* ``llava-proportioned``: a CPU-sized LLaVA-1.5 whose vision encoder costs about 4 % of the
  LM's prefill FLOPs for 576 + 64 tokens, as in LLaVA-1.5-7B (CLIP ViT-L/14-336 vs Vicuna-7B:
  4.6 % by :func:`flops`). Widths keep LLaVA's 1 : 4 vision : LM ratio, every head is 64 wide.
  Random weights from vLLM's dummy loader (``load_format="dummy"``).
* ``llava-1.5-7b``: the real LLaVA-1.5-7B architecture (``llava-hf/llava-1.5-7b-hf`` config
  values), dummy weights, for GPU runs (about 14 GB in bf16).
* ``clip-l-encoder``: the full CLIP ViT-L/14-336 tower (24 layers x 1024) in front of a small LM
  (4 x 512): an encoder-heavy model to measure what happens *inside the vision tower* (MustDrop's
  stage-1 merge after layer 0). Its weights are written with transformers' own random init
  (normal, CLIP's scales), not vLLM's dummy loader: the merge is content-dependent, and with the
  dummy loader's near-zero uniform weights every patch's features look alike after layer 0, so every
  window would merge and the saving would be overstated. About 0.7 GB in bf16.

The two written models reuse the tiny model's tokenizer, chat template and CLIP image
processor (336 px, patch 14, so 576 image tokens). The 7B config keeps its 32064-row vocab;
the tokenizer has 2048 entries, all ids below that, so the extra rows are simply never used,
and ``image_token_index`` is the tiny tokenizer's ``<image>`` (4) instead of llava-hf's 32000.
Neither changes the cost of a forward pass.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_tokcomp.tiny.llava_builder import default_model_dir, ensure_default_model

MODEL_PRESETS = ("tiny", "llava-proportioned", "llava-1.5-7b", "clip-l-encoder", "tiny-qwen2-vl", "tiny-qwen2.5-vl",
                 "qwen2.5-vl-proportioned", "qwen2.5-vl-7b")
QWEN_PRESETS = {"tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl"}  # the bundled tiny Qwen builders
RANDOM_INIT_PRESETS = frozenset({"clip-l-encoder"})  # weights written from transformers' init, see above
SHAPES_VERSION = 1


@dataclass(frozen=True)
class Shape:
    vision_hidden: int
    vision_layers: int  # as in the config; vLLM instantiates up to vision_feature_layer (-2)
    vision_heads: int
    vision_intermediate: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6

    @property
    def vision_layers_used(self) -> int:
        return self.vision_layers - 1  # vision_feature_layer = -2


SHAPES: dict[str, Shape] = {
    "tiny": Shape(64, 3, 2, 256, 256, 2, 4, 4, 512, 2048),
    "llava-proportioned": Shape(256, 5, 4, 1024, 1024, 8, 16, 16, 2816, 2048),
    "llava-1.5-7b": Shape(1024, 24, 16, 4096, 4096, 32, 32, 32, 11008, 32064, rms_norm_eps=1e-5),
    "clip-l-encoder": Shape(1024, 24, 16, 4096, 512, 4, 8, 8, 1408, 2048),
}
IMAGE_SIZE, PATCH_SIZE = 336, 14
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2


@dataclass(frozen=True)
class QwenShape:
    """A Qwen2.5-VL geometry (window-attention tower, 2x2 merger, GQA LM) and the benchmark image it sees."""

    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    fullatt_blocks: tuple[int, ...]
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int
    image_size: int  # side of the benchmark's square image (px)
    window_size: int = 112  # px: 4 x 4 merged tokens, as in Qwen2.5-VL
    max_position_embeddings: int = 32768


QWEN_SHAPES: dict[str, QwenShape] = {
    # Qwen2.5-VL-7B's proportions at CPU size (encoder 38 % of the LM prefill FLOPs at 1024 + 64 tokens, the 7B's 39 %);
    # an 896 px image is 32 x 32 = 1024 LM tokens, a typical Qwen2.5-VL photo.
    "qwen2.5-vl-proportioned": QwenShape(320, 8, 5, 856, (3, 7), 1024, 8, 16, 2, 5504, 2048, image_size=896),
    # Qwen/Qwen2.5-VL-7B-Instruct's config values (dummy weights, GPU runs)
    "qwen2.5-vl-7b": QwenShape(1280, 32, 16, 3420, (7, 15, 23, 31), 3584, 28, 28, 4, 18944, 152064, image_size=896),
}


def qwen_flops(shape: QwenShape, text_tokens: int = 64, image_tokens: int = 1024) -> dict:
    """Forward FLOPs (2 per multiply-add) of one image's Qwen2.5-VL encoder pass and of the LM prefill: the tower
    on 4 patches per LM token (window attention over ``window_size``, full attention in ``fullatt_blocks``), the
    merger, then the LM over ``text + image`` tokens (as :func:`flops`)."""
    patches = 4 * image_tokens
    d, f = shape.vision_hidden, shape.vision_intermediate
    window = (shape.window_size // PATCH_SIZE) ** 2
    vision = 2 * patches * 3 * 2 * PATCH_SIZE**2 * d  # the Conv3d patch embedding (2 frames)
    for layer in range(shape.vision_layers):
        span = patches if layer in shape.fullatt_blocks else min(window, patches)
        vision += 2 * patches * 4 * d * d + 2 * patches * 3 * d * f + 2 * 2 * patches * span * d
    merger = 2 * image_tokens * (4 * d * 4 * d + 4 * d * shape.text_hidden)
    return _flops_table(vision, merger, _lm_prefill_flops(shape, text_tokens + image_tokens), text_tokens,
                        image_tokens)


def flops(shape: Shape, text_tokens: int = 64, image_tokens: int = NUM_PATCHES) -> dict:
    """Forward FLOPs (2 per multiply-add) of one image's encoder pass and of the LM prefill.

    Vision: patch embedding, the instantiated layers on 1 + 576 tokens (QKV/O, MLP, the two
    attention matmuls) and the projector on 576 rows. LM prefill over ``text + image`` tokens:
    projections, SwiGLU MLP, causal attention matmuls, and the LM head for the last position.
    """
    n = NUM_PATCHES + 1
    d, f = shape.vision_hidden, shape.vision_intermediate
    per_layer = 2 * n * 4 * d * d + 2 * n * 2 * d * f + 2 * 2 * n * n * d
    vision = shape.vision_layers_used * per_layer + 2 * NUM_PATCHES * 3 * PATCH_SIZE**2 * d
    projector = 2 * NUM_PATCHES * (d * shape.text_hidden + shape.text_hidden**2)
    return _flops_table(vision, projector, _lm_prefill_flops(shape, text_tokens + image_tokens), text_tokens,
                        image_tokens)


def _lm_prefill_flops(shape: Shape | QwenShape, tokens: int) -> float:
    """The LM's prefill over ``tokens``: projections (GQA), SwiGLU MLP, causal attention, the last position's head."""
    h, t = shape.text_hidden, tokens
    hd = h // shape.text_heads
    q_o = 2 * t * 2 * h * (shape.text_heads * hd)
    kv = 2 * t * 2 * h * (shape.text_kv_heads * hd)
    mlp = 2 * t * 3 * h * shape.text_intermediate
    attn = 2 * 2 * (t * (t + 1) / 2) * shape.text_heads * hd
    return shape.text_layers * (q_o + kv + mlp + attn) + 2 * h * shape.vocab_size


def _flops_table(vision: float, projector: float, lm: float, text_tokens: int, image_tokens: int) -> dict:
    return {
        "vision_tower": vision,
        "projector": projector,
        "encoder": vision + projector,
        "lm_prefill": lm,
        "encoder_over_lm_prefill": (vision + projector) / lm,
        "text_tokens": text_tokens,
        "image_tokens": image_tokens,
    }


def _models_root() -> Path:
    return default_model_dir().parent


def _write_bench_model(name: str, shape: Shape | QwenShape, donor: Callable[[], Path],
                       reshape: Callable[[dict], None], finish: Callable[[Path], None] | None = None) -> Path:
    """``bench-<name>-v<SHAPES_VERSION>`` next to the tiny models: the ``donor`` model's files (tokenizer, chat
    template, processor) without its weights, its ``config.json`` as edited in place by ``reshape(config)``, then
    ``finish(folder)`` for whatever else the preset needs; built in a temporary sibling renamed into place, reused
    while its marker records the same ``shape``."""
    target = _models_root() / f"bench-{name}-v{SHAPES_VERSION}"
    marker = target / "tokcomp_bench_shape.json"
    expected = {"preset": name, "shape": asdict(shape), "version": SHAPES_VERSION}
    if marker.is_file() and json.loads(marker.read_text()) == expected:
        return target
    source = donor()
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in source.iterdir():
        if item.name not in ("model.safetensors", "config.json") and not item.name.startswith("tokcomp_"):
            shutil.copy2(item, tmp / item.name)
    config = json.loads((source / "config.json").read_text())
    reshape(config)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if finish is not None:
        finish(tmp)
    (tmp / marker.name).write_text(json.dumps(expected, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _write_model(name: str, shape: Shape) -> Path:
    def reshape(config: dict) -> None:
        vision, text = config["vision_config"], config["text_config"]
        vision.update(
            hidden_size=shape.vision_hidden,
            projection_dim=shape.vision_hidden,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.vision_heads,
            intermediate_size=shape.vision_intermediate,
        )
        text.update(
            hidden_size=shape.text_hidden,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=shape.text_heads,
            num_key_value_heads=shape.text_kv_heads,
            head_dim=shape.text_hidden // shape.text_heads,
            intermediate_size=shape.text_intermediate,
            vocab_size=shape.vocab_size,
            max_position_embeddings=shape.max_position_embeddings,
            rms_norm_eps=shape.rms_norm_eps,
        )

    finish = _write_random_init_weights if name in RANDOM_INIT_PRESETS else None
    return _write_bench_model(name, shape, ensure_default_model, reshape, finish)


def _write_random_init_weights(model_dir: Path) -> None:
    """``model.safetensors`` from transformers' random init of the config in ``model_dir`` (bf16, llava-hf names)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vllm_tokcomp.tiny.llava_builder import normalize_checkpoint_key

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(model_dir))
    state = {normalize_checkpoint_key(k): v.detach().to(torch.bfloat16).contiguous()
             for k, v in model.state_dict().items() if "position_ids" not in k}
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def _write_qwen_model(name: str, shape: QwenShape) -> Path:
    """A Qwen2.5-VL model folder of ``shape`` (config and processor only: vLLM's dummy loader makes the weights),
    with the bundled tiny Qwen2.5-VL's tokenizer, chat template and processor, ``max_pixels`` raised to hold the
    benchmark image whole."""
    from vllm_tokcomp.tiny import qwen2_vl_builder as qwen2_vl

    def reshape(config: dict) -> None:
        config["vision_config"].update(
            depth=shape.vision_layers, hidden_size=shape.vision_hidden, num_heads=shape.vision_heads,
            intermediate_size=shape.vision_intermediate, fullatt_block_indexes=list(shape.fullatt_blocks),
            window_size=shape.window_size, out_hidden_size=shape.text_hidden,
        )
        config["text_config"].update(
            hidden_size=shape.text_hidden, num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
            num_key_value_heads=shape.text_kv_heads, intermediate_size=shape.text_intermediate,
            vocab_size=shape.vocab_size, max_position_embeddings=shape.max_position_embeddings,
            max_window_layers=shape.text_layers, layer_types=["full_attention"] * shape.text_layers,
        )
        head_dim = shape.text_hidden // shape.text_heads
        # M-RoPE's (t, h, w) sections in Qwen2.5-VL's 1 : 1.5 : 1.5 split of head_dim / 2 rotary pairs
        config["text_config"]["rope_parameters"]["mrope_section"] = [head_dim // 8, 3 * head_dim // 16,
                                                                     3 * head_dim // 16]

    def raise_max_pixels(folder: Path) -> None:
        processor_path = folder / "processor_config.json"
        processor = json.loads(processor_path.read_text())
        merged = qwen2_vl.PATCH_SIZE * qwen2_vl.MERGE_SIZE
        for key in ("image_processor", "video_processor"):
            processor[key]["size"]["longest_edge"] = max(processor[key]["size"]["longest_edge"],
                                                         (shape.image_size // merged * merged) ** 2)
        processor_path.write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")

    return _write_bench_model(name, shape, lambda: qwen2_vl.ensure_default_model("qwen2_5_vl"), reshape,
                              raise_max_pixels)


def resolve_model(preset_or_path: str) -> tuple[Path, str, dict]:
    """(model directory, load_format, info) for a preset name or a model directory."""
    if preset_or_path == "tiny":
        path, load_format = ensure_default_model(), "auto"
    elif preset_or_path in QWEN_PRESETS:
        from vllm_tokcomp.tiny import qwen2_vl_builder as qwen2_vl

        path, load_format = qwen2_vl.ensure_default_model(QWEN_PRESETS[preset_or_path]), "auto"
    elif preset_or_path in QWEN_SHAPES:
        path, load_format = _write_qwen_model(preset_or_path, QWEN_SHAPES[preset_or_path]), "dummy"
    elif preset_or_path in SHAPES:
        path = _write_model(preset_or_path, SHAPES[preset_or_path])
        load_format = "auto" if preset_or_path in RANDOM_INIT_PRESETS else "dummy"
    else:
        path, load_format = Path(preset_or_path), "auto"
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model: {preset_or_path!r} is neither a preset ({', '.join(MODEL_PRESETS)}) "
                             "nor a model directory")
    info: dict = {"preset": preset_or_path if preset_or_path in MODEL_PRESETS else None, "path": str(path),
                  "load_format": load_format}
    qwen_shape = QWEN_SHAPES.get(preset_or_path)
    info["image_size"] = qwen_shape.image_size if qwen_shape else IMAGE_SIZE
    info["image_tokens"] = full_image_tokens(path, info["image_size"])
    info["family"] = "qwen2_vl" if is_qwen_vl(path) else "llava"
    if qwen_shape is not None:
        info["shape"] = asdict(qwen_shape)
        info["flops_per_request"] = qwen_flops(qwen_shape, image_tokens=info["image_tokens"])
    elif (shape := SHAPES.get(preset_or_path) or shape_from_config(path)) is not None:
        info["shape"] = asdict(shape)
        info["flops_per_request"] = flops(shape)
    return path, load_format, info


def is_qwen_vl(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("model_type") in ("qwen2_vl", "qwen2_5_vl")


def full_image_tokens(path: Path, image_size: int = IMAGE_SIZE) -> int:
    """LM tokens of one uncompressed ``image_size`` x ``image_size`` benchmark image for this model:
    LLaVA-1.5 ``(image_size / patch)^2``; Qwen2-VL from its image processor (grid / merge^2)."""
    if is_qwen_vl(path):
        from PIL import Image
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(path))
        grid = processor.image_processor(Image.new("RGB", (image_size, image_size)), return_tensors="pt")
        merge = processor.image_processor.merge_size
        return int(grid["image_grid_thw"][0].prod()) // (merge * merge)
    vision = json.loads((path / "config.json").read_text())["vision_config"]
    return (vision.get("image_size", IMAGE_SIZE) // vision.get("patch_size", PATCH_SIZE)) ** 2


def image_prompt(path: Path, question: str) -> str:
    """The single-image prompt for ``question``: LLaVA-1.5's (vicuna_v1), or the model's own chat template."""
    if not is_qwen_vl(path):
        from vllm_tokcomp.bench.common import llava_prompt

        return llava_prompt(question)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def mm_limits(path: Path) -> dict[str, int]:
    """``limit_mm_per_prompt``: one image (and no video profiling for video-capable Qwen models)."""
    return {"image": 1, "video": 0} if is_qwen_vl(path) else {"image": 1}


def shape_from_config(path: Path) -> Shape | None:
    try:
        config = json.loads((path / "config.json").read_text())
        v, t = config["vision_config"], config["text_config"]
        return Shape(
            v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"], v["intermediate_size"],
            t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"],
            t.get("num_key_value_heads", t["num_attention_heads"]), t["intermediate_size"], t["vocab_size"],
        )
    except (OSError, KeyError, ValueError):
        return None
