"""CLS attention from the fused QKV (integration/clip_signals.py) equals CLIP's own eager attention row."""

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from vllm_tokcomp.integration.clip_signals import cls_signals_from_qk


def _tiny_clip() -> CLIPVisionModel:
    config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        image_size=56, patch_size=14, attn_implementation="eager",
    )
    return CLIPVisionModel(config).eval()


def test_matches_transformers_eager_attention_of_the_feature_layer():
    torch.manual_seed(0)
    model = _tiny_clip()
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = model(pixels, output_attentions=True, output_hidden_states=True)
        # LLaVA's feature layer -2 is the output of layer index 1 of 3: its attention is attentions[1].
        layer = model.encoder.layers[1]
        normed = layer.layer_norm1(out.hidden_states[1])
        attn = layer.self_attn
        q, k = attn.q_proj(normed), attn.k_proj(normed)
    signals = cls_signals_from_qk(q, k, num_heads=4, head_dim=16, num_patch_tokens=16)
    expected = out.attentions[1][:, :, 0, 1:].mean(dim=1)
    for index, signal in enumerate(signals):
        torch.testing.assert_close(signal.cls_attention, expected[index], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(signal.keys, attn.k_proj(normed)[index, 1:].detach(), rtol=1e-5, atol=1e-6)


def test_every_layers_cls_attention_equals_transformers_eager_attention():
    """hf_signals.encode (``tokcomp show``, the GPU benchmark) hands every layer's [CLS] attention, the feature
    layer's last, as CLIP's own eager attention rows; the vLLM path computes them with the same function."""
    from vllm_tokcomp.hf_signals import encode

    torch.manual_seed(1)
    model = _tiny_clip()
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = model(pixels, output_attentions=True)
        _, signals = encode(model, torch.nn.Identity(), pixels)
    for index, signal in enumerate(signals):
        expected = torch.stack([layer[index, :, 0, 1:].mean(dim=0) for layer in out.attentions])
        torch.testing.assert_close(signal.layer_cls_attention, expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(signal.layer_cls_attention[-1], signal.cls_attention)
