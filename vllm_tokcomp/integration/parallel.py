"""What each model family can serve under pipeline parallelism, checked in the frontend.

vLLM runs the vision tower, and the multimodal side of the model runner, on the first pipeline stage only; later
stages receive hidden states. Two things the plugin does need more than that:

- LLaVA's LM probe (MustDrop's prefill stage, BTP's text attention) re-runs the LM's first layers up to the probe
  layer inside ``embed_multimodal``; that layer must live on the first stage.
- Qwen2-VL's encoder-decided methods (``text_relevance``, ``pumer``) choose their tokens on the encoder's output, so
  the runner rewrites their M-RoPE positions after the encoder ran (``recompute_mrope_positions``). vLLM does that
  on the first stage; the later stages keep the positions computed when the request arrived, so their layers would
  run on other positions than the first stage's.

Such methods are refused with the setting named: a server whose own method is one of them does not start; a
request asking for one gets HTTP 400. Every other method decides before the engine sees the request, or on the first
stage alone, and is served as with one stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..config import CompressionSpec, ConfigError
from ..methods import available_methods, method_class
from .lm_probe import DEFAULT_PROBE_LAYER
from .vllm_api import first_stage_layers

PIPELINE_SETTING = "pipeline_parallel_size"


@dataclass(frozen=True)
class PipelineLimit:
    """The methods a processor refuses for ``stages`` pipeline stages, each with the reason."""

    stages: int = 1
    unservable: Mapping[str, str] = field(default_factory=dict)

    def check(self, spec: CompressionSpec | None, field_name: str) -> None:
        """``ConfigError`` naming ``field_name`` when ``spec``'s method cannot run on this pipeline."""
        if spec is not None and spec.method in self.unservable:
            raise ConfigError(
                field_name,
                f"method {spec.method!r} cannot be served with {PIPELINE_SETTING}={self.stages}: "
                f"{self.unservable[spec.method]}; choose another method or serve without pipeline parallelism",
            )


def reads_lm_probe(method: str) -> bool:
    """Whether the LLaVA model runs the LM probe for ``method`` (the same test as ``CompressedLlava``)."""
    return method_class(method).reads_lm_probe()


def llava_pipeline_limit(num_layers: int, stages: int) -> PipelineLimit:
    """LLaVA: the probe layer (clamped like the probe clamps it) must be on the first of ``stages`` stages."""
    if stages <= 1:
        return PipelineLimit()
    first = first_stage_layers(num_layers, stages)
    probe = min(DEFAULT_PROBE_LAYER, num_layers - 1)
    if probe < first:
        return PipelineLimit(stages)
    reason = (f"its LM probe reads decoder layer {probe}, and the first pipeline stage (where vLLM runs the vision "
              f"tower) holds layers 0-{first - 1}")
    return PipelineLimit(stages, {name: reason for name in available_methods() if reads_lm_probe(name)})


def qwen_pipeline_limit(encoder_decided: frozenset[str], stages: int) -> PipelineLimit:
    """Qwen2-VL: methods decided on the encoder's output move positions that only the first stage rewrites."""
    if stages <= 1:
        return PipelineLimit()
    reason = ("its kept tokens are chosen on the encoder's output and their M-RoPE positions rewritten afterwards, "
              "which vLLM does on the first pipeline stage only")
    return PipelineLimit(stages, {name: reason for name in sorted(encoder_decided)})

