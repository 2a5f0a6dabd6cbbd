"""Text→vision attention from the LM's own first layers, before any KV cache exists.

MustDrop's prefill stage ranks visual tokens by the attention text tokens pay
them inside the LM. We need that ranking while the prompt's placeholders are
still being decided, so we run a *probe*: the first decoder layers over
``[vision tokens; text query]`` with the real weights and plain (non-paged)
attention, and read the head-averaged attention of every text token to every
visual token at ``probe_layer``. The probe only decides *which* tokens; the
count was fixed at processing time.

Checked against vLLM 0.32.0 Llama-family decoder layers (``input_layernorm``
with fused residual, ``self_attn.qkv_proj/rotary_emb/o_proj`` with
``q_size/kv_size/num_heads/total_num_heads/num_kv_heads/head_dim/scaling``,
``mlp``). Under tensor parallelism the layers below the probe are exact (vLLM's
row-parallel ``o_proj`` and ``mlp`` all-reduce), and the probe layer's per-rank
head sums are all-reduced, so every rank reads the single-GPU average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vllm_api import sum_head_shards

DEFAULT_PROBE_LAYER = 2  # MustDrop's first pruning layer


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    return language_model.model.layers


def text_to_vision_attention(
    language_model: nn.Module, vision: Tensor, text: Tensor, probe_layer: int = DEFAULT_PROBE_LAYER
) -> Tensor:
    """``[T, N]`` head-averaged attention of each text token to each visual token at ``probe_layer``.

    The sequence is ``vision`` (``[N, H]`` LM-space embeddings) followed by
    ``text`` (``[T, H]``), causal, positions ``0 .. N+T-1``. ``probe_layer`` is
    clamped to the model's last layer.
    """
    layers = decoder_layers(language_model)
    probe_layer = min(probe_layer, len(layers) - 1)
    n = vision.shape[0]
    hidden = torch.cat([vision, text.to(vision.dtype)], dim=0)
    positions = torch.arange(hidden.shape[0], device=hidden.device)
    residual = None
    for index, layer in enumerate(layers[: probe_layer + 1]):
        if residual is None:
            residual = hidden
            normed = layer.input_layernorm(hidden)
        else:
            normed, residual = layer.input_layernorm(hidden, residual)
        attention = layer.self_attn
        q, k, v = _rotated_qkv(attention, positions, normed)
        if index == probe_layer:
            rows = _text_rows(q, k, attention.scaling, n)
            if attention.num_heads != attention.total_num_heads:
                rows = sum_head_shards(rows)
            return rows / attention.total_num_heads
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=attention.scaling
        ).transpose(0, 1)
        out, _ = attention.o_proj(out.reshape(out.shape[0], -1))
        normed, residual = layer.post_attention_layernorm(out, residual)
        hidden = layer.mlp(normed)
    raise AssertionError("unreachable: the probe layer is always reached")


def _rotated_qkv(attention: nn.Module, positions: Tensor, normed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    qkv, _ = attention.qkv_proj(normed)
    q, k, v = qkv.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
    q, k = attention.rotary_emb(positions, q, k)
    seq = normed.shape[0]
    q = q.reshape(seq, attention.num_heads, attention.head_dim)
    groups = attention.num_heads // attention.num_kv_heads
    k = k.reshape(seq, attention.num_kv_heads, attention.head_dim).repeat_interleave(groups, dim=1)
    v = v.reshape(seq, attention.num_kv_heads, attention.head_dim).repeat_interleave(groups, dim=1)
    return q, k, v


def _text_rows(q: Tensor, k: Tensor, scale: float, num_vision: int) -> Tensor:
    """Causal softmax rows of the text queries, restricted to the visual keys, summed over this rank's heads."""
    q_text = q[num_vision:].float()  # [T, heads, d]
    logits = torch.einsum("thd,shd->hts", q_text, k.float()) * scale  # [heads, T, S]
    t = q_text.shape[0]
    seq = k.shape[0]
    query_pos = torch.arange(num_vision, num_vision + t, device=q.device)[:, None]
    causal = torch.arange(seq, device=q.device)[None, :] <= query_pos
    logits = logits.masked_fill(~causal, float("-inf"))
    return logits.softmax(dim=-1)[:, :, :num_vision].sum(dim=0)  # [T, N]
