"""The processing layer every model family shares.

vLLM builds a family's processing info for the engine and for every request; the info parses and checks the
engine-wide settings (a bad one stops startup), checks each request's settings (a bad one is HTTP 400, through
:func:`~vllm_tokcomp.integration.requests.settle_request`), and logs the effective configuration once per process.
A family adapter (integration/llava.py, llava_next.py, qwen2_vl.py, qwen3_vl.py) only says what differs: which
settings it serves (:meth:`CompressingInfo.check_servable`), what a pipeline can run
(:meth:`CompressingInfo.pipeline_limit`), whether the checkpoint's tower is supported
(:meth:`CompressingInfo.unsupported_reason`), and which prompt tokens are the question
(:meth:`CompressingProcessor.question_tokens`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..config import (
    CONNECTORS_KEY,
    METHOD_KEY,
    CompressionSpec,
    ConfigError,
    effective_config,
    is_engine_configured,
    parse_engine_config,
    resolve_request,
    without_plugin_keys,
)
from .metrics import record_processed
from .parallel import PipelineLimit
from .requests import processed_spec, settle_request
from .vllm_api import context_hiding_keys, engine_mm_processor_kwargs

logger = logging.getLogger("vllm_tokcomp")
METHOD_FIELD = f"mm_processor_kwargs.{METHOD_KEY}"
_logged: set[str] = set()


class EngineConfigError(RuntimeError):
    """A bad engine-wide tokcomp setting: the server must refuse to start.

    Not a ``ValueError``: vLLM 0.32 turns a ``ValueError`` from processing-info construction into "running in
    text-only mode" (``ModelConfig._supports_multimodal_inputs``, docs/vllm-compat.md)."""


def refuse_engine_setting(error: ConfigError) -> EngineConfigError:
    return EngineConfigError(f"tokcomp: bad engine configuration: {error}")


class CompressingInfo:
    """Mixin for a family's processing info (put it before vLLM's class)."""

    def __init__(self, ctx: Any) -> None:  # vLLM's InputProcessingContext
        super().__init__(context_hiding_keys(ctx, without_plugin_keys))
        self.engine_kwargs = dict(engine_mm_processor_kwargs(ctx))
        self.tokcomp_pipeline = PipelineLimit()
        self.read_model(ctx)
        try:
            self.engine_spec = self.check_spec(parse_engine_config(self.engine_kwargs))
            self.check_engine_only_settings(ctx)
        except ConfigError as error:
            raise refuse_engine_setting(error) from None
        self.engine_configured = is_engine_configured(self.engine_kwargs)
        self.unsupported = self.unsupported_reason()
        if self.engine_configured:
            self._log_effective_config_once()

    # -- what a family adapter says ---------------------------------------------------------------------------

    def read_model(self, ctx: Any) -> None:
        """Read what the checks need from the model or engine config, before the settings are checked."""

    def check_servable(self, spec: CompressionSpec) -> CompressionSpec:
        """``spec``, or ``ConfigError`` naming the field when this family cannot serve it."""
        return spec

    def check_engine_only_settings(self, ctx: Any) -> None:
        """Engine-only settings (trained connectors are LLaVA-1.5's; other families refuse them)."""
        if CONNECTORS_KEY in self.engine_kwargs:
            raise ConfigError(f"mm_processor_kwargs.{CONNECTORS_KEY}",
                              "trained connectors are served on LLaVA-1.5 only (the bundled ones were trained for "
                              "the tiny LLaVA's weights)")

    def pipeline_limit(self, stages: int) -> PipelineLimit:
        """What cannot run on ``stages`` pipeline stages (integration/parallel.py)."""
        raise NotImplementedError

    def unsupported_reason(self) -> str | None:
        """Why this checkpoint's images pass through uncompressed (``None``: it is compressed)."""
        return None

    # -- shared -----------------------------------------------------------------------------------------------

    @property
    def supported(self) -> bool:
        return self.unsupported is None

    def check_spec(self, spec: CompressionSpec | None) -> CompressionSpec | None:
        """``spec`` checked against the family and the pipeline (``ConfigError`` naming the field)."""
        if spec is not None:
            spec = self.check_servable(spec)
        self.tokcomp_pipeline.check(spec, METHOD_FIELD)
        return spec

    def limit_to_pipeline(self, stages: int) -> None:
        """Refuse what cannot run on ``stages`` pipeline stages: the engine's own method stops the server, a
        request's gets HTTP 400."""
        self.tokcomp_pipeline = self.pipeline_limit(stages)
        try:
            self.check_spec(self.engine_spec)
        except ConfigError as error:
            raise refuse_engine_setting(error) from None

    def spec_for_request(self, request_kwargs: Mapping[str, object]) -> CompressionSpec | None:
        """The spec of a client's kwargs (``ConfigError`` naming a bad field); ``None``: not compressed."""
        spec = self.check_spec(resolve_request(self.engine_kwargs, request_kwargs))
        return spec if self.supported else None

    def processed_spec(self, kwargs: Mapping[str, object]) -> CompressionSpec | None:
        """The spec of the kwargs :meth:`CompressingProcessor.apply` handed to vLLM."""
        spec = self.check_spec(processed_spec(kwargs, self.engine_kwargs))
        return spec if self.supported else None

    def _log_effective_config_once(self) -> None:
        key = type(self).__name__
        if key in _logged:
            return
        _logged.add(key)
        if self.unsupported is not None:
            logger.warning("tokcomp: %s; images pass through uncompressed", self.unsupported)
        else:
            logger.warning("tokcomp: %s", effective_config(self.engine_spec, self.engine_kwargs))


class CompressingProcessor:
    """Mixin for a family's multimodal processor (put it before vLLM's class)."""

    info: CompressingInfo

    def apply(self, inputs: Any, timing_ctx: Any) -> Any:  # vLLM's signature
        inputs, client_kwargs, previewing = settle_request(self.info, inputs, self.question_tokens)
        result = super().apply(inputs, timing_ctx)
        if not previewing:
            record_processed(self, client_kwargs, result)
        return result

    def question_tokens(self, prompt: list[int]) -> tuple[list[int], set[int]]:
        """The prompt's tokens a text-guided method reads, and the ids it leaves out (image and special tokens)."""
        return prompt, {self.info.get_hf_config().image_token_index, *self.info.get_tokenizer().all_special_ids}
