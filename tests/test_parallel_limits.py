"""integration/parallel.py: the methods a pipeline cannot run, and the refusal naming the field and the setting."""

import pytest

from vllm_tokcomp.config import CompressionSpec, ConfigError
from vllm_tokcomp.integration.frontend import configure_serving_processor
from vllm_tokcomp.integration.parallel import PipelineLimit, llava_pipeline_limit, qwen_pipeline_limit
from vllm_tokcomp.integration.qwen_routes import ENCODER_DECIDED_METHODS, SERVED_METHODS
from vllm_tokcomp.methods import available_methods


def test_one_stage_refuses_nothing():
    assert llava_pipeline_limit(2, 1) == PipelineLimit() == qwen_pipeline_limit(ENCODER_DECIDED_METHODS, 1)


def test_llava_refuses_the_probe_methods_only_when_the_probe_layer_leaves_the_first_stage():
    # LLaVA-1.5-7B: 32 layers, the first stage of two holds 0-15, the probe reads layer 2.
    assert llava_pipeline_limit(32, 2).unservable == {}
    assert llava_pipeline_limit(32, 10).unservable == {}  # three layers on the first stage: 0-2, probe at 2
    assert set(llava_pipeline_limit(32, 16).unservable) == {"mustdrop", "mustdrop_s2"}  # 0-1 on the first stage
    tiny = llava_pipeline_limit(2, 2)  # the tiny LLaVA: layer 0 on the first stage, probe clamped to layer 1
    assert set(tiny.unservable) == {"mustdrop", "mustdrop_s2"}
    assert "decoder layer 1" in tiny.unservable["mustdrop"] and "layers 0-0" in tiny.unservable["mustdrop"]
    assert set(tiny.unservable) < set(available_methods())


def test_qwen_refuses_the_encoder_decided_methods():
    limit = qwen_pipeline_limit(ENCODER_DECIDED_METHODS, 2)
    assert set(limit.unservable) == {"text_relevance", "pumer", "dart", "cdpruner", "mmtok"}
    assert set(limit.unservable) < SERVED_METHODS


@pytest.mark.parametrize("method", ["text_relevance", "pumer"])
def test_refusal_names_the_field_and_the_setting(method):
    limit = qwen_pipeline_limit(ENCODER_DECIDED_METHODS, 4)
    with pytest.raises(ConfigError) as error:
        limit.check(CompressionSpec(method=method, budget=32), "mm_processor_kwargs.tokcomp_method")
    assert error.value.field == "mm_processor_kwargs.tokcomp_method"
    assert f"method {method!r} cannot be served with pipeline_parallel_size=4" in str(error.value)
    limit.check(CompressionSpec(method="tome", budget=32), "f")  # served as with one stage
    limit.check(None, "f")  # compression off


def test_serving_processor_gets_the_pipeline_size_and_the_metrics():
    class Config:
        class parallel_config:  # noqa: N801 - shaped like vLLM's
            pipeline_parallel_size = 2

        class model_config:  # noqa: N801
            served_model_name = "tiny"
            model = "/models/tiny"

    class Info:
        stages = None

        def limit_to_pipeline(self, stages):
            self.stages = stages

    class Ours:
        info = Info()

    ours = Ours()
    configure_serving_processor(ours, Config())
    assert Ours.info.stages == 2 and ours.tokcomp_metrics.model == "tiny"
    other = type("Other", (), {})()
    configure_serving_processor(other, Config())  # another model's processor: nothing happens, no error
    assert not hasattr(other, "tokcomp_metrics")
