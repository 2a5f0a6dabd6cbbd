"""vLLM general-plugin entry point (``vllm.general_plugins`` -> ``tokcomp``).

vLLM calls :func:`register` in every process it starts. It must be cheap,
idempotent, and never raise: it registers lazily imported model classes by
``"module:Class"`` string, has the renderer check a text-only request's
``tokcomp_*`` values as an image request's are checked, and has every worker ask its runner for the M-RoPE
recompute hook of the models that use it (``vllm_api.patch_runners_in_workers``). Whether anything is
compressed is decided by the configuration, so an installed but unconfigured plugin changes nothing.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm_tokcomp")

# Architecture name -> our subclass. The class is imported only when vLLM builds that model.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlavaForConditionalGeneration": "vllm_tokcomp.integration.llava:CompressedLlava",
    "LlavaNextForConditionalGeneration": "vllm_tokcomp.integration.llava_next:CompressedLlavaNext",
    "LlavaOnevisionForConditionalGeneration": "vllm_tokcomp.integration.llava_onevision:CompressedLlavaOnevision",
    "Qwen2VLForConditionalGeneration": "vllm_tokcomp.integration.qwen2_vl:CompressedQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "vllm_tokcomp.integration.qwen2_vl:CompressedQwen2_5_VL",
    "Qwen3VLForConditionalGeneration": "vllm_tokcomp.integration.qwen3_vl:CompressedQwen3VL",
    "Qwen3VLMoeForConditionalGeneration": "vllm_tokcomp.integration.qwen3_vl:CompressedQwen3VLMoe",
}

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    try:
        from vllm import ModelRegistry

        for architecture, target in SUPPORTED_ARCHITECTURES.items():
            ModelRegistry.register_model(architecture, target)
        from .integration.frontend import configure_serving_processor
        from .integration.requests import check_text_only
        from .integration.vllm_api import (
            add_worker_call,
            check_text_only_requests,
            patch_runners_in_workers,
            tell_processors_engine_config,
        )
        from .integration.worker_rpc import handle

        check_text_only_requests(check_text_only)
        tell_processors_engine_config(configure_serving_processor)
        add_worker_call(handle)
        patch_runners_in_workers()
        _registered = True
    except Exception:  # never take vLLM down for users who did not ask for compression
        logger.exception("tokcomp: plugin registration failed; serving without compression")
