"""The signals the served methods read, computed on transformers models (no vLLM): for tools and benchmarks.

The same quantities the vLLM integration captures inside vLLM's modules (integration/clip_signals.py,
integration/mustdrop_tower.py, integration/lm_probe.py), computed on transformers' CLIP and Llama: [CLS]
attention and keys of the tower's feature layer, MustDrop's stage-1 merge inside the tower, and the LM probe's
text-to-image attention. Used by ``tokcomp show`` and ``benchmarks/gpu_llava.py`` (which runs where vLLM is not
installed).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .integration.clip_signals import VisionSignals, cls_signals_from_qk
from .methods import TokenAssignment
from .methods.mustdrop_stages import MustDropStage1

GRID = (24, 24)  # LLaVA-1.5: 336 px / 14 px patches
PROBE_LAYER = 2  # MustDrop's first pruning layer, as the served LM probe


def vision_transformer(tower: nn.Module) -> nn.Module:
    """The module holding ``embeddings``, ``pre_layrnorm`` and ``encoder`` (transformers 5.19 flattened
    ``CLIPVisionModel.vision_model`` into the model itself; earlier releases keep it)."""
    return getattr(tower, "vision_model", tower)


def _layer(layer: nn.Module, hidden: Tensor) -> Tensor:
    out = layer(hidden, None)  # transformers 5: (hidden_states, attention_mask); a ViT has no mask
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def capture_cls_signals(tower: nn.Module):
    """While active, the q and k of every layer (the feature layer's last), for the [CLS]→patch attention
    (head-averaged) of every layer and the feature layer's patch keys, per image."""
    layers = vision_transformer(tower).encoder.layers
    store: dict[str, list[Tensor]] = {"q": [None] * len(layers), "k": [None] * len(layers)}
    hooks = []
    for index, layer in enumerate(layers):
        for name in ("q", "k"):
            projection = getattr(layer.self_attn, f"{name}_proj")
            hooks.append(projection.register_forward_hook(
                lambda _m, _i, out, name=name, index=index: store[name].__setitem__(index, out)))
    try:
        yield store
    finally:
        for hook in hooks:
            hook.remove()


def cls_signals(store: dict[str, list[Tensor]], heads: int) -> list[VisionSignals]:
    """Per image the [CLS]→patch attention and patch keys of the feature layer and the [CLS] attention of every
    layer, from the q and k :func:`capture_cls_signals` captured (the served path's own computation,
    ``clip_signals.cls_signals_from_qk``)."""
    per_layer = [cls_signals_from_qk(q, k, heads, q.shape[-1] // heads, q.shape[1] - 1)
                 for q, k in zip(store["q"], store["k"], strict=True) if q is not None]  # the layers that ran
    return [dataclasses.replace(last, layer_cls_attention=torch.stack([layer[i].cls_attention for layer in per_layer]))
            for i, last in enumerate(per_layer[-1])]


def encode(tower: nn.Module, projector: nn.Module, images: Tensor) -> tuple[Tensor, list[VisionSignals]]:
    """Projected patch features ``[B, 576, D]`` and per image [CLS] attention and keys of the feature layer, for a
    tower built up to its feature layer (as vLLM builds LLaVA's: the last layer is the feature layer)."""
    with capture_cls_signals(tower) as store:
        hidden = tower(pixel_values=images).last_hidden_state
    return projector(hidden[:, 1:]), cls_signals(store, tower.config.num_attention_heads)


@dataclass(frozen=True)
class TowerMerge:
    features: Tensor  # [M, D] projected features of the tokens that survived the stage-1 merge
    sizes: Tensor  # [M] patches per token
    signals: VisionSignals  # [CLS] attention and keys of the feature layer over them
    assignment: TokenAssignment  # the image's patches -> the M tokens


def encode_with_stage1(tower: nn.Module, projector: nn.Module, image: Tensor, budget: int,
                       stage1: MustDropStage1, grid: tuple[int, int] = GRID) -> TowerMerge:
    """One image with MustDrop's stage-1 window merge after layer 0 (never below ``budget``), as the served
    LLaVA path runs it (integration/mustdrop_tower.py)."""
    model = vision_transformer(tower)
    layers = model.encoder.layers
    dtype = next(tower.parameters()).dtype
    hidden = _layer(layers[0], model.pre_layrnorm(model.embeddings(image[None].to(dtype))))
    assignment, sizes, merged = stage1.merge_in_tower(hidden[0, 1:], grid, budget)
    hidden = torch.cat([hidden[0, :1], merged.to(hidden.dtype)], dim=0)[None]
    with capture_cls_signals(tower) as store:
        for layer in layers[1:]:
            hidden = _layer(layer, hidden)
    signals = cls_signals(store, tower.config.num_attention_heads)[0]
    return TowerMerge(projector(hidden[0, 1:]), sizes, signals, assignment)


def probe_text_attention(decoder: nn.Module, vision: Tensor, text: Tensor, probe_layer: int = PROBE_LAYER) -> Tensor:
    """``[T, N]`` head-averaged attention of the text tokens to the visual tokens at ``probe_layer``, from the LM's
    own first layers over ``[vision; text]`` (causal), as the served LM probe computes it."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = decoder  # a transformers LlamaModel: ``layers`` and ``rotary_emb``
    hidden = torch.cat([vision, text.to(vision.dtype)])[None]
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    cos, sin = model.rotary_emb(hidden, positions)
    n = vision.shape[0]
    for index, layer in enumerate(model.layers[: probe_layer + 1]):
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        shape = (1, hidden.shape[1], -1, attention.head_dim)
        q = attention.q_proj(normed).view(shape).transpose(1, 2)
        k = attention.k_proj(normed).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if index == min(probe_layer, len(model.layers) - 1):
            logits = (q[0, :, n:].float() @ k[0].float().transpose(1, 2)) * attention.scaling  # [H, T, S]
            causal = torch.ones(logits.shape[1:], dtype=torch.bool, device=logits.device).tril(n)
            return logits.masked_fill(~causal, float("-inf")).softmax(-1)[:, :, :n].mean(0)
        v = attention.v_proj(normed).view(shape).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(1, hidden.shape[1], -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    raise AssertionError("unreachable")
