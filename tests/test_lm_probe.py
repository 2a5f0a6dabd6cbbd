"""The LM probe's text->vision attention equals the LM's own eager attention (transformers Llama as reference).

vLLM's decoder layers can only be built inside a running engine, so the probe runs here on
transformers' Llama layers behind a thin adapter with vLLM's call conventions (fused-residual
RMSNorm, ``qkv_proj`` returning a tuple, ``rotary_emb(positions, q, k)``). The reference is
transformers' own eager attention probabilities for the same sequence.
"""

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vllm_tokcomp.integration.lm_probe import text_to_vision_attention


class _Norm(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, residual=None):
        if residual is None:
            return self.norm(x)
        residual = x + residual
        return self.norm(residual), residual


class _Linear(nn.Module):
    def __init__(self, *linears):
        super().__init__()
        self.linears = nn.ModuleList(linears)

    def forward(self, x):
        return torch.cat([linear(x) for linear in self.linears], dim=-1), None


class _Rotary(nn.Module):
    def __init__(self, rotary, heads, kv_heads, dim):
        super().__init__()
        self.rotary, self.heads, self.kv_heads, self.dim = rotary, heads, kv_heads, dim

    def forward(self, positions, q, k):
        seq = q.shape[0]
        qh = q.reshape(1, seq, self.heads, self.dim).transpose(1, 2)
        kh = k.reshape(1, seq, self.kv_heads, self.dim).transpose(1, 2)
        cos, sin = self.rotary(qh, positions[None])
        qh, kh = apply_rotary_pos_emb(qh, kh, cos, sin)
        return qh.transpose(1, 2).reshape(seq, -1), kh.transpose(1, 2).reshape(seq, -1)


def _vllm_shaped(model: LlamaModel, config: LlamaConfig) -> nn.Module:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    layers = nn.ModuleList()
    for hf in model.layers:
        layer = nn.Module()
        layer.input_layernorm = _Norm(hf.input_layernorm)
        layer.post_attention_layernorm = _Norm(hf.post_attention_layernorm)
        layer.mlp = hf.mlp
        attn = nn.Module()
        attn.qkv_proj = _Linear(hf.self_attn.q_proj, hf.self_attn.k_proj, hf.self_attn.v_proj)
        attn.o_proj = _Linear(hf.self_attn.o_proj)
        attn.rotary_emb = _Rotary(model.rotary_emb, heads, kv_heads, dim)
        attn.q_size, attn.kv_size = heads * dim, kv_heads * dim
        attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scaling = heads, kv_heads, dim, dim**-0.5
        attn.total_num_heads = heads  # one rank holds every head
        layer.self_attn = attn
        layers.append(layer)
    wrapper = nn.Module()
    wrapper.model = nn.Module()
    wrapper.model.layers = layers
    return wrapper


def test_probe_matches_eager_attention_at_every_layer():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=32, attn_implementation="eager",
    )
    model = LlamaModel(config).eval()
    vision, text = torch.randn(20, 64), torch.randn(6, 64)
    with torch.no_grad():
        reference = model(inputs_embeds=torch.cat([vision, text])[None], output_attentions=True).attentions
        probe_model = _vllm_shaped(model, config)
        for layer in range(3):
            got = text_to_vision_attention(probe_model, vision, text, probe_layer=layer)
            expected = reference[layer][0, :, 20:, :20].mean(dim=0)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        # A probe layer past the end is clamped to the last layer.
        torch.testing.assert_close(text_to_vision_attention(probe_model, vision, text, probe_layer=9), expected)
