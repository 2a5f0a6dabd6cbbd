"""Train the tiny LLaVA-1.5-shaped model on the synthetic VQA task (docs/dataset.md).

``PYTHONPATH=lab python -m tokcomp_lab.train.llava OUT [--clip-steps N] [--qa-steps N] ...``

Stage 1 (``clip``): CLIP-style contrastive pre-training of the vision tower. The image embedding
is the tower's CLS token (``post_layernorm`` of the last layer, as in CLIP) through a linear head;
the text side is a small transformer over the words of a generated scene caption
(:func:`vllm_tokcomp.data.scene_caption`). Symmetric InfoNCE with a learned temperature.
With ``--dense-weight`` > 0, linear heads on the patch features the projector reads (layer -2)
also predict, per 14 x 14 patch, the colour and shape of the object covering it, the digit in a
digit box, and the colour and shape of an object whose centre falls in it (labels from
:func:`vllm_tokcomp.data.synth.label_map`); the heads are thrown away after training.
``--sincos-positions`` starts the tower's position embeddings from a fixed 2-D sine-cosine table
(as in MAE) instead of noise, a locality prior for a tower trained from scratch.

Stage 2 (``qa``): the whole LLaVA model (tower at a lower learning rate, projector, LM) on the
question answering task. Each image carries all its questions as a multi-turn conversation in
the model's chat format, so one 576-token image forward teaches several answers; the loss is on
answer tokens and ``</s>`` only, and the LM head is applied at those positions only.
``--compress-prob P`` shortens each image with probability P the way the plugin serves it (a library
method of :data:`AUGMENT_METHODS` to a budget of :data:`AUGMENT_BUDGETS`, the kept tokens at consecutive
positions), so the LM also learns to read compressed images; ``--eval-squeeze`` validates on those too.
``--isolated-questions`` packs the questions as single-turn conversations sharing the image prefix (block
attention mask, served positions), so no answer can be read off an earlier turn. ``--spec-version 2`` draws and words
the images by the data spec's version 2 (validation too); with ``--strokes``, ``--size-jitter``, ``--color-jitter``
and ``--both-spellings`` each training image draws its rendering within the spec's tolerances (:class:`Drawing`);
``--hard-share P`` draws a share P of the QA images as scenes of the harder split (``data/hard.py``: 8-16 small
objects, multi-digit numbers, its question forms) from a stream of their own, never the harder split's test scenes.

Data is generated on the fly from the training split's seeds (image ``i`` of the run is image
``i`` of ``python -m vllm_tokcomp.data.generate --seed SEED``), so runs are deterministic and
never see validation/test images. ``OUT/ckpt.pt`` is written every ``--save-every`` steps and a
run resumes from it; ``OUT/model.safetensors`` (bf16, llava-hf names) is the result, to be
turned into a model folder with ``python -m vllm_tokcomp.tiny.llava_builder DIR --weights OUT/model.safetensors``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vllm_tokcomp.data.generate import rendering_rng, scene_rng
from vllm_tokcomp.data.hard import HARD_ASKERS, make_hard_questions, make_hard_scene, render_hard_scene
from vllm_tokcomp.data.spec import BACKGROUNDS, COLORS, DIGITS, MAX_OBJECTS, SHAPES, SIZES
from vllm_tokcomp.data.synth import (
    ASKERS,
    DIGIT_LABEL,
    RenderingRange,
    label_map,
    make_questions,
    make_scene,
    render_scene,
    scene_caption,
)
from vllm_tokcomp.tiny import llava_builder as tiny

MEAN = np.array(tiny.OPENAI_CLIP_MEAN, np.float32)
STD = np.array(tiny.OPENAI_CLIP_STD, np.float32)
CAPTION_WORDS = (
    [".", "background", "digit", *BACKGROUNDS, *DIGITS, *SIZES, *COLORS, *SHAPES]
    + ["top", "middle", "bottom", "left", "center", "right"]
)
MAX_CAPTION = 48


def pixels(image) -> torch.Tensor:  # noqa: ANN001 - PIL image, 336 x 336
    """What CLIPImageProcessor gives for a 336 x 336 image (resize and crop are no-ops)."""
    arr = (np.asarray(image, np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def build_model(geometry: tiny.Geometry = tiny.Geometry()) -> nn.Module:  # noqa: B008 - frozen
    """transformers' LLaVA of ``geometry``, random init."""
    from transformers import LlavaForConditionalGeneration

    config = tiny._make_config(geometry=geometry)
    config.dtype = torch.float32
    model = LlavaForConditionalGeneration(config)
    load_llava_hf_state(model, tiny.random_state_dict(0, geometry=geometry))
    with torch.no_grad():  # a trainable start for the LM head (the random init has logits of std 8)
        gen = torch.Generator().manual_seed(1)
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=gen) * 0.02)
    return model


def identity_blocks(state: dict[str, torch.Tensor], prefix: str, donor: int, indices: range,
                    outputs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Copies of layer ``donor`` (keys ``prefix + index + "."``) at ``indices`` whose output projections
    (keys ending in ``outputs``) are zero: residual blocks that add nothing until training moves them."""
    source = f"{prefix}{donor}."
    return {f"{prefix}{i}.{key[len(source):]}": torch.zeros_like(value) if key.endswith(outputs) else value.clone()
            for i in indices for key, value in state.items() if key.startswith(source)}


def deepened(state: dict[str, torch.Tensor], text_layers: int) -> dict[str, torch.Tensor]:
    """``state`` with its LM grown to ``text_layers`` layers by appending identity blocks: copies of
    the last layer whose attention and MLP outputs (``o_proj``, ``down_proj``) are zero, so the deeper
    model computes exactly what ``state`` did and training starts from there."""
    have = tiny.Geometry.of(state).text_layers
    if text_layers < have:
        raise ValueError(f"weights have {have} LM layers, cannot train a {text_layers}-layer model from them")
    prefix = "language_model.model.layers."
    return {**state, **identity_blocks(state, prefix, have - 1, range(have, text_layers),
                                       ("o_proj.weight", "down_proj.weight"))}


def tower_deepened(state: dict[str, torch.Tensor], vision_layers: int) -> dict[str, torch.Tensor]:
    """``state`` with its vision tower grown to ``vision_layers`` layers by inserting identity blocks just before
    the feature layer (``VISION_FEATURE_LAYER``, the second-to-last): copies of the layer before it with zero
    ``out_proj`` and ``fc2``. The feature layer and the last layer see the same inputs as before, so the patch
    features, the feature layer's CLS attention and the CLS embedding are unchanged, and the new capacity sits
    where the projector reads from."""
    have = tiny.Geometry.of(state).vision_layers
    if vision_layers < have:
        raise ValueError(f"weights have {have} tower layers, cannot train a {vision_layers}-layer tower from them")
    if vision_layers == have:
        return dict(state)
    prefix = "vision_tower.vision_model.encoder.layers."
    feature = have + tiny.VISION_FEATURE_LAYER  # index of the layer whose output the projector reads (hidden state -2)
    if feature < 1:
        raise ValueError(f"a {have}-layer tower has no layer before its feature layer to copy")
    added = vision_layers - have
    out = {k: v for k, v in state.items() if not k.startswith(prefix)}
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            out[f"{prefix}{int(index) + added * (int(index) >= feature)}.{rest}"] = value
    out.update(identity_blocks(state, prefix, feature - 1, range(feature, feature + added),
                               ("out_proj.weight", "out_proj.bias", "fc2.weight", "fc2.bias")))
    return out


@torch.no_grad()
def recenter_projector(model: nn.Module, seed: int, images: int = 32, target_norm: float | None = None) -> dict:
    """Re-parameterise the projector's last layer so the image tokens it gives have zero mean over
    training images and the RMS norm of the LM's text embeddings.

    A tower trained from scratch gives patch features dominated by one direction shared by every patch
    (measured: 96 % of the projected vector's norm, 30x the text embeddings' norm), so after the LM's
    RMSNorm the patches differ by a small remainder and the LM learns very slowly to tell them apart.
    ``W x + b`` -> ``s (W x + b - mu)`` removes that shared direction and rescales; it keeps every
    difference between patches (up to the scale), and the architecture is LLaVA's unchanged."""
    proj = model.model.multi_modal_projector
    pixel_values = torch.stack([pixels(render_scene(make_scene(scene_rng(seed, "train", 50_000_000 + i))))
                                for i in range(images)]).to(proj.linear_2.weight.device)
    feats = model.model.get_image_features(pixel_values=pixel_values)
    feats = getattr(feats, "pooler_output", feats)
    out = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
    mu = out.mean(0)
    if target_norm is None:
        target_norm = float(model.model.language_model.embed_tokens.weight.norm(dim=-1).mean())
    scale = target_norm / float((out - mu).norm(dim=-1).mean())
    proj.linear_2.bias.sub_(mu).mul_(scale)
    proj.linear_2.weight.mul_(scale)
    return {"shared_norm": float(mu.norm()), "token_norm": float(out.norm(dim=-1).mean()), "scale": scale}


def read_init(path: Path) -> tuple[dict | None, dict[str, torch.Tensor], tiny.Geometry]:
    """``(per-patch heads or None, weights in llava-hf names, their geometry)`` of a ``--init`` file: a run's
    ``ckpt.pt`` (or a file of its form) or exported safetensors."""
    if path.suffix == ".pt":
        ck = torch.load(path, weights_only=False, map_location="cpu")
        state = llava_hf_names(ck["model"])
        return ck["heads"], state, tiny.Geometry.of(state, ck.get("metadata"))
    state = tiny.load_external_weights(path)
    return None, state, tiny.Geometry.of(state, tiny.weights_metadata(path))


def with_language_side(state: dict[str, torch.Tensor], donor: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state``'s vision tower with ``donor``'s projector and LM (llava-hf names)."""
    tower = {k: v for k, v in state.items() if k.startswith("vision_tower.")}
    rest = {k: v for k, v in donor.items() if not k.startswith("vision_tower.")}
    if not rest or not tower:
        raise ValueError("--init-lm: no projector/LM weights in the donor, or no tower in --init")
    return {**tower, **rest}


def load_llava_hf_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict in llava-hf names (what the bundled weights use) into transformers' model."""
    mapped = {}
    for key, value in state.items():
        if key.startswith("language_model.model."):
            key = "model.language_model." + key[len("language_model.model."):]
        elif key == "language_model.lm_head.weight":
            key = "lm_head.weight"
        elif key.startswith("vision_tower.vision_model."):
            key = "model.vision_tower." + key[len("vision_tower.vision_model."):]
        else:
            key = "model." + key
        mapped[key] = value.float()
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")


def llava_hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory state dict in llava-hf names, without the position-id buffers."""
    return {tiny.normalize_checkpoint_key(k): v for k, v in state.items() if "position_ids" not in k}


def export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """bf16 state dict in llava-hf names (what :func:`tiny.build_tiny_llava` ``weights=`` takes)."""
    return {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in llava_hf_names(model.state_dict()).items()}


# ----------------------------------------------------------------------------- stage 1: CLIP
class CaptionEncoder(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.vocab = {w: i + 1 for i, w in enumerate(CAPTION_WORDS)}
        self.embed = nn.Embedding(len(self.vocab) + 1, dim)
        self.pos = nn.Parameter(torch.randn(MAX_CAPTION, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 2, dim * 4, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(captions), MAX_CAPTION, dtype=torch.long)
        for i, caption in enumerate(captions):
            words = [self.vocab[w] for w in caption.split()][:MAX_CAPTION]
            ids[i, : len(words)] = torch.tensor(words)
        return ids, ids == 0

    def forward(self, captions: list[str]) -> torch.Tensor:
        ids, pad = self.tokenize(captions)
        ids, pad = ids.to(self.pos.device), pad.to(self.pos.device)
        x = self.encoder(self.embed(ids) + self.pos, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.norm((x * keep).sum(1) / keep.sum(1))


# Per-patch targets: (name, classes); class 0 = nothing there.
DENSE_TARGETS = (("color", len(COLORS) + 1), ("shape", len(SHAPES) + 1), ("digit", len(DIGITS) + 1),
                 ("center_color", len(COLORS) + 1), ("center_shape", len(SHAPES) + 1))
GRID = tiny.IMAGE_SIZE // tiny.PATCH_SIZE
# Where each patch is: its column and row in the 24 x 24 grid, the same for every image (see position_loss).
POSITION_TARGETS = (("column", GRID), ("row", GRID))
MIN_COVER = 30  # pixels of a 196-pixel patch an object must cover to label it


def patch_owners(scene) -> np.ndarray:  # noqa: ANN001 - Scene
    """``(576,)`` which :func:`label_map` label covers each patch (CLIP's row-major order): 0 for none,
    else the label covering most of the patch, if it covers at least :data:`MIN_COVER` pixels."""
    p = tiny.PATCH_SIZE
    lab = label_map(scene).reshape(GRID, p, GRID, p).transpose(0, 2, 1, 3).reshape(GRID * GRID, p * p)
    # pixels per (patch, label); argmax takes the smallest label on a tie
    counts = (lab[:, :, None] == np.arange(1, int(lab.max()) + 1)[None, None, :]).sum(1)
    if counts.shape[1] == 0:
        return np.zeros(GRID * GRID, np.int64)
    best = counts.argmax(1)
    return np.where(counts.max(1) >= MIN_COVER, best + 1, 0).astype(np.int64)


def patch_labels(scene) -> np.ndarray:  # noqa: ANN001 - Scene
    """``(576, len(DENSE_TARGETS))`` int64 targets in CLIP's patch order (row-major)."""
    p = tiny.PATCH_SIZE
    colors, shapes = list(COLORS), list(SHAPES)
    out = np.zeros((GRID * GRID, len(DENSE_TARGETS)), np.int64)
    for index, value in enumerate(patch_owners(scene)):
        if value == DIGIT_LABEL:
            out[index, 2] = scene.digit + 1
        elif value:
            obj = scene.objects[value - 1]
            out[index, 0], out[index, 1] = colors.index(obj.color) + 1, shapes.index(obj.shape) + 1
    for obj in scene.objects:
        index = (obj.y // p) * GRID + obj.x // p
        out[index, 3], out[index, 4] = colors.index(obj.color) + 1, shapes.index(obj.shape) + 1
    return out


def question_targets(scene, question: str, near_misses: bool = False) -> list[int]:  # noqa: ANN001 - Scene
    """The :func:`label_map` labels of what a generated question is about: the digit box for the digit
    question, else the objects matching every colour and shape it names (either shape for "which is further
    left, the A or the B"). Empty when nothing in the scene matches (a count of 0, a "no"), except with
    ``near_misses`` for a question naming a colour and a shape ("Is there a green circle?" -> no): then the
    objects with that colour or that shape, the ones to inspect before answering no."""
    if "digit" in question:
        return [DIGIT_LABEL] if scene.digit is not None else []
    words = set(question.lower().rstrip("?").split())
    colors = {c for c in COLORS if c in words}
    shapes = {s for s in SHAPES if words & {s, s + "s", s + "es"}}
    if len(shapes) > 1:
        return [i + 1 for i, o in enumerate(scene.objects) if o.shape in shapes]
    matches = [i + 1 for i, o in enumerate(scene.objects)
               if (not colors or o.color in colors) and (not shapes or o.shape in shapes)]
    if not matches and near_misses and colors and shapes:
        return [i + 1 for i, o in enumerate(scene.objects) if o.color in colors or o.shape in shapes]
    return matches


def sincos_positions(dim: int) -> torch.Tensor:
    """2-D sine-cosine position table for CLS + 24 x 24 patches (CLS row zero), as in MAE."""
    grid = np.arange(GRID, dtype=np.float32)
    rows, cols = np.meshgrid(grid, grid, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    parts = [f(axis.reshape(-1, 1) * omega) for axis in (rows, cols) for f in (np.sin, np.cos)]
    table = np.concatenate([np.zeros((1, dim), np.float32), np.concatenate(parts, 1)], 0)
    return torch.from_numpy(table.astype(np.float32))


class ClipHeads(nn.Module):
    def __init__(self, vision_dim: int, dim: int = 64) -> None:
        super().__init__()
        self.text = CaptionEncoder(dim)
        self.image_proj = nn.Linear(vision_dim, dim, bias=False)
        self.text_proj = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.dense = nn.ModuleList([nn.Linear(vision_dim, classes) for _, classes in DENSE_TARGETS])
        self.position = nn.ModuleList([nn.Linear(vision_dim, classes) for _, classes in POSITION_TARGETS])


def load_heads(heads: ClipHeads, state: dict[str, torch.Tensor]) -> None:
    """Load per-patch heads saved by a run; heads added since (``position``) keep their fresh init."""
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("position.")]:
        raise RuntimeError(f"heads mismatch: missing={missing} unexpected={unexpected}")


def clip_batch(seed: int, start: int, n: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    images, captions, labels = [], [], []
    for index in range(start, start + n):
        scene = make_scene(scene_rng(seed, "train", index))
        images.append(pixels(render_scene(scene)))
        captions.append(scene_caption(scene))
        labels.append(patch_labels(scene))
    return torch.stack(images), captions, torch.from_numpy(np.stack(labels))


def clip_loss(
    model: nn.Module, heads: ClipHeads, images: torch.Tensor, captions: list[str], labels: torch.Tensor,
    dense_weight: float = 0.0,
) -> tuple[torch.Tensor, float, dict[str, float]]:
    vision = model.model.vision_tower
    out = vision(pixel_values=images, output_hidden_states=dense_weight > 0)
    cls = out.pooler_output  # post_layernorm(CLS of the last layer)
    img = F.normalize(heads.image_proj(cls), dim=-1)
    txt = F.normalize(heads.text_proj(heads.text(captions)), dim=-1)
    logits = heads.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T
    target = torch.arange(len(captions), device=logits.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    acc = (logits.argmax(1) == target).float().mean().item()
    dense_acc: dict[str, float] = {}
    if dense_weight > 0:
        features = out.hidden_states[tiny.VISION_FEATURE_LAYER][:, 1:]  # what the projector reads
        dense, dense_acc = dense_loss(heads, features, labels)
        loss = loss + dense_weight * dense
    return loss, acc, dense_acc


def dense_loss(heads: ClipHeads, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Per-patch loss of every ``DENSE_TARGETS`` head on ``[B, 576, D]`` patch features, and each head's
    accuracy on the patches that hold something. Each head's loss has two terms: cross-entropy over all
    patches (empty ones down-weighted), which teaches *where* things are, and cross-entropy over the patches
    that hold something, which teaches *what* they are. The second term matters for the rare targets: a
    digit box covers about 1.5 of an image's 576 patches on average, so in the first term alone the ten
    digit classes got about 1 % of the digit head's gradient (and stayed at chance for 5600 steps)."""
    total = features.new_zeros(())
    accuracy: dict[str, float] = {}
    for k, ((name, classes), head) in enumerate(zip(DENSE_TARGETS, heads.dense, strict=True)):
        y = labels[..., k].reshape(-1)
        pred = head(features).reshape(-1, classes)
        weight = torch.ones(classes, device=pred.device)
        weight[0] = 0.2  # most patches are empty
        total = total + F.cross_entropy(pred, y, weight=weight)
        hit = y > 0
        if hit.any():
            total = total + F.cross_entropy(pred[hit], y[hit])
            accuracy[name] = round((pred[hit].argmax(-1) == y[hit]).float().mean().item(), 3)
    return total, accuracy


def position_loss(
    heads: ClipHeads, features: torch.Tensor, occupied: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of each patch's column and row in the grid, predicted linearly from its ``[B, 576, D]``
    features, and the accuracy of each (``column``, ``row``; over the ``occupied`` patches when given). With
    ``occupied`` (``[B, 576]`` bool: the patches that hold an object or the digit) a second term over those
    patches only, as in :func:`dense_loss`: they are what a question is about, and the ones that lost it.

    Measured on a model trained without this term: its LM answered "left" to every "left or right?" question of the test
    split, and a linear probe on its patch features told the left from the right half for 89 % of all patches
    but 61 % of the patches on objects (chance 50 %): the content of an object patch had crowded out where it
    is. This term makes the tower keep each patch's position in the features the projector reads."""
    index = torch.arange(features.shape[1], device=features.device)
    truth = {"column": index % GRID, "row": index // GRID}
    total = features.new_zeros(())
    accuracy: dict[str, float] = {}
    hit = occupied.reshape(-1) if occupied is not None else None
    for (name, classes), head in zip(POSITION_TARGETS, heads.position, strict=True):
        pred = head(features).reshape(-1, classes)
        y = truth[name].repeat(features.shape[0])
        total = total + F.cross_entropy(pred, y)
        right = pred.argmax(-1) == y
        if hit is not None and hit.any():
            total = total + F.cross_entropy(pred[hit], y[hit])
            right = right[hit]
        accuracy[name] = round(right.float().mean().item(), 3)
    return total, accuracy


# ----------------------------------------------------------------------------- stage 2: QA
class QAEncoder:
    """Token ids and labels of a multi-turn conversation in the tiny model's chat format."""

    def __init__(self, tokenizer_json: Path | None = None) -> None:
        """``tokenizer_json``: the model folder's ``tokenizer.json`` instead of training the tokenizer again (on
        another machine a different ``tokenizers`` release could train a different one)."""
        from tokenizers import Tokenizer

        bpe = Tokenizer.from_file(str(tokenizer_json)) if tokenizer_json else tiny.train_tokenizer()
        self.tok = tiny._hf_tokenizer(bpe)
        self.image_id = tiny.IMAGE_TOKEN_ID
        self.eos = tiny.EOS_TOKEN_ID

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @functools.cached_property
    def attribute_ids(self) -> frozenset[int]:
        """The tokens of the words a question names objects by: colours and shapes (and the generator's plurals,
        "circles", "crosss"), as they appear mid-sentence."""
        words = [*COLORS, *SHAPES, *(shape + "s" for shape in SHAPES)]
        return frozenset(token for word in words for token in self.ids(" " + word))

    def attribute_positions(self, ids: list[int], answer_start: int) -> list[int]:
        """Positions of :attr:`attribute_ids` in the question whose answer starts after ``answer_start``: the turn
        runs back to the previous answer's ``</s>`` or the image, so earlier turns' words are not counted."""
        positions = []
        for position in range(answer_start, -1, -1):
            if ids[position] in (self.eos, self.image_id):
                break
            if ids[position] in self.attribute_ids:
                positions.append(position)
        return positions[::-1]

    def conversation(self, qas: list[dict], image_tokens: int = tiny.NUM_IMAGE_TOKENS) -> tuple[list[int], list[int]]:
        ids, labels, _ = self.conversation_with_answer_starts(qas, image_tokens)
        return ids, labels

    def conversation_with_answer_starts(
        self, qas: list[dict], image_tokens: int = tiny.NUM_IMAGE_TOKENS
    ) -> tuple[list[int], list[int], list[int]]:
        """Token ids, labels, and per turn the position whose next-token prediction is the answer's first token.
        ``image_tokens``: how many placeholders the image gets (fewer for a compressed image)."""
        ids: list[int] = []
        labels: list[int] = []
        starts: list[int] = []
        for turn, qa in enumerate(qas):
            prompt = ("<s>USER: <image>\n" if turn == 0 else "USER: ") + qa["question"] + " ASSISTANT:"
            p = self.ids(prompt)
            if turn == 0:
                at = p.index(self.image_id)
                p = p[:at] + [self.image_id] * image_tokens + p[at + 1:]
            a = self.ids(" " + qa["answer"]) + [self.eos]
            ids += p
            starts.append(len(ids) - 1)
            ids += a
            labels += [-100] * len(p) + a
        return ids, labels, starts

    def isolated_conversation(
        self, qas: list[dict], image_tokens: int = tiny.NUM_IMAGE_TOKENS
    ) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        """Every question as its own single-turn conversation, packed after one shared image prefix: ids,
        labels and answer starts as :meth:`conversation_with_answer_starts`, plus each token's position and
        segment (0: the shared ``<s>USER: <image>`` prefix; ``k``: question ``k``). With
        :func:`segment_attention` question ``k`` sees the prefix and itself only, at the positions it has when
        served alone, so no answer can be read off an earlier turn and each is a single-turn sample."""
        singles = [self.conversation_with_answer_starts([qa], image_tokens) for qa in qas]
        first = singles[0][0]
        prefix = first.index(self.image_id) + image_tokens  # up to and including the last image token
        ids, labels, starts = list(first[:prefix]), [-100] * prefix, []
        positions, segments = list(range(prefix)), [0] * prefix
        for k, (single, single_labels, (start,)) in enumerate(singles, start=1):
            if single[:prefix] != first[:prefix]:
                raise ValueError("the questions' single-turn prompts do not share the image prefix")
            starts.append(len(ids) + start - prefix)
            ids += single[prefix:]
            labels += single_labels[prefix:]
            positions += range(prefix, len(single))
            segments += [k] * (len(single) - prefix)
        return ids, labels, starts, positions, segments


def segment_attention(segments: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` boolean mask (True: may attend) for packed conversations: causal, and a token of segment
    ``k`` > 0 sees segment 0 (the shared prefix) and its own segment only. ``segments``: ``[B, T]``; ``valid``:
    ``[B, T]``, False on padding (a padding token sees itself only, so no attention row is empty)."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
    mask = causal & same & valid[:, None, :] & valid[:, :, None]
    return (mask | torch.eye(length, dtype=torch.bool)).unsqueeze(1)


def dense_questions(scene, rng: np.random.Generator, k: int) -> list[dict]:  # noqa: ANN001 - Scene
    """Up to ``k`` distinct questions about one scene: rounds of :func:`make_questions` (all types each)."""
    out: list[dict] = []
    seen: set[str] = set()
    for _round in range(max(1, math.ceil(k / 3))):
        for qa in make_questions(scene, rng, 6):
            if qa["question"] not in seen and len(out) < k:
                seen.add(qa["question"])
                out.append(qa)
    return out


CAPTION_QUESTION = "Describe the image."


# Compression augmentation: what the served methods feed the LM (fewer image tokens at consecutive positions,
# merged tokens averaged), drawn from methods that need no tower or text signal.
AUGMENT_METHODS = ("uniform", "random", "pool", "tome")
AUGMENT_BUDGETS = (32, 64, 128, 192, 288)


@dataclasses.dataclass(frozen=True)
class Squeeze:
    """One image's compression in a training batch: ``method`` (a library method) down to ``budget`` tokens."""

    method: str
    budget: int
    seed: int = 0  # the random method's seed

    def compressor(self):  # noqa: ANN201 - a library Compressor
        from vllm_tokcomp.methods import get_method

        return get_method(self.method, seed=self.seed) if self.method == "random" else get_method(self.method)


def image_tokens(squeeze: Squeeze | None) -> int:
    """How many placeholders an image gets in the conversation: its budget when compressed."""
    return squeeze.budget if squeeze else tiny.NUM_IMAGE_TOKENS


def draw_squeeze(rng: np.random.Generator, prob: float) -> Squeeze | None:
    """With probability ``prob`` a random method and budget of :data:`AUGMENT_METHODS` x :data:`AUGMENT_BUDGETS`."""
    if prob <= 0 or rng.random() >= prob:
        return None
    return Squeeze(str(rng.choice(AUGMENT_METHODS)), int(rng.choice(AUGMENT_BUDGETS)), int(rng.integers(2**31)))


def parse_type_weights(items: list[str], error) -> dict[str, float] | None:  # noqa: ANN001 - argparse's error
    """``["shape=3", ...]`` -> ``{"shape": 3.0}`` (None when empty); a bad item goes to ``error``."""
    weights: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        types = {**ASKERS, **HARD_ASKERS}
        if name not in types or not 0 <= weight < float("inf") or name in weights:
            error(f"--type-weight wants TYPE=W once per type, TYPE one of {', '.join(types)} and W >= 0, got {item!r}")
        weights[name] = weight
    return weights or None


def answer_token_weights(labels: list[int], answer_weights: list[float], eos: int = tiny.EOS_TOKEN_ID) -> list[float]:
    """Per token of ``labels``: the weight of the answer it belongs to (answers in order, each up to and including
    its ``</s>``), 0 outside answers."""
    out, answer = [], 0
    for label in labels:
        if label == -100:
            out.append(0.0)
            continue
        out.append(float(answer_weights[answer]))
        answer += label == eos
    if answer != len(answer_weights):
        raise ValueError(f"{answer} answers in the labels, {len(answer_weights)} weights")
    return out


@dataclasses.dataclass(frozen=True)
class Drawing:
    """How QA images are drawn and worded: the data spec's version and, for spec v2, the rendering range each
    training image draws its rendering from (``data.synth.RenderingRange``, per image from
    ``data.generate.rendering_rng``, so the scenes and questions are the same under every range). Validation images
    are drawn exactly as the spec version says."""

    spec_version: int = 1
    renderings: RenderingRange = RenderingRange()
    hard_share: float = 0.0  # share of the images drawn as harder-split scenes (:func:`hard_scene_rng`)
    v1_share: float = 0.0  # share of the other images drawn and worded by spec v1 (:func:`drawn_as_v1`)


HARD_TRAIN_SPLIT = "hard_train"  # the harder split's training stream (data.generate.SPLIT_IDS)
V1_TRAIN_SPLIT = "v1_train"  # the stream deciding which images spec v1 draws (data.generate.SPLIT_IDS)


def drawn_as_v1(seed: int, index: int, share: float) -> bool:
    """Whether training image ``index`` is drawn exactly as spec v1 draws and words it (with probability ``share``,
    from a stream of its own: the scene and its questions are the same either way, only the drawing and wording
    differ). Rehearsing v1's drawing keeps what a spec-v2 run would otherwise unlearn on v1's test split."""
    return share > 0 and scene_rng(seed, V1_TRAIN_SPLIT, index).random() < share


def hard_scene_rng(seed: int, index: int, share: float) -> np.random.Generator | None:
    """The generator of training image ``index``'s harder-split scene when it draws one (with probability ``share``,
    from the image's own stream: which images are hard does not depend on the batch size), else None. The stream is
    not the harder split's (``scene_rng(seed, "hard", i)``), so a run never sees that split's test scenes."""
    if share <= 0:
        return None
    rng = scene_rng(seed, HARD_TRAIN_SPLIT, index)
    return rng if rng.random() < share else None


def training_scene(rng: np.random.Generator, min_objects: int = 1, spec_version: int = 1):  # noqa: ANN201 - a synth Scene
    """The first scene ``rng`` draws with at least ``min_objects`` objects (1: the generator's own distribution).
    The binding of a colour to a shape fails with distractors (``lab/benchmarks/heldout.py``: 0.99 of shape questions
    right in one-object scenes, under half in five-object ones), so a run may spend its steps on crowded scenes."""
    scene = make_scene(rng, spec_version=spec_version)
    while len(scene.objects) < min_objects:
        scene = make_scene(rng, spec_version=spec_version)
    return scene


def qa_batch(enc: QAEncoder, seed: int, start: int, n: int, per_image: int, caption: bool = False,
             compress_prob: float = 0.0, isolated: bool = False, near_misses: bool = False,
             placeholders: int | None = None, type_weights: dict[str, float] | None = None,
             min_objects: int = 1, drawing: Drawing = Drawing()) -> dict:  # noqa: B008 - frozen
    """Rendered images and their conversations. With ``compress_prob`` > 0 each image is compressed with that
    probability (``batch["squeeze"]``, one :class:`Squeeze` or None per row; the ids hold that many image tokens,
    and a compressed row's looks hold ``first image position + patch index``, mapped to the kept tokens in
    :func:`qa_forward`). With ``isolated`` the questions are packed as single-turn conversations
    (:meth:`QAEncoder.isolated_conversation`): the batch's ``attention_mask`` is then the ``[B, 1, T, T]``
    :func:`segment_attention` and it carries ``position_ids``. ``near_misses``: look targets for "no" presence
    answers too (:func:`question_targets`). ``placeholders``: every image gets that many image tokens (a learned
    connector's fixed output count, :mod:`tokcomp_lab.train.connector`); the batch then has no looks.
    ``type_weights``: question type -> weight of its answer tokens and its look in the loss (others 1; the batch
    then has ``answer_weights``, ``[B, T]`` aligned with ``labels``). ``min_objects``: every image has at least
    that many objects (:func:`training_scene`). ``drawing``: the spec version and rendering range (:class:`Drawing`)."""
    images, seqs, patch_targets, squeezes, layouts, weights = [], [], [], [], [], []
    # (row, answer-start position, image-token positions it is about, weight)
    looks: list[tuple[int, int, list[int], float]] = []
    question_looks: list[tuple[int, int, list[int], float]] = []  # the same, on the words the question names
    for row, index in enumerate(range(start, start + n)):
        rng = hard_scene_rng(seed, index, drawing.hard_share)
        hard = rng is not None
        if hard:
            scene = make_hard_scene(rng)
        else:
            rng = scene_rng(seed, "train", index)
            v1 = drawn_as_v1(seed, index, drawing.v1_share)
            scene = training_scene(rng, min_objects, 1 if v1 else drawing.spec_version)
        if drawing.renderings.varies and scene.spec_version >= 2:
            scene.rendering = drawing.renderings.draw(rendering_rng(seed, "train", index), len(scene.objects))
        images.append(pixels(render_hard_scene(scene) if hard else render_scene(scene)))
        qas = make_hard_questions(scene, rng, per_image) if hard else dense_questions(scene, rng, per_image)
        if caption:  # LLaVA's alignment task as a first turn: every object, so every image token matters
            qas = [{"question": CAPTION_QUESTION, "answer": scene_caption(scene)}, *qas]
        squeeze = draw_squeeze(rng, compress_prob)  # drawn last: without it the batches are the same as before
        squeezes.append(squeeze)
        tokens = placeholders or image_tokens(squeeze)
        if isolated:
            ids, labels, starts, positions, segments = enc.isolated_conversation(qas, tokens)
            layouts.append((positions, segments))
        else:
            ids, labels, starts = enc.conversation_with_answer_starts(qas, tokens)
        seqs.append((ids, labels))
        qa_weights = [type_weights.get(qa.get("type"), 1.0) if type_weights else 1.0 for qa in qas]
        if type_weights:
            weights.append(answer_token_weights(labels, qa_weights))
        patch_targets.append(patch_labels(scene))
        if placeholders:
            continue
        first_image = ids.index(tiny.IMAGE_TOKEN_ID)
        owners = patch_owners(scene)
        for qa, answer_start, weight in zip(qas, starts, qa_weights, strict=True):
            words = enc.attribute_positions(ids, answer_start)
            if words and weight > 0:
                question_looks.append((row, answer_start, words, weight))
            # the number box has no label in label_map: its question names no object to look at
            targets = [] if qa.get("type") == "number" else question_targets(scene, qa["question"], near_misses)
            if targets and weight > 0:
                patches = np.flatnonzero(np.isin(owners, targets))
                if patches.size:
                    looks.append((row, answer_start, (first_image + patches).tolist(), weight))
    batch = {"pixel_values": torch.stack(images), **padded_conversations(seqs),
             "patch_labels": torch.from_numpy(np.stack(patch_targets)), "looks": looks,
             "question_looks": question_looks, "squeeze": squeezes}
    if type_weights:
        batch["answer_weights"] = torch.zeros(batch["labels"].shape)
        for row, row_weights in enumerate(weights):
            batch["answer_weights"][row, : len(row_weights)] = torch.tensor(row_weights)
    if isolated:
        length = batch["input_ids"].shape[1]
        position_ids = torch.zeros(n, length, dtype=torch.long)
        segment_ids = torch.full((n, length), -1, dtype=torch.long)
        for row, (positions, segments) in enumerate(layouts):
            position_ids[row, : len(positions)] = torch.tensor(positions)
            segment_ids[row, : len(segments)] = torch.tensor(segments)
        batch["position_ids"] = position_ids
        batch["attention_mask"] = segment_attention(segment_ids, batch["attention_mask"].bool())
    return batch


def qa_forward(model: nn.Module, batch: dict) -> tuple[object, list[tuple[int, int, list[int], float]]]:
    """The LM's output for ``batch``, and its looks on the image tokens the LM really sees. Rows with a
    :class:`Squeeze` get their projected image features compressed by the library method (as vLLM serves them:
    the kept tokens at consecutive positions); a look then points at the output tokens its patches went into."""
    squeezes = batch.get("squeeze") or []
    if not any(squeezes):
        out = model.model(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
            position_ids=batch.get("position_ids"),
        )
        return out, batch["looks"]
    from vllm_tokcomp.methods import VisualTokens

    side = int(math.isqrt(tiny.NUM_IMAGE_TOKENS))
    features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    image_rows, destinations = [], {}
    for row, (squeeze, row_features) in enumerate(zip(squeezes, features, strict=True)):
        if squeeze is None:
            image_rows.append(row_features)
            continue
        result = squeeze.compressor()(VisualTokens(row_features, (side, side)), squeeze.budget)
        image_rows.append(result.features)
        destinations[row] = result.assignment.destination.tolist()
    image_mask = batch["input_ids"] == tiny.IMAGE_TOKEN_ID
    firsts = image_mask.int().argmax(1).tolist()  # each row's first image position, one device sync for all
    looks = []
    for row, query, cols, weight in batch["looks"]:
        if row in destinations:
            first = firsts[row]
            slots = sorted({destinations[row][c - first] for c in cols} - {-1})
            if not slots:  # everything it is about was dropped: nothing to look at
                continue
            cols = [first + slot for slot in slots]
        looks.append((row, query, cols, weight))
    embeds = model.model.get_input_embeddings()(batch["input_ids"])
    image_features = torch.cat(image_rows).to(embeds.dtype)
    embeds = embeds.masked_scatter(image_mask[..., None], image_features)
    return model.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                       position_ids=batch.get("position_ids")), looks


QUESTION_LOOK_HEAD = 3  # the first layer's head that already reads the shape word at the answer (bundled model)


def qa_loss(
    model: nn.Module, batch: dict, heads: ClipHeads | None = None, dense_weight: float = 0.0,
    look_weight: float = 0.0, position_weight: float = 0.0, metrics: dict | None = None,
    question_look_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer-token loss; with ``dense_weight`` > 0 plus the per-patch label loss on the features the
    projector reads (captured by a hook on the feature layer), so the tower keeps learning objects.
    With ``look_weight`` > 0 plus an attention-supervision term: at each answer's first prediction, one head
    (head 0) of every LM layer from the second on is pushed to put its attention on the image tokens of what
    the question is about (``-log`` of that attention mass), a shortcut past the slow phase in which the LM
    has to find out by itself which of 576 tokens matter. With ``position_weight`` > 0 plus
    :func:`position_loss` on the same features (its accuracies go into ``metrics`` when given).
    With ``question_look_weight`` > 0 plus the same kind of term for the text: at each answer's first prediction,
    head :data:`QUESTION_LOOK_HEAD` of the LM's first layer is pushed onto the words the question names objects by
    (its colour and shape words, ``batch["question_looks"]``), so the answer position carries them into the later
    layers' queries. Without it the trained model's answer position ignores colour words entirely (its layer-0
    attention on them is ~e-20, saturated, so no other loss's gradient reaches them) and head 0 cannot look for
    "the red object"."""
    captured: list[torch.Tensor] = []
    attention_inputs: list[tuple[nn.Module, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []
    first_layer_inputs: list[tuple[nn.Module, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []
    handles = []
    if dense_weight > 0 or position_weight > 0:
        layers = model.model.vision_tower.encoder.layers
        handles.append(layers[tiny.VISION_FEATURE_LAYER].register_forward_hook(lambda m, i, o: captured.append(o)))
    if look_weight > 0 and batch["looks"]:
        for layer in model.model.language_model.layers[1:]:
            handles.append(layer.self_attn.register_forward_pre_hook(
                lambda m, a, kw: attention_inputs.append((m, kw["hidden_states"], kw["position_embeddings"])),
                with_kwargs=True,
            ))
    question_looks = batch.get("question_looks") or []
    if question_look_weight > 0 and question_looks:
        handles.append(model.model.language_model.layers[0].self_attn.register_forward_pre_hook(
            lambda m, a, kw: first_layer_inputs.append((m, kw["hidden_states"], kw["position_embeddings"])),
            with_kwargs=True,
        ))
    try:
        out, looks = qa_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    hidden = out.last_hidden_state[:, :-1]
    target = batch["labels"][:, 1:]
    sel = target != -100
    logits = model.lm_head(hidden[sel])
    if "answer_weights" in batch:  # --type-weight
        weights = batch["answer_weights"][:, 1:][sel].to(logits.dtype)
        loss = (F.cross_entropy(logits, target[sel], reduction="none") * weights).sum() / weights.sum().clamp_min(1e-6)
    else:
        loss = F.cross_entropy(logits, target[sel])
    if dense_weight > 0:
        loss = loss + dense_weight * dense_loss(heads, captured[0][:, 1:], batch["patch_labels"])[0]
    if position_weight > 0:
        occupied = (batch["patch_labels"][..., :3] > 0).any(-1)  # colour, shape or digit: an object or the digit
        position, accuracy = position_loss(heads, captured[0][:, 1:], occupied)
        loss = loss + position_weight * position
        if metrics is not None:
            metrics.update(accuracy)
    mask = batch["attention_mask"]
    allowed = mask[:, 0] if mask.dim() == 4 else None  # packed single-turn questions; causal otherwise
    if attention_inputs and looks:
        loss = loss + look_weight * look_loss(attention_inputs, looks, allowed)
    if first_layer_inputs:
        loss = loss + question_look_weight * look_loss(first_layer_inputs, question_looks, allowed,
                                                       QUESTION_LOOK_HEAD)
    return loss, (logits.argmax(-1) == target[sel])


def look_loss(
    attention_inputs: list[tuple[nn.Module, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]],
    looks: list[tuple[int, int, list[int], float]],
    allowed: torch.Tensor | None = None,
    head: int = 0,
) -> torch.Tensor:
    """Mean over looks (weighted by each look's weight) and layers of ``-log`` (``head``'s attention mass on the
    look's targets). The head's attention row is recomputed from each layer's input for the supervised queries only
    (the forward itself runs SDPA, which returns no weights). ``allowed``: ``[B, T, T]``, what each token may attend to
    (packed single-turn questions); causal when None. Computed as ``logsumexp(all scores) - logsumexp(target
    scores)``, so a head that puts ~0 on its targets still gets the full gradient (a clamped ``-log(mass)`` would be
    flat there)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    device = attention_inputs[0][1].device
    rows = torch.tensor([look[0] for look in looks])
    queries = torch.tensor([look[1] for look in looks])
    weights = torch.tensor([float(look[3]) for look in looks], device=device)
    length = attention_inputs[0][1].shape[1]
    targets = torch.zeros(len(looks), length, dtype=torch.bool)
    for i, (_, _, cols, _) in enumerate(looks):
        targets[i, cols] = True
    rows, queries, targets = rows.to(device), queries.to(device), targets.to(device)
    if allowed is None:
        future = torch.arange(length, device=device)[None, :] > queries[:, None]
    else:
        future = ~allowed[rows, queries]
    terms = []
    for attn, hidden, (cos, sin) in attention_inputs:
        d = attn.head_dim
        kv_head = head // attn.num_key_value_groups
        cos, sin = cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)
        k = attn.k_proj(hidden)[..., kv_head * d:(kv_head + 1) * d][:, None]  # [B, 1, T, d]: the head's keys
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        q = attn.q_proj(hidden[rows, queries])[:, head * d:(head + 1) * d][:, None, None]  # [L, 1, 1, d]
        q, _ = apply_rotary_pos_emb(q, q, cos[rows, queries][:, None], sin[rows, queries][:, None])
        scores = torch.einsum("ld,ltd->lt", q[:, 0, 0], k[rows, 0]).float() * attn.scaling
        scores = scores.masked_fill(future, float("-inf"))
        terms.append(torch.logsumexp(scores, -1) - torch.logsumexp(scores.masked_fill(~targets, float("-inf")), -1))
    per_term = weights.repeat(len(terms))
    return (torch.cat(terms) * per_term).sum() / per_term.sum().clamp_min(1e-6)


def answer_correct(model: nn.Module, batch: dict) -> list[bool]:
    """Greedy exact match of each conversation's first answer (+ ``</s>``), by teacher forcing:
    greedy decoding emits the answer iff the argmax is right at every answer position."""
    with torch.no_grad():
        out, _ = qa_forward(model, batch)
        pred = model.lm_head(out.last_hidden_state[:, :-1]).argmax(-1)
    return first_answers_correct(pred.cpu(), batch["labels"].cpu())


def first_answers_correct(pred: torch.Tensor, labels: torch.Tensor, eos: int = tiny.EOS_TOKEN_ID) -> list[bool]:
    """Per row: is the argmax ``pred`` (``[B, T-1]``, predictions of tokens 1..T-1) right at every position of
    the first answer in ``labels`` (``[B, T]``, -100 outside answers), up to and including its ``</s>``."""
    target = labels[:, 1:]
    result = []
    for i in range(target.shape[0]):
        pos = (target[i] != -100).nonzero().flatten().tolist()
        first = []
        for p in pos:  # the first answer runs up to and including the first </s>
            first.append(p)
            if target[i, p].item() == eos:
                break
        result.append(all(pred[i, p].item() == target[i, p].item() for p in first))
    return result


# ----------------------------------------------------------------------------- loop
def lr_at(step: int, total: int, base: float, warmup: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 0.1 x ``base``; the decay follows the steps or, with a time limit,
    ``time_fraction`` (elapsed / limit), whichever is further on, so a run cut by time still ends decayed."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = max((step - warmup) / max(1, total - warmup), time_fraction)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class QABatches(torch.utils.data.Dataset):
    """QA step ``first + i``'s batch as item ``i``, so a DataLoader's workers render images in parallel and the
    batches are the ones the single-process loop would build."""

    def __init__(self, enc: QAEncoder, seed: int, first: int, steps: int, batch: int, per_image: int,
                 caption: bool, compress_prob: float = 0.0, isolated: bool = False,
                 near_misses: bool = False, type_weights: dict[str, float] | None = None,
                 min_objects: int = 1, drawing: Drawing = Drawing()) -> None:  # noqa: B008 - frozen
        self.enc, self.seed, self.first, self.steps = enc, seed, first, steps
        self.batch, self.per_image, self.caption, self.compress_prob = batch, per_image, caption, compress_prob
        self.isolated, self.near_misses, self.type_weights = isolated, near_misses, type_weights
        self.min_objects, self.drawing = min_objects, drawing

    def __len__(self) -> int:
        return max(0, self.steps - self.first)

    def __getitem__(self, i: int) -> dict:
        step = self.first + i
        return qa_batch(self.enc, self.seed, step * self.batch, self.batch, self.per_image, self.caption,
                        self.compress_prob, self.isolated, self.near_misses, type_weights=self.type_weights,
                        min_objects=self.min_objects, drawing=self.drawing)


def _as_is(item: dict) -> dict:
    return item


def qa_batches(dataset: QABatches, workers: int, pin: bool):  # noqa: ANN201 - iterable of batch dicts
    if workers == 0:
        return (dataset[i] for i in range(len(dataset)))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                       prefetch_factor=4, pin_memory=pin)


def save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokcomp_lab.train.llava", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="run folder; a ckpt.pt already there is resumed (it wins over --init)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (training split of the generator)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start a fresh run from these weights (safetensors, llava-hf names), e.g. a pre-trained "
                        "tower, or from another run's ckpt.pt (weights and per-patch heads); with --clip-steps 0 it "
                        "goes straight to QA")
    parser.add_argument("--init-lm", type=Path, default=None,
                        help="with --init: take the projector and the LM from these weights instead (safetensors or "
                        "ckpt.pt), e.g. a QA-trained model on top of a better pre-trained tower")
    parser.add_argument("--clip-steps", type=int, default=200)
    parser.add_argument("--clip-batch", type=int, default=32)
    parser.add_argument("--clip-lr", type=float, default=1e-3)
    parser.add_argument("--dense-weight", type=float, default=0.0, help="weight of the per-patch label loss")
    parser.add_argument("--sincos-positions", action="store_true", help="start position embeddings from 2-D sin-cos")
    parser.add_argument("--qa-steps", type=int, default=1000)
    parser.add_argument("--qa-batch", type=int, default=8)
    parser.add_argument("--qa-lr", type=float, default=1e-3)
    parser.add_argument("--tower-lr-scale", type=float, default=0.3, help="0 freezes the tower in the QA stage")
    parser.add_argument("--text-layers", type=int, default=tiny.TEXT_LAYERS,
                        help="LM depth; with --init from a shallower model the new layers start as identity blocks")
    parser.add_argument("--vision-hidden", type=int, default=None,
                        help=f"tower width for a run from scratch (heads of 32, MLP 4x; default {tiny.VISION_HIDDEN}); "
                             "with --init the tower's own")
    parser.add_argument("--vision-layers", type=int, default=None,
                        help=f"tower depth (default {tiny.VISION_LAYERS}); with --init from a shallower tower the new "
                             "layers start as identity blocks before the feature layer")
    parser.add_argument("--caption-turn", action="store_true", help="start each QA conversation with a caption turn")
    parser.add_argument("--qa-dense-weight", type=float, default=0.0, help="keep the per-patch loss during QA")
    parser.add_argument("--position-weight", type=float, default=0.0,
                        help="in QA, weight of a per-patch loss on each patch's column and row (position_loss)")
    parser.add_argument("--recenter-projector", action="store_true",
                        help="with --init: remove the shared direction of the image tokens (recenter_projector)")
    parser.add_argument("--look-weight", type=float, default=0.0,
                        help="weight of the attention supervision on what each question is about (qa_loss)")
    parser.add_argument("--question-look-weight", type=float, default=0.0,
                        help="weight of the attention supervision of the first LM layer's head "
                        f"{QUESTION_LOOK_HEAD} onto the colour and shape words of each question, at its answer "
                        "(qa_loss)")
    parser.add_argument("--look-at-near-misses", action="store_true",
                        help="with --look-weight: a 'no' to 'Is there a <colour> <shape>?' looks at the objects of "
                        "that colour or that shape (otherwise it has no look target)")
    parser.add_argument("--questions-per-image", type=int, default=6)
    parser.add_argument("--isolated-questions", action="store_true",
                        help="pack an image's questions as single-turn conversations (each sees the image and itself "
                        "only, as when served) instead of one multi-turn conversation whose later answers can be read "
                        "off earlier ones")
    parser.add_argument("--type-weight", action="append", default=[], metavar="TYPE=W",
                        help="weight of one question type's answers and looks in the QA loss (others 1), e.g. "
                        "shape=3: lab/benchmarks/binding_probe.py found the LM finding objects by shape far better "
                        "than by colour; repeat for several types")
    parser.add_argument("--min-objects", type=int, default=1,
                        help=f"QA images with at least this many objects (1-{MAX_OBJECTS}; 1: the generator's own "
                        "mix): accuracy falls with every distractor, so a run can train on crowded scenes (above 3 "
                        "there are no digit images: they hold at most 3 objects)")
    parser.add_argument("--spec-version", type=int, choices=(1, 2), default=1,
                        help="the data spec QA images are drawn and worded by (docs/dataset.md); validation too")
    parser.add_argument("--strokes", default=None,
                        help="spec v2: digit stroke widths training images draw from, e.g. 3,4 (default: the spec's 3)")
    parser.add_argument("--size-jitter", type=float, default=0.0, help="spec v2: object box sides x (1 +- this)")
    parser.add_argument("--color-jitter", type=int, default=0, help="spec v2: per-object colour offsets +- this")
    parser.add_argument("--both-spellings", action="store_true", help="spec v2: 'crosses' or 'crosss', half each")
    parser.add_argument("--hard-share", type=float, default=0.0,
                        help="spec v2: draw this share of the QA images (0-1) as harder-split scenes with its "
                        "questions (data/hard.py), from a training stream of their own")
    parser.add_argument("--v1-share", type=float, default=0.0,
                        help="spec v2: draw this share of the other QA images (0-1) exactly as spec v1 draws and "
                        "words them, so the run keeps v1's test split")
    parser.add_argument("--rope-theta", type=float, default=None,
                        help="the LM's rotary base (default: --init-lm's, else --init's, else "
                        f"{tiny.ROPE_THETA:g}); a larger one turns the keys of far-apart image patches less against "
                        "each other. Recorded in the exported weights, so the built and served model use it")
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-images", type=int, default=64, help="validation images checked at each save")
    parser.add_argument("--tokenizer-json", type=Path, default=None,
                        help="a model folder's tokenizer.json to use instead of training the tokenizer here")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (for a GPU; this CPU has no bf16 units)")
    parser.add_argument("--workers", type=int, default=0, help="processes that render QA batches ahead of the steps")
    parser.add_argument("--compress-prob", type=float, default=0.0,
                        help="compress each QA image with this probability (a random method of AUGMENT_METHODS to a "
                        "random budget of AUGMENT_BUDGETS), so the LM learns to read the shortened images it is served")
    parser.add_argument("--eval-squeeze", default=None, metavar="METHOD:BUDGET",
                        help="also validate on images compressed this way, e.g. uniform:64")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="seconds of QA training: stop then (learning rate decayed by then), checkpoint, export")
    args = parser.parse_args(argv)
    eval_squeeze = None
    if args.eval_squeeze:
        from vllm_tokcomp.methods import available_methods, method_class

        method, _, budget = args.eval_squeeze.partition(":")
        if not budget.isdigit() or not 0 < int(budget) < tiny.NUM_IMAGE_TOKENS:
            parser.error(f"--eval-squeeze wants METHOD:BUDGET with 0 < BUDGET < {tiny.NUM_IMAGE_TOKENS}, "
                         f"got {args.eval_squeeze!r}")
        if method not in available_methods() or method_class(method).required_signals():
            parser.error(f"--eval-squeeze: {method!r} is not a library method that works from the features alone "
                         f"(e.g. {', '.join(AUGMENT_METHODS)})")
        eval_squeeze = Squeeze(method, int(budget))
    if not 0 <= args.compress_prob <= 1:
        parser.error(f"--compress-prob must be in [0, 1], got {args.compress_prob}")
    if args.tower_lr_scale == 0 and (args.qa_dense_weight > 0 or args.position_weight > 0):
        parser.error("--qa-dense-weight and --position-weight train the tower, which --tower-lr-scale 0 freezes")
    if not 0 <= args.question_look_weight < math.inf:
        parser.error(f"--question-look-weight must be a finite number >= 0, got {args.question_look_weight}")
    if args.look_at_near_misses and args.look_weight <= 0:
        parser.error("--look-at-near-misses adds look targets, which only --look-weight > 0 trains")
    type_weights = parse_type_weights(args.type_weight, parser.error)
    try:
        strokes = tuple(int(t) for t in args.strokes.split(",")) if args.strokes else RenderingRange().strokes
        drawing = Drawing(args.spec_version,
                          RenderingRange(strokes, args.size_jitter, args.color_jitter, args.both_spellings),
                          args.hard_share, args.v1_share)
    except ValueError as error:
        parser.error(f"rendering variation: {error}")
    if drawing.renderings.varies and drawing.spec_version < 2:
        parser.error("--strokes, --size-jitter, --color-jitter and --both-spellings need --spec-version 2")
    if not 0 <= args.hard_share <= 1:
        parser.error(f"--hard-share must be in [0, 1], got {args.hard_share}")
    if args.hard_share > 0 and drawing.spec_version < 2:
        parser.error("--hard-share needs --spec-version 2 (the harder split is drawn as spec v2)")
    if not 0 <= args.v1_share <= 1:
        parser.error(f"--v1-share must be in [0, 1], got {args.v1_share}")
    if args.v1_share > 0 and drawing.spec_version < 2:
        parser.error("--v1-share needs --spec-version 2 (a v1 run draws every image as v1)")
    if not 1 <= args.min_objects <= MAX_OBJECTS:
        parser.error(f"--min-objects must be 1-{MAX_OBJECTS} (a scene has at most {MAX_OBJECTS} objects), "
                     f"got {args.min_objects}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "log.jsonl", "a")
    if args.init_lm is not None and args.init is None:
        parser.error("--init-lm replaces part of --init's weights; give --init too")
    init_state = None
    if args.init is not None:  # read on resume too: the tower's sizes come from it
        init_heads, init_state, geometry = read_init(args.init)
        if args.init_lm is not None:
            _, donor, donor_geometry = read_init(args.init_lm)
            init_state = with_language_side(init_state, donor)
            geometry = dataclasses.replace(geometry, rope_theta=donor_geometry.rope_theta)
        if args.vision_hidden not in (None, geometry.vision_hidden):
            parser.error(f"--vision-hidden {args.vision_hidden}: --init's tower is {geometry.vision_hidden} wide")
        if args.vision_layers is not None and args.vision_layers < geometry.vision_layers:
            parser.error(f"--vision-layers {args.vision_layers}: --init's tower has {geometry.vision_layers} layers")
        geometry = dataclasses.replace(geometry, text_layers=args.text_layers,
                                       vision_layers=args.vision_layers or geometry.vision_layers)
    else:
        hidden = args.vision_hidden or tiny.VISION_HIDDEN
        geometry = tiny.Geometry(text_layers=args.text_layers, vision_hidden=hidden,
                                 vision_layers=args.vision_layers or tiny.VISION_LAYERS, vision_intermediate=4 * hidden)
    inherited_theta = geometry.rope_theta
    ckpt_path = args.out / "ckpt.pt"
    resumed = torch.load(ckpt_path, weights_only=False, map_location="cpu") if ckpt_path.exists() else None
    if resumed is not None:  # the run goes on with the rotary base it started with
        started = tiny.rope_theta_of(resumed.get("metadata"))
        if args.rope_theta not in (None, started):
            parser.error(f"--rope-theta {args.rope_theta:g}: the run in {args.out} was started with {started:g}")
        geometry = dataclasses.replace(geometry, rope_theta=started)
    elif args.rope_theta is not None:
        try:
            geometry = dataclasses.replace(geometry, rope_theta=args.rope_theta)
        except ValueError as error:
            parser.error(f"--rope-theta: {error}")
        if init_state is not None and args.rope_theta != inherited_theta:
            print(f"rotary base {inherited_theta:g} -> {args.rope_theta:g}: the LM's attention relearns its positions",
                  flush=True)
    model = build_model(geometry)
    heads = ClipHeads(model.config.vision_config.hidden_size)
    if init_state is not None and resumed is None:
        if init_heads is not None:
            load_heads(heads, init_heads)
        load_llava_hf_state(model, tower_deepened(deepened(init_state, args.text_layers), geometry.vision_layers))
        if args.recenter_projector:
            print("recentred projector:", recenter_projector(model, args.seed), flush=True)
    elif args.sincos_positions:
        with torch.no_grad():
            table = model.model.vision_tower.embeddings.position_embedding.weight
            table.copy_(sincos_positions(table.shape[1]))
    enc = QAEncoder(args.tokenizer_json)
    stage, step = "clip", 0
    clip_opt = torch.optim.AdamW(
        list(model.model.vision_tower.parameters()) + list(heads.parameters()), lr=args.clip_lr, weight_decay=0.05
    )
    tower = set(id(p) for p in model.model.vision_tower.parameters())
    qa_opt = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if id(p) in tower], "scale": args.tower_lr_scale},
            {"params": [p for p in model.parameters() if id(p) not in tower], "scale": 1.0},
            {"params": list(heads.dense.parameters()) + list(heads.position.parameters()), "scale": 1.0},
        ],
        lr=args.qa_lr,
        weight_decay=0.0,
    )
    if resumed is not None:  # loaded onto the CPU: a GPU run resumes anywhere
        model.load_state_dict(resumed["model"])
        load_heads(heads, resumed["heads"])
        clip_opt.load_state_dict(resumed["clip_opt"])
        stage, step = resumed["stage"], resumed["step"]
        if stage == "qa" and step > 0:  # before that the QA optimizer holds nothing worth restoring
            qa_opt.load_state_dict(resumed["qa_opt"])
        resumed = None  # the CPU copy of the weights and optimizer state is no longer needed
        ignored = " (--init/--init-lm ignored: the run in OUT goes on)" if args.init is not None else ""
        print(f"resumed {ckpt_path} at {stage} step {step}{ignored}", flush=True)

    def checkpoint() -> None:
        save(ckpt_path, {"model": model.state_dict(), "heads": heads.state_dict(), "clip_opt": clip_opt.state_dict(),
                         "qa_opt": qa_opt.state_dict(), "stage": stage, "step": step,
                         "metadata": geometry.metadata()})

    device = torch.device(args.device)
    model.to(device)
    heads.to(device)
    for opt in (clip_opt, qa_opt):  # optimizer state restored on the CPU follows its parameters
        for state in opt.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    state[key] = value.to(device)

    def autocast():  # noqa: ANN202
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def export() -> None:
        from safetensors.torch import save_file

        save_file(export_state(model), str(args.out / "model.safetensors"),
                  metadata={"format": "pt", **geometry.metadata()})
        # weights + per-patch heads, the form --init reads, without optimizer state (a tenth of ckpt.pt)
        save(args.out / "weights_and_heads.pt", {"model": {k: v.detach().to("cpu", torch.bfloat16)
                                                           for k, v in model.state_dict().items()},
                                                 "heads": {k: v.detach().cpu() for k, v in heads.state_dict().items()},
                                                 "metadata": geometry.metadata()})

    model.train()
    t0 = time.perf_counter()
    if stage == "clip":
        while step < args.clip_steps:
            for group in clip_opt.param_groups:
                group["lr"] = lr_at(step, args.clip_steps, args.clip_lr, 20)
            images, captions, labels = clip_batch(args.seed, 10_000_000 + step * args.clip_batch, args.clip_batch)
            with autocast():
                loss, acc, dense_acc = clip_loss(model, heads, images.to(device), captions, labels.to(device),
                                                 args.dense_weight)
            clip_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clip_opt.param_groups[0]["params"], 1.0)
            clip_opt.step()
            step += 1
            rec = {"stage": "clip", "step": step, "loss": round(loss.item(), 4), "acc": round(acc, 3),
                   "dense_acc": dense_acc, "s": round(time.perf_counter() - t0, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if step % 10 == 0:
                print(rec, flush=True)
            if step % args.save_every == 0:
                checkpoint()
        stage, step = "qa", 0
        checkpoint()

    if args.tower_lr_scale == 0:  # no gradient through the tower at all: its backward is a third of a step
        model.model.vision_tower.requires_grad_(False)
    val_batches: dict[Squeeze | None, list] = {}  # rendered once per compression (None: uncompressed)

    def val_accuracy(squeeze: Squeeze | None) -> tuple[float, dict]:
        if squeeze not in val_batches:
            val_batches[squeeze] = [val_batch(enc, args.seed, i, 16, squeeze, spec_version=drawing.spec_version)
                                    for i in range(0, args.eval_images, 16)]
        correct = []
        with autocast():
            for vb, types in val_batches[squeeze]:
                correct += list(zip(types, answer_correct(model, to_device(vb, device)), strict=True))
        kinds = sorted({t for t, _ in correct})
        per_type = {t: round(float(np.mean([c for tt, c in correct if tt == t])), 3) for t in kinds}
        return round(float(np.mean([c for _, c in correct])), 3), per_type

    def validate() -> None:
        model.eval()
        acc, per_type = val_accuracy(None)
        erec = {"stage": "qa-val", "step": step, "acc": acc, "per_type": per_type}
        if eval_squeeze is not None:
            erec[f"acc_{eval_squeeze.method}{eval_squeeze.budget}"], _ = val_accuracy(eval_squeeze)
        erec["s"] = round(time.perf_counter() - t0, 1)
        print(erec, flush=True)
        log.write(json.dumps(erec) + "\n")
        log.flush()
        model.train()

    t_qa = time.perf_counter()
    batches = qa_batches(QABatches(enc, args.seed, step, args.qa_steps, args.qa_batch, args.questions_per_image,
                                   args.caption_turn, args.compress_prob, args.isolated_questions,
                                   args.look_at_near_misses, type_weights, args.min_objects, drawing),
                         args.workers, pin=device.type == "cuda")
    out_of_time = False
    for batch in batches:
        elapsed = time.perf_counter() - t_qa
        out_of_time = bool(args.time_limit) and elapsed >= args.time_limit
        if out_of_time:
            break
        for group in qa_opt.param_groups:
            fraction = elapsed / args.time_limit if args.time_limit else 0.0
            group["lr"] = lr_at(step, args.qa_steps, args.qa_lr, 30, fraction) * group["scale"]
        with autocast():
            metrics: dict[str, float] = {}
            loss, hits = qa_loss(model, to_device(batch, device), heads, args.qa_dense_weight, args.look_weight,
                                 args.position_weight, metrics, args.question_look_weight)
        qa_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        qa_opt.step()
        step += 1
        if step % 10 == 0 or step % args.save_every == 0:
            rec = {"stage": "qa", "step": step, "loss": round(loss.item(), 4),
                   "tok_acc": round(hits.float().mean().item(), 3), **metrics,
                   "s": round(time.perf_counter() - t0, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(rec, flush=True)
        if step % args.save_every == 0 or step == args.qa_steps:
            checkpoint()
            export()
            if args.eval_images and (step % (args.save_every * 4) == 0 or step == args.qa_steps):
                validate()
    if out_of_time:
        checkpoint()
        export()
        if args.eval_images:
            validate()
    return 0


def val_question(seed: int, index: int, spec_version: int = 1) -> tuple[object, dict]:
    """Validation image ``index``'s scene and the question checked on it: one of the two the generated val
    split has for it (alternating by index, so every question type is checked)."""
    rng = scene_rng(seed, "val", index)
    scene = make_scene(rng, spec_version=spec_version)
    questions = make_questions(scene, rng, 2)  # the same as the generated val split (2 per image)
    return scene, questions[index % len(questions)]


def padded_conversations(seqs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """``input_ids`` (pad-filled), ``labels`` (-100-filled) and ``attention_mask`` of ``(ids, labels)``
    conversations, right-padded to the longest."""
    n, length = len(seqs), max(len(ids) for ids, _ in seqs)
    batch = {
        "input_ids": torch.full((n, length), tiny.PAD_TOKEN_ID, dtype=torch.long),
        "labels": torch.full((n, length), -100, dtype=torch.long),
        "attention_mask": torch.zeros((n, length), dtype=torch.long),
    }
    for i, (ids, lab) in enumerate(seqs):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["labels"][i, : len(lab)] = torch.tensor(lab)
        batch["attention_mask"][i, : len(ids)] = 1
    return batch


def val_batch(enc: QAEncoder, seed: int, start: int, n: int, squeeze: Squeeze | None = None,
               placeholders: int | None = None, spec_version: int = 1) -> tuple[dict, list[str]]:
    """Validation-split images, one question each (:func:`val_question`), each compressed by ``squeeze`` if given
    (``placeholders``: that many image tokens instead, for a learned connector)."""
    images, seqs, types = [], [], []
    for index in range(start, start + n):
        scene, qa = val_question(seed, index, spec_version)
        images.append(pixels(render_scene(scene)))
        seqs.append(enc.conversation([qa], placeholders or image_tokens(squeeze)))
        types.append(qa["type"])
    return {**padded_conversations(seqs), "pixel_values": torch.stack(images), "looks": [],
            "squeeze": [squeeze] * n}, types


if __name__ == "__main__":
    raise SystemExit(main())
