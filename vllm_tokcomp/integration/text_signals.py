"""The prompt's text a text-guided method reads: which tokens are the question, and what it sees when there is
none. Shared by the model integrations."""

from __future__ import annotations

import dataclasses

import torch

from ..config import CompressionSpec, method_reads_text
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


def question_embeds(language_model: torch.nn.Module, spec: CompressionSpec, query: torch.Tensor | None,
                    like: torch.Tensor) -> torch.Tensor | None:
    """The question's token embeddings (the LM's input embeddings, ``like``'s device and dtype) for a method that
    reads the text; ``None`` when it does not or the prompt has no text."""
    if query is None or query.numel() == 0 or not method_reads_text(spec.method):
        return None
    return language_model.embed_input_ids(query.to(like.device)).to(like.dtype)


def user_turn_ids(prompt: list[int], tokenizer) -> list[int]:  # noqa: ANN001 - a HF tokenizer
    """The tokens of the prompt's user turns (ChatML: after ``<|im_start|>user\\n``, up to ``<|im_end|>``), the
    text a text-guided method should match: the system turn and the template's words are not the question (on the
    trained tiny Qwen2-VL the whole prompt steered ``text_relevance`` onto background tokens). A prompt without
    ChatML user turns is returned whole."""
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    role = tokenizer.encode("user\n", add_special_tokens=False)
    if not isinstance(start, int) or not isinstance(end, int) or start == end:
        return prompt
    kept, inside, i = [], False, 0
    while i < len(prompt):
        if prompt[i] == start and prompt[i + 1:i + 1 + len(role)] == role:
            inside, i = True, i + 1 + len(role)
            continue
        if prompt[i] == end:
            inside = False
        elif inside:
            kept.append(prompt[i])
        i += 1
    return kept or prompt
