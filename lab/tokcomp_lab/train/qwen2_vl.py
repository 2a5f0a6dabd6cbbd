"""Train the tiny Qwen2-VL on the synthetic VQA task (docs/dataset.md), starting from the trained tiny LLaVA.

``PYTHONPATH=lab python -m tokcomp_lab.train.qwen2_vl OUT [--distill-steps N] [--qa-steps N] ...``

Training a Qwen-shaped model from scratch on a CPU would repeat many hours of LLaVA training, so the Qwen
model starts from the bundled LLaVA's weights (:func:`transplant`), which fit the two architectures' shared
parts exactly:

* the LM: both are Llama-style (Qwen2 adds q/k/v biases, zero here); token rows are mapped by token string
  (both BPE tokenizers are trained on the same corpus, only their special tokens differ; ``</s>`` becomes
  ``<|im_end|>``, ``<image>`` becomes ``<|image_pad|>``);
* the tower's blocks up to LLaVA's feature layer (layer -2), the Conv2d patch embedding split over Qwen's two
  temporal slices (an image is its own frame twice, so the sum is the same);
* the merger starts as LLaVA's projector applied to the mean of each 2x2 window.

What has no counterpart is learned: the Qwen tower has no CLS token, no absolute position table and no
pre-layernorm (it has 2-D rotary attention), and the LM reads the image at M-RoPE positions. Stage 1
(``distill``) trains the tower and merger to give, per merged token, the 2x2 mean of what the LLaVA model's
projector gives for the same four patches (MSE, the LLaVA model frozen). Stage 2 (``qa``) trains the whole
model on the question answering task in the Qwen chat format (several questions per image as one multi-turn
conversation, loss on the answers and their ``<|im_end|>``), through transformers' own Qwen2-VL forward
(M-RoPE positions from ``get_rope_index``) with pixels from the real ``Qwen2VLImageProcessor``.

``--variant qwen2_5_vl`` trains the tiny Qwen2.5-VL the same way, starting from the trained tiny Qwen2-VL
(:func:`transplant_to_qwen2_5`: the same LM, the tower rewritten into Qwen2.5's RMSNorm/SwiGLU form exactly);
its stage 1 distils the Qwen2-VL's image tokens, to learn the window attention of the Qwen2.5 tower's first
block, and stage 2 is the same QA training through transformers' Qwen2.5-VL forward.

``--variant qwen3_vl`` trains the tiny Qwen3-VL from the trained tiny Qwen2-VL (:func:`transplant_to_qwen3`): the
tower and merger are the Qwen2-VL's exactly (patch 14, quick-GELU blocks, the learned position table at zero), the
DeepStack mergers start silent (their output layer zero), and the LM is the Qwen2-VL's without its q/k/v biases and
with Qwen3's per-head q/k RMSNorm, whose weights are set to the typical norms the Qwen2-VL's queries and keys have
(:func:`qk_norm_scales`) so that attention starts near its old temperature. What QA training has to repair: the
dropped biases, the normalised queries and keys, and interleaved M-RoPE (the image's three position axes rotate
other frequencies). No distillation is needed (``--distill-steps 0``).

``--video-share F`` makes that share of the QA steps train on moving-shape clips instead (``data.generate
--videos``' training stream, ``--video-frames`` frames each through the real ``Qwen2VLVideoProcessor``, several
questions per clip as one conversation); validation then also checks ``--eval-clips`` validation clips
(``qa-val-video`` in the log).

``OUT/ckpt.pt`` is written every ``--save-every`` steps and a run resumes from it; ``OUT/model.safetensors``
(bf16, transformers names) is the result: ``python -m vllm_tokcomp.tiny.qwen2_vl_builder DIR [--variant V] --weights
OUT/model.safetensors`` turns it into a model folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokcomp_lab.train.llava import (
    dense_questions,
    first_answers_correct,
    lr_at,
    padded_conversations,
    save,
    val_question,
)
from vllm_tokcomp.data.generate import clip_rng, scene_rng
from vllm_tokcomp.data.synth import make_scene, render_scene
from vllm_tokcomp.data.video import make_clip, make_video_questions, render_clip
from vllm_tokcomp.tiny import llava_builder as tiny_llava
from vllm_tokcomp.tiny import qwen2_vl_builder as tiny
from vllm_tokcomp.tiny import qwen3_vl_builder as tiny3

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
MERGED_SIDE = 12  # a 336 x 336 image: 24 x 24 patches, 12 x 12 merged tokens
IMAGE_TOKENS = MERGED_SIDE * MERGED_SIDE


# ----------------------------------------------------------------------------- transplant
def token_row_map(llava_vocab: dict[str, int], qwen_vocab: dict[str, int]) -> dict[int, int]:
    """Qwen token id -> LLaVA token id for every Qwen token with a counterpart (ordinary tokens by string, and
    the end-of-turn and image tokens by role)."""
    rows = {qwen_vocab[t]: llava_vocab[t] for t in qwen_vocab if t in llava_vocab}
    rows[tiny.IM_END_ID] = tiny_llava.EOS_TOKEN_ID
    rows[tiny.IMAGE_TOKEN_ID] = tiny_llava.IMAGE_TOKEN_ID
    ordinary = len(qwen_vocab) - len(tiny.SPECIAL_TOKENS)
    if len(rows) < ordinary:
        raise ValueError(f"only {len(rows)} of {ordinary} ordinary Qwen tokens exist in the LLaVA vocabulary")
    return rows


def transplant(llava: dict[str, torch.Tensor], rows: dict[int, int]) -> dict[str, torch.Tensor]:
    """Qwen2-VL weights (transformers names, fp32) from trained tiny LLaVA weights (llava-hf names)."""
    llava = {k: v.float() for k, v in llava.items()}
    geometry = tiny_llava.Geometry.of(llava)
    text = tiny.TextGeometry(layers=geometry.text_layers, kv_heads=tiny_llava.TEXT_HEADS)
    shapes = tiny.checkpoint_shapes("qwen2_vl", text)
    if geometry.vision_hidden != tiny.VISION_EMBED or geometry.vision_layers - 1 != tiny.VISION_DEPTH:
        raise ValueError(f"the LLaVA tower ({geometry}) does not match the tiny Qwen tower "
                         f"({tiny.VISION_EMBED} wide, {tiny.VISION_DEPTH} blocks to the feature layer)")
    out: dict[str, torch.Tensor] = {}
    # LM
    for key, value in llava.items():
        if key.startswith("language_model.model.layers."):
            out["model.language_model." + key[len("language_model.model."):]] = value
    out["model.language_model.norm.weight"] = llava["language_model.model.norm.weight"]
    generator = torch.Generator().manual_seed(0)
    for name, donor in (("model.language_model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
                        ("lm_head.weight", "language_model.lm_head.weight")):
        source = llava[donor]
        # tokens with no counterpart (<|im_start|>, ...): small new embeddings, never predicted at first
        table = (torch.zeros(shapes[name]) if name == "lm_head.weight"
                 else torch.randn(shapes[name], generator=generator) * 0.02)
        for qwen_id, llava_id in rows.items():
            table[qwen_id] = source[llava_id]
        out[name] = table
    for i in range(text.layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            name = f"model.language_model.layers.{i}.self_attn.{proj}.bias"
            out[name] = torch.zeros(shapes[name])
    # tower
    vis = "vision_tower.vision_model."
    conv = llava[vis + "embeddings.patch_embedding.weight"]
    out["model.visual.patch_embed.proj.weight"] = torch.stack([conv / 2, conv / 2], dim=2)
    for i in range(tiny.VISION_DEPTH):
        src, dst = f"{vis}encoder.layers.{i}.", f"model.visual.blocks.{i}."
        for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                     ("mlp.fc2", "mlp.fc2"), ("self_attn.out_proj", "attn.proj")):
            out[dst + b + ".weight"], out[dst + b + ".bias"] = llava[src + a + ".weight"], llava[src + a + ".bias"]
        for part in ("weight", "bias"):
            out[dst + "attn.qkv." + part] = torch.cat([llava[f"{src}self_attn.{p}_proj.{part}"] for p in "qkv"])
    # merger: LLaVA's projector on the mean of the 2x2 window (its four patches are concatenated)
    out["model.visual.merger.ln_q.weight"] = torch.ones(tiny.VISION_EMBED)
    out["model.visual.merger.ln_q.bias"] = torch.zeros(tiny.VISION_EMBED)
    w1 = llava["multi_modal_projector.linear_1.weight"]
    out["model.visual.merger.mlp.0.weight"] = torch.cat([w1] * (tiny.MERGE_SIZE**2), dim=1) / tiny.MERGE_SIZE**2
    out["model.visual.merger.mlp.0.bias"] = llava["multi_modal_projector.linear_1.bias"]
    out["model.visual.merger.mlp.2.weight"] = llava["multi_modal_projector.linear_2.weight"]
    out["model.visual.merger.mlp.2.bias"] = llava["multi_modal_projector.linear_2.bias"]
    got = {k: tuple(v.shape) for k, v in out.items()}
    if got != shapes:
        raise RuntimeError(f"transplant mismatch: {sorted(set(got) ^ set(shapes))[:5]}")
    return out


QUICK_GELU_SLOPE = 1.702  # quick_gelu(u) = u * sigmoid(1.702 u) = silu(1.702 u) / 1.702


def transplant_to_qwen2_5(qwen2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen2.5-VL weights (transformers names, fp32) from tiny Qwen2-VL weights.

    The LM is the same network. The tower is rewritten so that, were every block full attention, it would give
    the Qwen2-VL tower's output exactly: every write to the residual stream (the patch embedding, each
    attention and MLP output) is projected onto zero-mean vectors, so a LayerNorm of the stream equals an RMSNorm
    with the same weight, and each LayerNorm's bias moves into the bias of the layer it feeds; the quick-GELU MLP
    becomes a SwiGLU one with ``gate = 1.702 fc1``, ``up = 1/1.702`` (a constant) and ``down = fc2``. What is left
    to learn is the Qwen2.5 tower's window attention in its first block (``distill`` stage)."""
    state = {k: v.float() for k, v in qwen2.items()}
    text = tiny.TextGeometry.of(state)
    shapes = tiny.checkpoint_shapes("qwen2_5_vl", text)
    out = {k: v for k, v in state.items() if not k.startswith("model.visual.")}

    def centred(weight: torch.Tensor) -> torch.Tensor:  # outputs of this layer have zero mean over channels
        return weight - weight.mean(dim=0, keepdim=True)

    out["model.visual.patch_embed.proj.weight"] = centred(state["model.visual.patch_embed.proj.weight"])
    for i in range(tiny.VISION_DEPTH):
        b = f"model.visual.blocks.{i}."
        out[b + "norm1.weight"] = state[b + "norm1.weight"]
        out[b + "attn.qkv.weight"] = state[b + "attn.qkv.weight"]
        out[b + "attn.qkv.bias"] = state[b + "attn.qkv.bias"] + state[b + "attn.qkv.weight"] @ state[b + "norm1.bias"]
        out[b + "attn.proj.weight"] = centred(state[b + "attn.proj.weight"])
        out[b + "attn.proj.bias"] = centred(state[b + "attn.proj.bias"])
        out[b + "norm2.weight"] = state[b + "norm2.weight"]
        fc1_bias = state[b + "mlp.fc1.bias"] + state[b + "mlp.fc1.weight"] @ state[b + "norm2.bias"]
        out[b + "mlp.gate_proj.weight"] = QUICK_GELU_SLOPE * state[b + "mlp.fc1.weight"]
        out[b + "mlp.gate_proj.bias"] = QUICK_GELU_SLOPE * fc1_bias
        out[b + "mlp.up_proj.weight"] = torch.zeros_like(state[b + "mlp.fc1.weight"])
        out[b + "mlp.up_proj.bias"] = torch.full_like(fc1_bias, 1 / QUICK_GELU_SLOPE)
        out[b + "mlp.down_proj.weight"] = centred(state[b + "mlp.fc2.weight"])
        out[b + "mlp.down_proj.bias"] = centred(state[b + "mlp.fc2.bias"])
    m = "model.visual.merger."
    out[m + "ln_q.weight"] = state[m + "ln_q.weight"]
    # ln_q normalises each patch, then the 2x2 window's four patches are concatenated into mlp.0's input
    tiled_bias = state[m + "ln_q.bias"].repeat(tiny.MERGE_SIZE**2)
    out[m + "mlp.0.weight"] = state[m + "mlp.0.weight"]
    out[m + "mlp.0.bias"] = state[m + "mlp.0.bias"] + state[m + "mlp.0.weight"] @ tiled_bias
    for name in ("mlp.2.weight", "mlp.2.bias"):
        out[m + name] = state[m + name]
    got = {k: tuple(v.shape) for k, v in out.items()}
    if got != shapes:
        raise RuntimeError(f"transplant mismatch: {sorted(set(got) ^ set(shapes))[:5]}")
    return out


def transplant_to_qwen3(qwen2: dict[str, torch.Tensor], scales: dict[int, tuple[float, float]],
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """Qwen3-VL weights (transformers names, fp32; the tower of :data:`tiny3.TRANSPLANTED`, the source's LM sizes) from
    tiny Qwen2-VL weights.

    ``scales``: per LM layer, the weights of its q and k RMSNorms (:func:`qk_norm_scales`). The tower and the main
    merger are copied (Qwen3-VL's blocks and merger are Qwen2-VL's with other names; its patch embedding's bias and
    learned position table start at zero), so the image tokens are the Qwen2-VL's exactly; each DeepStack merger
    starts with a seeded first layer and a zero output layer, adding nothing until trained."""
    state = {k: v.float() for k, v in qwen2.items()}
    geometry = dataclasses.replace(tiny3.TRANSPLANTED, text=tiny.TextGeometry.of(state))
    shapes = tiny3.checkpoint_shapes("qwen3_vl", geometry)
    out: dict[str, torch.Tensor] = {}
    lm = "model.language_model."
    for key, value in state.items():
        if key.startswith(lm) and not key.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            out[key] = value
    out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(geometry.text.layers):
        q_scale, k_scale = scales[i]
        out[f"{lm}layers.{i}.self_attn.q_norm.weight"] = torch.full((tiny.TEXT_HEAD_DIM,), q_scale)
        out[f"{lm}layers.{i}.self_attn.k_norm.weight"] = torch.full((tiny.TEXT_HEAD_DIM,), k_scale)
    v = "model.visual."
    conv = state[v + "patch_embed.proj.weight"]
    out[v + "patch_embed.proj.weight"] = conv
    out[v + "patch_embed.proj.bias"] = torch.zeros(conv.shape[0])
    out[v + "pos_embed.weight"] = torch.zeros(shapes[v + "pos_embed.weight"])
    for key, value in state.items():
        if key.startswith(v + "blocks."):
            out[key.replace(".mlp.fc1.", ".mlp.linear_fc1.").replace(".mlp.fc2.", ".mlp.linear_fc2.")] = value
    m = v + "merger."
    for a, b in (("ln_q", "norm"), ("mlp.0", "linear_fc1"), ("mlp.2", "linear_fc2")):
        for part in ("weight", "bias"):
            out[f"{m}{b}.{part}"] = state[f"{m}{a}.{part}"]
    generator = torch.Generator().manual_seed(seed)
    for i in range(len(tiny3.DEEPSTACK_LAYERS)):
        d = f"{v}deepstack_merger_list.{i}."
        width = shapes[d + "norm.weight"][0]
        out[d + "norm.weight"], out[d + "norm.bias"] = torch.ones(width), torch.zeros(width)
        out[d + "linear_fc1.weight"] = torch.randn(shapes[d + "linear_fc1.weight"], generator=generator) / width**0.5
        out[d + "linear_fc1.bias"] = torch.zeros(shapes[d + "linear_fc1.bias"])
        out[d + "linear_fc2.weight"] = torch.zeros(shapes[d + "linear_fc2.weight"])
        out[d + "linear_fc2.bias"] = torch.zeros(shapes[d + "linear_fc2.bias"])
    got = {k: tuple(t.shape) for k, t in out.items()}
    if got != shapes:
        raise RuntimeError(f"transplant mismatch: {sorted(set(got) ^ set(shapes))[:5]}")
    return out


def qk_norm_scales(qwen2: nn.Module, batch: dict) -> dict[int, tuple[float, float]]:
    """Per LM layer of a Qwen2-VL model: the root mean square of its queries and of its keys (per head, averaged
    over the real tokens of ``batch``), what Qwen3's q/k RMSNorm weights are set to in :func:`transplant_to_qwen3`."""
    norms: dict[tuple[int, str], float] = {}
    mask = batch["attention_mask"].bool()
    hooks = []
    for i, layer in enumerate(qwen2.model.language_model.layers):
        for name in ("q_proj", "k_proj"):
            def hook(_module: nn.Module, _args: tuple, output: torch.Tensor, key: tuple = (i, name)) -> None:
                heads = output[mask].view(-1, output.shape[-1] // tiny.TEXT_HEAD_DIM, tiny.TEXT_HEAD_DIM)
                norms[key] = heads.pow(2).mean(-1).sqrt().mean().item()
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            forward(qwen2, batch)
    finally:
        for handle in hooks:
            handle.remove()
    layers = len(qwen2.model.language_model.layers)
    return {i: (norms[(i, "q_proj")], norms[(i, "k_proj")]) for i in range(layers)}


def build_model(state: dict[str, torch.Tensor], variant: str = "qwen2_vl") -> nn.Module:
    """transformers' Qwen2-VL, Qwen2.5-VL or Qwen3-VL (fp32) holding ``state``."""
    import transformers

    if variant == "qwen3_vl":
        config = tiny3.make_config(variant, tiny3.Geometry.of(state, tiny3.TRANSPLANTED.metadata()))
        architecture = tiny3.ARCHITECTURES[variant]
    else:
        config = tiny.make_config(variant, tiny.TextGeometry.of(state))
        architecture = tiny.ARCHITECTURES[variant]
    config.dtype = torch.float32
    model = getattr(transformers, architecture)(config).float()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    return model


def export_metadata(variant: str) -> dict[str, str]:
    """The safetensors metadata an exported model needs (Qwen3-VL: its tower's activation)."""
    return {"format": "pt", **(tiny3.TRANSPLANTED.metadata() if variant == "qwen3_vl" else {})}


def export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """bf16 state dict in transformers names (what :func:`tiny.build_tiny_qwen2_vl` ``weights=`` takes)."""
    return {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- data
class Pixels:
    """Images (and clips) to what the real ``Qwen2VLImageProcessor`` (``Qwen2VLVideoProcessor``) gives: flattened
    patches and ``image_grid_thw`` (``video_grid_thw``)."""

    def __init__(self) -> None:
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        self.processor = Qwen2VLImageProcessor(**tiny.image_processor_kwargs())
        self.video_processor = Qwen2VLVideoProcessor(**tiny.image_processor_kwargs())

    def __call__(self, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def videos(self, clips: list[list]) -> tuple[torch.Tensor, torch.Tensor]:
        """``clips``: each a list of PIL frames (all frames used, no sampling)."""
        arrays = [np.stack([np.asarray(frame) for frame in frames]) for frames in clips]
        out = self.video_processor(videos=arrays, do_sample_frames=False, return_tensors="pt")
        return out["pixel_values_videos"], out["video_grid_thw"]


class QwenQAEncoder:
    """Token ids and labels of a multi-turn conversation in the tiny Qwen2-VL's chat format (what its chat
    template renders for an image followed by the question, then the answers and further questions)."""

    def __init__(self, tokenizer_json: Path | None = None) -> None:
        from tokenizers import Tokenizer

        bpe = Tokenizer.from_file(str(tokenizer_json)) if tokenizer_json else tiny.train_tokenizer()
        self.tok = tiny._hf_tokenizer(bpe)

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def conversation(self, qas: list[dict], image_tokens: int = IMAGE_TOKENS,
                     video: bool = False) -> tuple[list[int], list[int]]:
        """``video``: the media is a clip (``<|video_pad|>`` x ``image_tokens``) instead of an image."""
        pad, pad_id = (tiny.VIDEO_PAD, tiny.VIDEO_TOKEN_ID) if video else (tiny.IMAGE_PAD, tiny.IMAGE_TOKEN_ID)
        ids: list[int] = []
        labels: list[int] = []
        for turn, qa in enumerate(qas):
            media = tiny.VISION_START + pad + tiny.VISION_END if turn == 0 else ""
            prompt = (SYSTEM if turn == 0 else "") + "<|im_start|>user\n" + media + qa["question"]
            p = self.ids(prompt + "<|im_end|>\n<|im_start|>assistant\n")
            if turn == 0:
                at = p.index(pad_id)
                p = p[:at] + [pad_id] * image_tokens + p[at + 1:]
            a = self.ids(qa["answer"]) + [tiny.IM_END_ID]
            newline = self.ids("\n")
            ids += p + a + newline
            labels += [-100] * len(p) + a + [-100] * len(newline)
        return ids, labels


def qa_batch(enc: QwenQAEncoder, pixels: Pixels, seed: int, start: int, n: int, per_image: int) -> dict:
    images, seqs = [], []
    for index in range(start, start + n):
        rng = scene_rng(seed, "train", index)
        scene = make_scene(rng)
        images.append(render_scene(scene))
        seqs.append(enc.conversation(dense_questions(scene, rng, per_image)))
    pixel_values, grid = pixels(images)
    return {**padded(seqs), "pixel_values": pixel_values, "image_grid_thw": grid}


def padded(seqs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    batch = padded_conversations(seqs)
    batch["input_ids"][batch["attention_mask"] == 0] = tiny.ENDOFTEXT_ID
    # what the processor returns next to input_ids, transformers' M-RoPE needs it: 1 image, 2 video tokens
    ids = batch["input_ids"]
    batch["mm_token_type_ids"] = (ids == tiny.IMAGE_TOKEN_ID).int() + 2 * (ids == tiny.VIDEO_TOKEN_ID).int()
    return batch


def clip_tokens(grid: torch.Tensor) -> list[int]:
    """LM tokens of each clip of ``video_grid_thw`` (t x h x w patches, merged 2 x 2)."""
    return [int(g.prod()) // tiny.MERGE_SIZE**2 for g in grid]


def video_batch(enc: QwenQAEncoder, pixels: Pixels, seed: int, start: int, n: int, per_clip: int,
                frames: int, split: str = "train") -> dict:
    """Clips ``start .. start + n`` of ``split`` (``data.generate --videos``' stream), each with up to ``per_clip``
    questions as one conversation; ``"first_types"`` lists each clip's first question type."""
    clips, qas = [], []
    for index in range(start, start + n):
        rng = clip_rng(seed, split, index)
        clip = make_clip(rng, frames)
        clips.append(render_clip(clip))
        qas.append(make_video_questions(clip, rng, per_clip))
    values, grid = pixels.videos(clips)
    seqs = [enc.conversation(q, tokens, video=True) for q, tokens in zip(qas, clip_tokens(grid), strict=True)]
    return {**padded(seqs), "pixel_values_videos": values, "video_grid_thw": grid,
            "first_types": [q[0]["type"] for q in qas]}


def val_batch(enc: QwenQAEncoder, pixels: Pixels, seed: int, start: int, n: int) -> tuple[dict, list[str]]:
    """Validation-split images, one question each (the question :func:`train.llava.val_question` checks)."""
    images, seqs, types = [], [], []
    for index in range(start, start + n):
        scene, qa = val_question(seed, index)
        images.append(render_scene(scene))
        seqs.append(enc.conversation([qa]))
        types.append(qa["type"])
    pixel_values, grid = pixels(images)
    return {**padded(seqs), "pixel_values": pixel_values, "image_grid_thw": grid}, types


# ----------------------------------------------------------------------------- losses
def teacher_features(teacher: nn.Module, images: list) -> torch.Tensor:
    """The LLaVA projector's output per patch, averaged over each 2x2 window: ``[B, 144, hidden]`` in the
    merged tokens' row-major order."""
    from tokcomp_lab.train.llava import pixels as llava_pixels

    with torch.no_grad():
        values = torch.stack([llava_pixels(image) for image in images])
        features = teacher.model.get_image_features(pixel_values=values).pooler_output
        features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
        b, _, d = features.shape
        grid = features.view(b, MERGED_SIDE, 2, MERGED_SIDE, 2, d)
        return grid.mean(dim=(2, 4)).reshape(b, IMAGE_TOKENS, d)


def distill_teacher(args: argparse.Namespace, pixels: Pixels) -> Callable[[list], torch.Tensor]:
    """What stage 1 trains the tower and merger to give for a list of images: the LLaVA model's projector output
    pooled per merged token (``qwen2_vl``), or the trained Qwen2-VL's image tokens (``qwen2_5_vl``, ``qwen3_vl``)."""
    if args.variant in ("qwen2_5_vl", "qwen3_vl"):
        qwen2 = build_model(tiny.load_weights(args.qwen2_vl)).eval()

        def qwen2_features(images: list) -> torch.Tensor:
            with torch.no_grad():
                return student_features(qwen2, *pixels(images))

        return qwen2_features
    from transformers import LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava.ensure_trained_model()),
                                                          dtype=torch.float32).eval()
    return lambda images: teacher_features(llava, images)


def student_features(model: nn.Module, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The Qwen tower + merger's image tokens, ``[B, 144, hidden]``."""
    out = model.model.visual(pixel_values, grid_thw=grid)
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    return features.view(grid.shape[0], IMAGE_TOKENS, -1)


def distill_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE relative to the target's mean square, so 1.0 means 'predicts zeros'."""
    return F.mse_loss(student, target) / target.pow(2).mean()


def forward(model: nn.Module, batch: dict):  # noqa: ANN201 - transformers' model output
    """The Qwen2-VL decoder's output for ``batch`` of images or clips (positions from transformers' own M-RoPE
    index)."""
    media = {key: batch.get(key) for key in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                             "video_grid_thw")}
    return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       mm_token_type_ids=batch["mm_token_type_ids"], **media)


def qa_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    out = forward(model, batch)
    hidden = out.last_hidden_state[:, :-1]
    target = batch["labels"][:, 1:]
    sel = target != -100
    logits = model.lm_head(hidden[sel])
    return F.cross_entropy(logits, target[sel]), logits


def answers_correct(model: nn.Module, batch: dict) -> list[bool]:
    """Greedy exact match of each conversation's first answer up to its ``<|im_end|>``, by teacher forcing."""
    with torch.no_grad():
        pred = model.lm_head(forward(model, batch).last_hidden_state[:, :-1]).argmax(-1)
    return first_answers_correct(pred, batch["labels"], eos=tiny.IM_END_ID)


# ----------------------------------------------------------------------------- loop
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokcomp_lab.train.qwen2_vl", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="run folder; a ckpt.pt already there is resumed")
    parser.add_argument("--variant", choices=(*tiny.VARIANTS, "qwen3_vl"), default="qwen2_vl",
                        help="qwen2_vl starts from the trained tiny LLaVA; qwen2_5_vl and qwen3_vl from the trained "
                        "tiny Qwen2-VL")
    parser.add_argument("--llava", type=Path, default=tiny_llava.TRAINED_WEIGHTS,
                        help="qwen2_vl: trained tiny LLaVA weights to start from and distil (default: bundled)")
    parser.add_argument("--qwen2-vl", type=Path, default=tiny.TRAINED_WEIGHTS_OF["qwen2_vl"],
                        help="qwen2_5_vl, qwen3_vl: trained tiny Qwen2-VL weights to start from (default: bundled)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from these weights of --variant instead (e.g. the bundled trained ones, to train "
                        "them further; give --distill-steps 0)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (training split of the generator)")
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--distill-batch", type=int, default=16)
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument("--qa-steps", type=int, default=1000)
    parser.add_argument("--qa-batch", type=int, default=8)
    parser.add_argument("--qa-lr", type=float, default=3e-4)
    parser.add_argument("--questions-per-image", type=int, default=12)
    parser.add_argument("--video-share", type=float, default=0.0,
                        help="share of QA steps that train on moving-shape clips (data.generate --videos) instead")
    parser.add_argument("--video-batch", type=int, default=4, help="clips per video step")
    parser.add_argument("--video-frames", type=int, default=4, help="frames per clip (even)")
    parser.add_argument("--questions-per-clip", type=int, default=4)
    parser.add_argument("--eval-clips", type=int, default=64, help="validation clips checked with the images")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="seconds of QA training: stop then (learning rate decayed by then), checkpoint, export")
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--eval-images", type=int, default=128, help="validation images checked at each save")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.distill_steps < 0 or args.qa_steps < 0:
        parser.error("--distill-steps and --qa-steps must be >= 0")
    if not 0 <= args.video_share < 1:
        parser.error("--video-share must be in [0, 1)")
    if args.video_frames < 2 or args.video_frames % 2:
        parser.error("--video-frames must be an even number >= 2")
    if args.init is None and args.variant == "qwen2_vl":
        llava_theta = tiny_llava.rope_theta_of(tiny_llava.weights_metadata(args.llava))
        if llava_theta != tiny.ROPE_THETA:  # the transplanted attention learned its positions at the LLaVA's base
            parser.error(f"--llava {args.llava}: its LM has rotary base {llava_theta:g}, the tiny Qwen2-VL's is "
                         f"{tiny.ROPE_THETA:g}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "log.jsonl", "a")
    ckpt_path = args.out / "ckpt.pt"

    from safetensors.torch import load_file

    enc, pixels = QwenQAEncoder(), Pixels()
    if args.init is not None:
        init = (tiny3.load_weights(args.init)[0] if args.variant == "qwen3_vl"
                else tiny.load_weights(args.init, args.variant))
        model = build_model(init, args.variant)
    elif args.variant == "qwen3_vl":
        source = tiny.load_weights(args.qwen2_vl)
        scales = qk_norm_scales(build_model(source).eval(),
                                qa_batch(enc, pixels, args.seed, 0, 8, args.questions_per_image))
        model = build_model(transplant_to_qwen3(source, scales), args.variant)
    elif args.variant == "qwen2_5_vl":
        model = build_model(transplant_to_qwen2_5(tiny.load_weights(args.qwen2_vl)), args.variant)
    else:
        rows = token_row_map(tiny_llava.train_tokenizer().get_vocab(), tiny.train_tokenizer().get_vocab())
        model = build_model(transplant(load_file(str(args.llava)), rows))
    distill_opt = torch.optim.AdamW(model.model.visual.parameters(), lr=args.distill_lr, weight_decay=0.0)
    qa_opt = torch.optim.AdamW(model.parameters(), lr=args.qa_lr, weight_decay=0.0)
    stage, step = "distill", 0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        model.load_state_dict(ck["model"])
        distill_opt.load_state_dict(ck["distill_opt"])
        if ck["stage"] == "qa" and ck["step"] > 0:
            qa_opt.load_state_dict(ck["qa_opt"])
        stage, step = ck["stage"], ck["step"]
        print(f"resumed {stage} at step {step}", flush=True)

    def record(entry: dict) -> None:
        print(json.dumps(entry), flush=True)
        log.write(json.dumps(entry) + "\n")
        log.flush()

    def checkpoint() -> None:
        save(ckpt_path, {"model": model.state_dict(), "distill_opt": distill_opt.state_dict(),
                         "qa_opt": qa_opt.state_dict(), "stage": stage, "step": step})

    def export() -> None:
        from safetensors.torch import save_file

        save_file(export_state(model), str(args.out / "model.safetensors"), metadata=export_metadata(args.variant))

    def validate() -> None:
        model.eval()
        hits, types = [], []
        for start in range(0, args.eval_images, 32):
            batch, batch_types = val_batch(enc, pixels, args.seed, start, min(32, args.eval_images - start))
            hits += answers_correct(model, batch)
            types += batch_types
        model.train()
        per_type = {t: round(float(np.mean([h for h, u in zip(hits, types, strict=True) if u == t])), 3)
                    for t in sorted(set(types))}
        record({"stage": "qa-val", "step": step, "acc": round(float(np.mean(hits)), 3), "per_type": per_type,
                "s": round(time.perf_counter() - started, 1)})
        if args.video_share > 0 and args.eval_clips:
            model.eval()
            hits, types = [], []
            for start in range(0, args.eval_clips, 16):
                # one question per clip (the first: a motion question where the clip has a describable mover)
                batch = video_batch(enc, pixels, args.seed, start, min(16, args.eval_clips - start), 1,
                                    args.video_frames, split="val")
                hits += answers_correct(model, batch)
                types += batch["first_types"]
            model.train()
            per_type = {t: round(float(np.mean([h for h, u in zip(hits, types, strict=True) if u == t])), 3)
                        for t in sorted(set(types))}
            record({"stage": "qa-val-video", "step": step, "acc": round(float(np.mean(hits)), 3),
                    "per_type": per_type, "s": round(time.perf_counter() - started, 1)})

    started = time.perf_counter()
    if stage == "distill":  # with --distill-steps 0 (e.g. --init from Qwen weights) straight on to QA
        teacher = distill_teacher(args, pixels) if step < args.distill_steps else None
        model.train()
        while step < args.distill_steps:
            rngs = [scene_rng(args.seed, "train", 10_000_000 + step * args.distill_batch + i)
                    for i in range(args.distill_batch)]
            images = [render_scene(make_scene(rng)) for rng in rngs]
            target = teacher(images)
            pixel_values, grid = pixels(images)
            for group in distill_opt.param_groups:
                group["lr"] = lr_at(step, args.distill_steps, args.distill_lr, 20)
            loss = distill_loss(student_features(model, pixel_values, grid), target)
            distill_opt.zero_grad(set_to_none=True)
            loss.backward()
            distill_opt.step()
            step += 1
            if step % 10 == 0 or step == args.distill_steps:
                record({"stage": "distill", "step": step, "loss": round(loss.item(), 4),
                        "s": round(time.perf_counter() - started, 1)})
            if step % args.save_every == 0:
                checkpoint()
        del teacher
        stage, step = "qa", 0
        checkpoint()
        export()
        if args.eval_images:
            validate()
    if stage == "qa":
        qa_started = time.perf_counter()
        model.train()
        while step < args.qa_steps:
            elapsed = time.perf_counter() - qa_started
            if args.time_limit and elapsed > args.time_limit:
                break
            videos_before = math.floor(step * args.video_share)  # clips are drawn in order, so a resume continues
            if math.floor((step + 1) * args.video_share) > videos_before:
                batch = video_batch(enc, pixels, args.seed, videos_before * args.video_batch, args.video_batch,
                                    args.questions_per_clip, args.video_frames)
            else:
                batch = qa_batch(enc, pixels, args.seed, step * args.qa_batch, args.qa_batch, args.questions_per_image)
            for group in qa_opt.param_groups:
                group["lr"] = lr_at(step, args.qa_steps, args.qa_lr, 20,
                                    elapsed / args.time_limit if args.time_limit else 0.0)
            loss, _ = qa_loss(model, batch)
            qa_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            qa_opt.step()
            step += 1
            if step % 10 == 0:
                record({"stage": "qa", "step": step, "loss": round(loss.item(), 4),
                        "s": round(time.perf_counter() - started, 1)})
            if step % args.save_every == 0:
                checkpoint()
                export()
                if args.eval_images and step % (args.save_every * 4) == 0:
                    validate()
        checkpoint()
        export()
        if args.eval_images:
            validate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
