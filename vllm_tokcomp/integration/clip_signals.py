"""CLS attention and attention keys from a CLIP tower's feature layer, without eager attention.

LLaVA-1.5 takes its features from the output of the vision tower's last
instantiated layer (vLLM builds the tower only up to ``vision_feature_layer``).
FasterVLM / PruMerge / VisionZip rank patches by the attention of [CLS] in that
layer. Only one query row is needed, so instead of materialising the full
``N x N`` attention we capture the layer's fused QKV projection while the tower
runs (a forward hook that lives only for the duration of one call) and compute
``softmax(q_cls K^T / sqrt(d))`` per head: O(N) extra work.

Checked against vLLM 0.32.0 ``CLIPAttention`` (fused ``qkv_proj`` whose output
is ``[q | k | v]`` for this rank's heads; ``tp_size`` is 1 when the tower runs
data-parallel). Under tensor parallelism each rank gathers every rank's q and k
before deciding, so all ranks see the signals a single GPU would, and select
the same tokens.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class VisionSignals:
    """Per image: ``cls_attention [N]`` (head-averaged, over patch tokens), ``keys [N, D]`` (``key_heads`` heads
    concatenated) and, when asked for, ``layer_cls_attention [L, N]``: the [CLS] attention of every layer up to the
    feature layer (its last row is ``cls_attention``)."""

    cls_attention: Tensor
    keys: Tensor
    key_heads: int
    layer_cls_attention: Tensor | None = None


@contextmanager
def capture_feature_layer_signals(vision_tower: nn.Module, num_patch_tokens: int, every_layer: bool = False):
    """While active, records CLS attention and keys of the feature layer (and with ``every_layer`` the CLS
    attention of every earlier layer too, one query row each); yields a list filled after the call."""
    layers = vision_tower.vision_model.encoder.layers
    attention = layers[-1].self_attn
    captured: list[VisionSignals] = []
    earlier: list[Tensor] = []  # [B, N] per earlier layer of the running forward, in layer order

    def query_and_keys(output: tuple | Tensor) -> tuple[Tensor, Tensor]:
        qkv = output[0] if isinstance(output, tuple) else output
        q, k, _v = qkv.chunk(3, dim=-1)
        if attention.tp_size > 1:
            from .vllm_api import gather_head_shards  # here: the module stays importable without vLLM

            q, k = gather_head_shards(q), gather_head_shards(k)
        return q, k

    def earlier_hook(_module: nn.Module, _inputs: tuple, output: tuple) -> None:
        q, k = query_and_keys(output)
        signals = cls_signals_from_qk(q, k, attention.num_heads, attention.head_dim, num_patch_tokens)
        earlier.append(torch.stack([s.cls_attention for s in signals]))

    def hook(_module: nn.Module, _inputs: tuple, output: tuple) -> None:
        q, k = query_and_keys(output)
        signals = cls_signals_from_qk(q, k, attention.num_heads, attention.head_dim, num_patch_tokens)
        if every_layer:
            rows = [torch.stack([*(layer[i] for layer in earlier), s.cls_attention]) for i, s in enumerate(signals)]
            signals = [dataclasses.replace(s, layer_cls_attention=r) for s, r in zip(signals, rows, strict=True)]
            earlier.clear()
        captured.extend(signals)

    handles = [attention.qkv_proj.register_forward_hook(hook)]
    if every_layer:
        handles += [layer.self_attn.qkv_proj.register_forward_hook(earlier_hook) for layer in layers[:-1]]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def cls_signals_from_qk(q: Tensor, k: Tensor, num_heads: int, head_dim: int,
                        num_patch_tokens: int) -> list[VisionSignals]:
    """From queries and keys ``[B, 1 + N, H * d]`` of all heads (CLS first): per image CLS→patch attention and
    patch keys."""
    batch, seq, _ = q.shape
    q, k = q.float(), k.float()
    q_cls = q[:, 0].reshape(batch, num_heads, head_dim)
    k_heads = k.reshape(batch, seq, num_heads, head_dim)
    logits = torch.einsum("bhd,bshd->bhs", q_cls, k_heads) * head_dim**-0.5
    attention = logits.softmax(dim=-1).mean(dim=1)  # over heads, softmax over CLS + patches
    patches = slice(seq - num_patch_tokens, seq)
    return [
        VisionSignals(cls_attention=attention[i, patches], keys=k[i, patches], key_heads=num_heads)
        for i in range(batch)
    ]
