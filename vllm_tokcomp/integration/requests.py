"""Checking a request's ``mm_processor_kwargs`` once, the same way for every model family, and handing the
result on in canonical form."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ..config import (
    CANONICAL_KEY,
    INTERNAL_KEYS,
    PLUGIN_KEYS,
    CompressionSpec,
    ConfigError,
    canonical_spec,
    method_reads_text,
    plugin_keys_in,
    resolve_request,
    spec_from_canonical,
    without_plugin_keys,
)
from ..methods.knobs import quote
from . import settings
from .preview import without_preview_mark
from .vllm_api import RequestSettingError


def settle_request(info: Any, inputs: Any,
                   query: Callable[[list[int]], tuple[list[int], set[int]]]) -> tuple[Any, Mapping | None, bool]:
    """A processor's request before vLLM processes it, the same for every model family: its ``tokcomp_*`` settings
    checked (HTTP 400 naming the field) and made canonical, and for a method that reads the prompt's text, the
    question's tokens attached (``query(prompt)`` gives them and the ids to leave out). Returns ``(inputs to
    process, the client's own kwargs, whether this is a preview)``. ``info``: the family's processing info
    (``engine_configured``, ``spec_for_request``)."""
    client_kwargs, previewing = without_preview_mark(inputs.hf_processor_mm_kwargs)
    request_kwargs = client_kwargs or {}
    spec = check_request(request_kwargs, engine_configured=info.engine_configured, resolve=info.spec_for_request)
    request_kwargs = canonical_kwargs(request_kwargs, spec, engine_configured=info.engine_configured)
    if spec is not None and method_reads_text(spec.method):
        prompt, excluded = query(list(inputs.prompt))
        request_kwargs = settings.with_query(request_kwargs, prompt, excluded)
    if request_kwargs is not inputs.hf_processor_mm_kwargs:
        inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=request_kwargs)
    return inputs, client_kwargs, previewing


def check_request(
    request_kwargs: Mapping[str, object],
    *,
    engine_configured: bool,
    resolve: Callable[[Mapping[str, object]], CompressionSpec | None],
) -> CompressionSpec | None:
    """The request's spec, or ``RequestSettingError`` (HTTP 400) naming the bad field.

    When the server owner configured tokcomp, requests may set only our own keys:
    ``--trust-request-mm-kwargs`` would otherwise let clients pass any HF processor
    argument (e.g. inflate image sizes).
    """
    if engine_configured:
        foreign = sorted(str(k) for k in request_kwargs if k not in plugin_keys_in(request_kwargs))
        if foreign:
            field = f"mm_processor_kwargs.{quote(foreign[0])[1:-1]}"
            raise RequestSettingError(
                f"{field} is not accepted by this server; only {', '.join(PLUGIN_KEYS)} may be set per request",
                parameter=field,
            )
    for key in INTERNAL_KEYS:
        if key in request_kwargs:
            raise RequestSettingError(
                f"mm_processor_kwargs.{key} is set by the server, not by requests",
                parameter=f"mm_processor_kwargs.{key}",
            )
    try:
        return resolve(request_kwargs)
    except ConfigError as error:
        raise RequestSettingError(str(error), parameter=error.field) from None


def canonical_kwargs(
    request_kwargs: Mapping[str, object], spec: CompressionSpec | None, *, engine_configured: bool
) -> Mapping[str, object]:
    """The request's kwargs with its ``tokcomp_*`` values replaced by the resolved spec in canonical form
    (:data:`CANONICAL_KEY`), the form vLLM hashes: a request that names no setting on a server that does not
    compress is left as it is."""
    if not engine_configured and not plugin_keys_in(request_kwargs):
        return request_kwargs
    return {**without_plugin_keys(request_kwargs), CANONICAL_KEY: canonical_spec(spec)}


def processed_spec(
    kwargs: Mapping[str, object], engine_kwargs: Mapping[str, object]
) -> CompressionSpec | None:
    """The spec of kwargs the processor has seen: the canonical one it put there, else (kwargs that reached the
    processor without passing :func:`canonical_kwargs`, which never carry the internal keys) resolved from the
    ``tokcomp_*`` values."""
    if CANONICAL_KEY in kwargs:
        return spec_from_canonical(str(kwargs[CANONICAL_KEY]))
    return resolve_request(engine_kwargs, kwargs)


def check_text_only(mm_processor: object, request_kwargs: Mapping[str, object]) -> None:
    """A text-only request's ``mm_processor_kwargs`` checked as an image request's would be (HTTP 400 naming the
    field), on models this plugin serves; other processors are left alone."""
    info = getattr(mm_processor, "info", None)
    if callable(getattr(info, "spec_for_request", None)):
        request_kwargs, _ = without_preview_mark(request_kwargs)
        check_request(request_kwargs, engine_configured=info.engine_configured, resolve=info.spec_for_request)
