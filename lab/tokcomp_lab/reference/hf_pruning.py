"""Pruning inside the LM as published, on a transformers LLaVA: the references the served methods are compared with.

MustDrop (:class:`MustDropReference`, below) and FastV (:class:`FastVReference`) share one layer-by-layer
forward; only the rule that drops visual tokens, and whether earlier layers' KV is cut, differ.

Liu et al., "Multi-Stage Vision Token Dropping" (arXiv:2411.10803), written plainly, one request at a time
(a batch is a list; every request prunes differently):

1. **Vision encoding**: after the tower's first layer the patch grid is cut into non-overlapping
   ``window x window`` windows; a window whose patches' mean pairwise cosine similarity is at least
   ``threshold`` collapses into one token (their mean), placed at the window's centre patch. The remaining
   layers run on the merged sequence. The *key set* is the ``ceil(key_ratio * M)`` tokens the last layer's
   [CLS] attends to most (head-averaged).
2. **Prefill**: the LM runs layer by layer; at each layer in ``prune_layers`` the head-averaged attention of
   the text tokens after the image to each visual token gives ``g_j`` (sum over text rows) and ``m_j`` (max);
   a visual token outside the key set is dropped when ``g_j < global_threshold * sum(g)`` **and**
   ``m_j < individual_threshold``. Dropped tokens leave the hidden states from that layer's output on.
3. **Decode ("output-aware cache")**: the KV cache of the layers that already ran (the shallow ones) is cut
   to the survivors too, so every decoding step attends only to surviving visual tokens. Survivors keep their
   original positions; decoding continues at the uncompressed length.

The LM forward is written out with the model's own modules (norms, projections, rotary embedding, MLP) and
plain softmax attention, so the per-layer attention probabilities exist; with both stages off it gives the
same greedy tokens as ``model.generate`` (tested). No vLLM import here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class MustDropReference:
    threshold: float = 0.8
    window: int = 3
    key_ratio: float = 0.08
    prune_layers: tuple[int, ...] = (2, 6, 10, 14)
    global_threshold: float = 0.001
    individual_threshold: float = 0.001
    stage1: bool = True
    stage2: bool = True


@dataclass(frozen=True)
class FastVReference:
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv:2403.06764) as published: after
    LM layer ``layer`` (0-based; the paper's K = 2 is our ``layer=1``, the output of the second layer), the
    visual tokens are ranked by the attention they receive at that layer, averaged over heads and over every
    query row, and only the top ``keep`` go on to the deeper layers. The shallow layers' KV is not cut (FastV
    has no stage 3). A fixed-budget in-LM method, the baseline MustDrop's stage 2 is usually compared with."""

    layer: int = 1
    keep: int = 64


@dataclass
class ReferenceOutput:
    tokens: list[int]
    visual_after_stage1: int  # visual tokens entering the LM
    visual_per_layer: list[int] = field(default_factory=list)  # visual tokens each LM layer saw in prefill
    visual_in_cache: list[int] = field(default_factory=list)  # per layer, visual tokens in its KV at decode
    key_set_size: int = 0
    visual_kept: list[int] = field(default_factory=list)  # indices (after stage 1) of the prefill's survivors


# ----------------------------------------------------------------------------- stage 1: the tower
def _clip_cls_attention(layer: nn.Module, hidden: Tensor) -> Tensor:
    """Head-averaged attention of [CLS] over the other tokens in a CLIP encoder layer."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)[0]
    heads = attn.num_heads
    q = attn.q_proj(x[:1]).reshape(1, heads, -1).transpose(0, 1)
    k = attn.k_proj(x).reshape(x.shape[0], heads, -1).transpose(0, 1)
    probs = torch.softmax((q @ k.transpose(1, 2)) * attn.scale, dim=-1)  # [heads, 1, T]
    return probs.mean(0)[0, 1:]


def window_merge_plain(patches: Tensor, side: int, window: int, threshold: float) -> tuple[Tensor, list[int]]:
    """Stage 1 on one image's ``side x side`` patches: (merged tokens in raster order of their anchors, anchors)."""
    unit = F.normalize(patches.float(), dim=-1)
    outputs: dict[int, Tensor] = {}
    for top in range(0, side, window):
        for left in range(0, side, window):
            rows = range(top, min(top + window, side))
            cols = range(left, min(left + window, side))
            members = [r * side + c for r in rows for c in cols]
            n = len(members)
            if n > 1:
                sims = unit[members] @ unit[members].T
                mean_pairwise = (sims.sum() - sims.diagonal().sum()) / (n * (n - 1))
            if n > 1 and float(mean_pairwise) >= threshold:
                centre = rows[(len(rows) - 1) // 2] * side + cols[(len(cols) - 1) // 2]
                outputs[centre] = patches[members].mean(0)
            else:
                outputs.update({m: patches[m] for m in members})
    anchors = sorted(outputs)
    return torch.stack([outputs[a] for a in anchors]), anchors


def encode_image(model: nn.Module, pixel_values: Tensor, cfg: MustDropReference) -> tuple[Tensor, Tensor]:
    """Projected visual tokens ``[M, D]`` and the key set (indices into them)."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    feature_index = len(layers) + 1 + model.config.vision_feature_layer  # into [embeddings, layer 0, ...]
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values[None].to(tower.dtype)))
    states = [hidden]
    for index, layer in enumerate(layers):
        if index == 1 and cfg.stage1:
            patches = hidden[0, 1:]
            side = math.isqrt(patches.shape[0])
            merged, _ = window_merge_plain(patches, side, cfg.window, cfg.threshold)
            hidden = torch.cat([hidden[:, :1], merged[None].to(hidden.dtype)], dim=1)
            states[-1] = hidden
        if index == len(layers) - 1:
            cls_attention = _clip_cls_attention(layer, hidden)
        hidden = layer(hidden, None)  # transformers 5: (hidden_states, attention_mask); no mask in a ViT
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        states.append(hidden)
    features = states[feature_index][0, 1:]
    visual = model.model.multi_modal_projector(features)
    m = visual.shape[0]
    k = min(m, math.ceil(cfg.key_ratio * m - 1e-9))
    order = torch.sort(cls_attention.float(), descending=True, stable=True).indices
    return visual, torch.sort(order[:k]).values


# ----------------------------------------------------------------------------- stages 2 and 3: the LM
def _attend(layer: nn.Module, x: Tensor, positions: Tensor, cache: list[Tensor] | None, rotary: nn.Module,
            causal: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One self-attention; returns (output, attention probs [H, Tq, Tk], new keys, new values)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    head_dim = attn.head_dim
    t = x.shape[0]
    q = attn.q_proj(x).view(t, -1, head_dim).transpose(0, 1)
    k = attn.k_proj(x).view(t, -1, head_dim).transpose(0, 1)
    v = attn.v_proj(x).view(t, -1, head_dim).transpose(0, 1)
    cos, sin = rotary(x[None], positions[None])
    q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
    q, k = q[0], k[0]
    if cache is not None:
        k = torch.cat([cache[0], k], dim=1)
        v = torch.cat([cache[1], v], dim=1)
    groups = q.shape[0] // k.shape[0]
    keys, values = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    scores = (q @ keys.transpose(1, 2)) * attn.scaling
    if causal:
        mask = torch.ones(t, keys.shape[1], dtype=torch.bool).tril(keys.shape[1] - t)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = (probs @ values).transpose(0, 1).reshape(t, -1)
    return attn.o_proj(out), probs, k, v


def _dual_filter(probs: Tensor, text_rows: Tensor, visual_cols: Tensor, keep_always: Tensor,
                 cfg: MustDropReference) -> Tensor:
    """Which of ``visual_cols`` survive (bool per column)."""
    a = probs.float().mean(0)[text_rows][:, visual_cols]  # [text, visual]
    g, m = a.sum(0), a.max(0).values
    drop = (g < cfg.global_threshold * g.sum()) & (m < cfg.individual_threshold)
    return ~drop | keep_always


@torch.no_grad()
def generate(model: nn.Module, input_ids: list[int], pixel_values: Tensor, cfg: MustDropReference | FastVReference,
             max_new_tokens: int, eos_token_id: int | None = None) -> ReferenceOutput:
    """Greedy decoding of one prompt holding one image placeholder (``model.config.image_token_index``)."""
    # FastV has no tower stage and no key set: the plain tower.
    tower_cfg = cfg if isinstance(cfg, MustDropReference) else MustDropReference(stage1=False, key_ratio=0.0)
    visual, key_set = encode_image(model, pixel_values, tower_cfg)
    lm = model.model.language_model
    at = input_ids.index(model.config.image_token_index)
    ids = torch.tensor(input_ids)
    embed = lm.embed_tokens
    hidden = torch.cat([embed(ids[:at]), visual.to(embed.weight.dtype), embed(ids[at + 1:])])
    m = visual.shape[0]
    kinds = torch.cat([torch.zeros(at), torch.ones(m), 2 * torch.ones(len(input_ids) - at - 1)]).long()
    visual_index = torch.full((hidden.shape[0],), -1, dtype=torch.long)
    visual_index[at:at + m] = torch.arange(m)
    positions = torch.arange(hidden.shape[0])
    is_key = torch.zeros(m, dtype=torch.bool)
    is_key[key_set] = True
    out = ReferenceOutput(tokens=[], visual_after_stage1=m, key_set_size=int(key_set.numel()))
    cache: list[list[Tensor]] = []
    for index, layer in enumerate(lm.layers):
        out.visual_per_layer.append(int((kinds == 1).sum()))
        attn_out, probs, k, v = _attend(layer, layer.input_layernorm(hidden), positions, None, lm.rotary_emb, True)
        cache.append([k, v])
        hidden = hidden + attn_out
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        survive = None
        cols = (kinds == 1).nonzero().flatten()
        if isinstance(cfg, FastVReference):
            if index == cfg.layer and cols.numel() > cfg.keep:
                received = probs.float().mean(0).mean(0)[cols]  # heads, then every query row
                top = torch.sort(received, descending=True, stable=True).indices[: cfg.keep]
                survive = torch.zeros(cols.numel(), dtype=torch.bool)
                survive[top] = True
        elif cfg.stage2 and index in cfg.prune_layers and (kinds == 2).any():
            survive = _dual_filter(probs, (kinds == 2).nonzero().flatten(), cols, is_key[visual_index[cols]], cfg)
        if survive is not None:
            keep = torch.ones(hidden.shape[0], dtype=torch.bool)
            keep[cols[~survive]] = False
            hidden, kinds, positions, visual_index = hidden[keep], kinds[keep], positions[keep], visual_index[keep]
            if isinstance(cfg, MustDropReference):  # stage 3: the layers that already ran forget them too
                for entry in cache:
                    entry[0], entry[1] = entry[0][:, keep], entry[1][:, keep]
    out.visual_in_cache = [entry[0].shape[1] - int((kinds != 1).sum()) for entry in cache]
    out.visual_kept = visual_index[kinds == 1].tolist()
    next_position = len(input_ids) - 1 + m  # survivors keep their positions; decoding continues after them
    token = int(model.lm_head(lm.norm(hidden[-1:]))[0].argmax())
    while True:
        out.tokens.append(token)
        if len(out.tokens) >= max_new_tokens or token == eos_token_id:
            return out
        x = embed(torch.tensor([token]))
        position = torch.tensor([next_position])
        for layer, entry in zip(lm.layers, cache, strict=True):
            attn_out, _, k, v = _attend(layer, layer.input_layernorm(x), position, entry, lm.rotary_emb, False)
            entry[0], entry[1] = k, v
            x = x + attn_out
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        next_position += 1
        token = int(model.lm_head(lm.norm(x))[0].argmax())
