"""What a text-guided method sees when the prompt has no text, shared by the model integrations."""

from __future__ import annotations

import dataclasses

import torch

from ..methods import VisualTokens, method_class


def with_text_fallback(method: str, tokens: VisualTokens) -> VisualTokens:
    """A prompt without text (vLLM's profiling dummy is just the image placeholder) still gets exactly its budget.

    Methods that require the text then see a single neutral query: uniform text attention, and
    the mean visual token as the text embedding.
    """
    cls = method_class(method)
    updates = {}
    if cls.needs_text and tokens.text_embeds is None:
        updates["text_embeds"] = tokens.features.mean(dim=0, keepdim=True)
    if cls.needs_text_attention and tokens.text_attention is None:
        n = tokens.num_tokens
        updates["text_attention"] = torch.full((1, n), 1.0 / n, device=tokens.features.device)
    return dataclasses.replace(tokens, **updates) if updates else tokens
