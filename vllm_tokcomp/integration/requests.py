"""Checking a request's ``mm_processor_kwargs`` once, the same way for every model family."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..config import PLUGIN_KEYS, QUERY_KEY, CompressionSpec, ConfigError, plugin_keys_in
from .vllm_api import RequestSettingError


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
        foreign = sorted(k for k in request_kwargs if k not in plugin_keys_in(request_kwargs))
        if foreign:
            raise RequestSettingError(
                f"mm_processor_kwargs.{foreign[0]} is not accepted by this server; "
                f"only {', '.join(PLUGIN_KEYS)} may be set per request",
                parameter=f"mm_processor_kwargs.{foreign[0]}",
            )
    if QUERY_KEY in request_kwargs:
        raise RequestSettingError(
            f"mm_processor_kwargs.{QUERY_KEY} is set by the server, not by requests",
            parameter=f"mm_processor_kwargs.{QUERY_KEY}",
        )
    try:
        return resolve(request_kwargs)
    except ConfigError as error:
        raise RequestSettingError(str(error), parameter=error.field) from None
