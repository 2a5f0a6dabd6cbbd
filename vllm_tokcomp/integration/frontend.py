"""What the plugin hands the processor vLLM serves with, once vLLM has built it.

vLLM builds the frontend's multimodal processor from the model config alone; the pipeline-parallel size (which
methods a pipeline can run, integration/parallel.py) and the served model name (the ``model`` label of the metrics,
integration/metrics.py) reach it here, through ``vllm_api.tell_processors_engine_config``.
"""

from __future__ import annotations

from . import metrics


def configure_serving_processor(processor: object, vllm_config: object) -> None:
    """For a processor of ours: the pipeline limit and the metrics. Other models' processors are left alone."""
    limit = getattr(getattr(processor, "info", None), "limit_to_pipeline", None)
    if not callable(limit):
        return
    limit(vllm_config.parallel_config.pipeline_parallel_size)
    model_config = vllm_config.model_config
    metrics.enable_for(processor, str(model_config.served_model_name or model_config.model))
