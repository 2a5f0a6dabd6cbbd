"""``POST /tokcomp/preview``: what a chat request's images would cost and keep, without generating.

An endpoint plugin (vLLM's ``vllm.endpoint_plugins`` group, loaded only when ``VLLM_PLUGINS`` names ``tokcomp``;
``tokcomp serve --preview`` sets it). The body is a chat completion request; it is rendered exactly as the chat
endpoint renders it (the chat handler's model check and vLLM's ``OnlineRenderer.render_chat``: the same validation,
chat template and multimodal processor, so a bad setting is the same HTTP 400 naming the field), outside vLLM's
multimodal cache mirror, and no request is sent to an engine.

The answer: the prompt's token count (the ``prompt_tokens`` the chat request would report) and per image or video
its tokens without and with compression, the method, and which patches each token stands for (``groups``). Where
that is known before the encoder runs it is computed here (``decided: "frontend"``: on Qwen2-VL the fixed-layout and
pixel-decided methods, on LLaVA the content-blind ones); for the methods that decide on the encoder's output the
item goes through the model's own embedding path on the workers, outside the scheduler, through ``collective_rpc``
(``decided: "engine"``; the same tower, signals and method as a chat request, one encoder pass per item). With
``?png=true`` LLaVA's groups come drawn over the image as ``tokcomp show`` draws them. Previews are not counted in
the metrics and leave no cache entry.

The plugin also keeps ``tokcomp_compression_seconds`` current: before each ``/metrics`` scrape it drains the
workers' compression timings (``metrics.py``).
"""

# No `from __future__ import annotations`: FastAPI reads the route handler's annotations as objects.

import logging
import secrets
from collections.abc import Mapping

import torch

from ..config import PREVIEW_KEY
from ..connectors import is_connector_method
from ..methods import VisualTokens, get_method, method_class
from . import settings

logger = logging.getLogger("vllm_tokcomp")

ROUTE = "/tokcomp/preview"
# Marks the kwargs of a preview's own rendering; a client cannot guess it (requests carrying the key are refused).
PREVIEW_TOKEN = secrets.token_hex(16)


def without_preview_mark(kwargs: Mapping[str, object] | None) -> tuple[Mapping[str, object] | None, bool]:
    """``(kwargs without the preview's own mark, whether it was there)``; a client's ``tokcomp_preview`` (which
    cannot carry this process's token) stays, and the request check refuses it as an internal key."""
    if not kwargs or kwargs.get(PREVIEW_KEY) != PREVIEW_TOKEN:
        return kwargs, False
    return {key: value for key, value in kwargs.items() if key != PREVIEW_KEY}, True


def content_blind(method: str) -> bool:
    """Methods whose selection depends on the grid and budget (and their knobs) only."""
    return not is_connector_method(method) and not method_class(method).selects_by_content


def llava_item(spec, full: int, grid: tuple[int, int]) -> dict:  # noqa: ANN001 - a CompressionSpec
    """A LLaVA image's preview entry (``groups`` computed for content-blind methods)."""
    return _entry("image", spec, full, grid, None)


def qwen_item(modality: str, spec, full: int, grid: tuple[int, int, int],  # noqa: ANN001 - a CompressionSpec
              decided_row: torch.Tensor | None) -> dict:
    """A Qwen2-VL item's preview entry: ``decided_row`` is the processor's assignment row of a pixel-decided method
    (``None`` for the others: content-blind ones are computed here, encoder-decided ones come from the engine)."""
    groups = None if decided_row is None else settings.decode_assignment(decided_row)[0].tolist()
    return _entry(modality, spec, full, grid, groups)


def _entry(modality: str, spec, before: int, grid: tuple[int, ...], groups: list[int] | None) -> dict:  # noqa: ANN001
    after = settings.kept_tokens(spec, before)
    if groups is None and content_blind(spec.method) and after < before:
        tokens = VisualTokens(torch.zeros(before, 1), grid)
        groups = get_method(spec.method, **dict(spec.options))(tokens, after).assignment.destination.tolist()
    if groups is None and after >= before:
        groups = list(range(before))  # the budget covers the item: nothing is compressed
    return {"modality": modality, "method": spec.method, "budget": spec.budget, "ratio": spec.ratio,
            "tokens_before": before, "tokens_after": after, "decided": None if groups is None else "frontend",
            # per input token (a merged 2 x 2 patch on Qwen) its output token, -1 when dropped; null until the
            # engine's selection fills it in (fill_engine_groups)
            "groups": groups}


def png_of_groups(image, grid: tuple[int, int], groups: list[int]) -> str:  # noqa: ANN001 - a PIL image
    """The ``tokcomp show`` drawing of ``groups`` over ``image``, as a base64 PNG."""
    import base64
    import io

    from ..show import draw_groups

    buffer = io.BytesIO()
    draw_groups(image, grid, groups).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def uncompressed_item(modality: str, tokens: int) -> dict:
    return {"modality": modality, "method": None, "budget": None, "ratio": None, "tokens_before": tokens,
            "tokens_after": tokens, "decided": None, "groups": None}


def serving_processor(handler) -> object | None:  # noqa: ANN001 - vLLM's chat handler
    """The multimodal processor the chat handler's renderer serves with (``None`` for a text-only model)."""
    renderer = getattr(getattr(handler, "online_renderer", None), "renderer", None)
    return getattr(renderer, "mm_processor", None)


def engine_decided(entry: Mapping[str, object]) -> bool:
    """Whether an entry's groups come from the engine: compressed, and not decided before the encoder."""
    return entry["groups"] is None and entry["method"] is not None and entry["tokens_after"] < entry["tokens_before"]


async def fill_engine_groups(engine_client, engine_input, entries: list[dict]) -> None:  # noqa: ANN001
    """The groups of the items whose selection is made on the encoder's output: each such item goes through the
    model's own embedding path on the workers (``worker_rpc.select_for_preview``: the same tower, signals and
    method a chat request gets; not timed, not counted). An engine that cannot answer leaves ``groups`` null."""
    from .vllm_api import batch_one_request, call_workers
    from .worker_rpc import pack

    sources = [(modality, item) for modality in ("image", "video")
               for item in engine_input["mm_kwargs"].get(modality, [])]
    for entry, source in zip(entries, sources, strict=False):
        if not engine_decided(entry):
            continue
        try:
            (kwargs,) = batch_one_request([source])
            (selections,) = await call_workers(engine_client, "select", pack(kwargs))
        except Exception:  # noqa: BLE001 - a preview never takes the server down
            logger.exception("tokcomp: the engine could not compute a preview's selection")
            continue
        if selections and len(selections[0]) == entry["tokens_before"]:
            entry["groups"], entry["decided"] = selections[0], "engine"


async def pull_timings(state, timeout: float = 10.0) -> None:  # noqa: ANN001 - the app's state
    """Drain every engine's compression timings into ``tokcomp_compression_seconds`` before a scrape (a slow or
    stopped engine delays the scrape by at most ``timeout``; its timings then wait for the next one)."""
    import asyncio

    from .metrics import record_compression_seconds
    from .vllm_api import call_workers

    metrics = getattr(serving_processor(getattr(state, "openai_serving_chat", None)), "tokcomp_metrics", None)
    engine_client = getattr(state, "engine_client", None)
    if metrics is None or engine_client is None:
        return
    try:
        answers = await asyncio.wait_for(call_workers(engine_client, "timings", every_engine=True), timeout)
    except Exception:  # noqa: BLE001 - /metrics answers with what it has
        logger.warning("tokcomp: no compression timings from the engines for this scrape", exc_info=True)
        return
    for timings in answers:
        record_compression_seconds(metrics.model, timings or [])


class PreviewEndpoint:
    """The ``vllm.endpoint_plugins`` entry point (vLLM's ``EndpointPlugin`` protocol)."""

    name = "tokcomp"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:  # noqa: ANN001 - a FastAPI app
        from fastapi import APIRouter, Request
        from fastapi.responses import JSONResponse
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        from .vllm_api import render_chat_for_preview

        router = APIRouter()

        @router.post(ROUTE)
        async def preview(request: ChatCompletionRequest, raw_request: Request, png: bool = False) -> JSONResponse:
            handler = getattr(raw_request.app.state, "openai_serving_chat", None)
            if handler is None:
                return JSONResponse({"error": {"message": "this server has no chat endpoint", "code": 501}}, 501)
            kwargs = dict(request.mm_processor_kwargs or {})
            if PREVIEW_KEY in kwargs:
                field = f"mm_processor_kwargs.{PREVIEW_KEY}"
                return JSONResponse({"error": {"message": f"{field} is set by the server, not by requests",
                                               "type": "BadRequestError", "param": field, "code": 400}}, 400)
            request.mm_processor_kwargs = {**kwargs, PREVIEW_KEY: PREVIEW_TOKEN}
            result = await render_chat_for_preview(handler, request)
            if isinstance(result, ErrorResponse):
                return JSONResponse(result.model_dump(), status_code=result.error.code)
            _conversation, engine_inputs = result
            engine_input = engine_inputs[0]
            processor = serving_processor(handler)
            items = processor.preview_items(engine_input) if hasattr(processor, "preview_items") else []
            await fill_engine_groups(raw_request.app.state.engine_client, engine_input, items)
            if png and hasattr(processor, "draw_previews"):
                processor.draw_previews(engine_input, items)
            return JSONResponse({"prompt_tokens": len(engine_input["prompt_token_ids"]), "items": items})

        app.include_router(router)

        @app.middleware("http")
        async def pull_compression_timings(request: Request, call_next):  # noqa: ANN001, ANN202
            if request.url.path.rstrip("/") == "/metrics":
                await pull_timings(request.app.state)
            return await call_next(request)

    async def init_state(self, engine_client, state, args) -> None:  # noqa: ANN001
        """Drop the timings of the engines' startup (vLLM profiles memory with dummy images): only served items
        are timed."""
        from .vllm_api import call_workers

        if engine_client is None:  # vLLM's render-only server has no engine
            return
        try:
            await call_workers(engine_client, "timings", every_engine=True)
        except Exception:  # noqa: BLE001 - an engine without the worker call still serves
            logger.warning("tokcomp: the engines did not answer the startup timings drain", exc_info=True)

