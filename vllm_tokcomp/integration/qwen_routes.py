"""Which route serves a method on the Qwen-VL families, and the decisions the processing-time routes take.

A method's route follows from its declared capabilities (:func:`qwen_route`): ``layout`` methods place their
tokens from the grid and the budget, ``pixels`` methods decide at processing time on each merged token's pixels,
``encoder`` methods decide on the encoder's output with the prompt's text. The first two decide before the
encoder runs, so their kept tokens' positions are known when the request is added (integration/mrope.py).
No vLLM import here.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import AUTO, BUDGET_KEY, METHOD_KEY, RATIO_KEY, CompressionSpec, ConfigError
from ..connectors import is_connector_method
from ..methods import VisualTokens, available_methods, get_method, method_class
from . import settings

LAYOUT, PIXELS, ENCODER = "layout", "pixels", "encoder"


def qwen_route(method: str) -> str | None:
    """How Qwen2-VL serves ``method``, read from its declared capabilities (so a newly registered method is
    routed too):

    - ``"layout"``: the selection ignores content (``selects_by_content = False``); anchors come from the grid
      and the budget;
    - ``"pixels"``: it reads nothing but token features; it decides at processing time on each merged token's
      pixels, so positions are known before the encoder runs, and the model merges the encoder's embeddings by
      that same assignment;
    - ``"encoder"``: it reads the prompt's text; it decides in ``embed_multimodal`` on the encoder's embeddings,
      and the kept tokens' positions reach the runner's recompute hook (``recompute_mrope_positions``) inside the
      embeddings, as ``POSITION_CHANNELS`` extra columns;
    - ``None``: it needs [CLS] attention, keys or the LM probe's attention, which Qwen's tower and this
      integration do not provide (trained connectors: LLaVA only)."""
    if is_connector_method(method):
        return None
    try:
        cls = method_class(method)
    except ValueError:  # not a registered method
        return None
    if cls.needs_cls_attention or cls.needs_layer_cls_attention or cls.needs_keys or cls.needs_text_attention:
        return None
    if not cls.selects_by_content:
        return LAYOUT
    return ENCODER if cls.reads_text() else PIXELS


def qwen_methods(route: str | None = None) -> frozenset[str]:
    """The registered methods Qwen2-VL serves (on ``route`` only, when given)."""
    routes = {method: qwen_route(method) for method in available_methods()}
    return frozenset(m for m, r in routes.items() if r is not None and (route is None or r == route))


# The built-in methods per route, as registered at import (for docs, tests and benchmarks).
FIXED_LAYOUT_METHODS = qwen_methods(LAYOUT)
PIXEL_DECIDED_METHODS = qwen_methods(PIXELS)
ENCODER_DECIDED_METHODS = qwen_methods(ENCODER)
SERVED_METHODS = qwen_methods()


def check_served_on_qwen(spec: CompressionSpec | None, field: str) -> CompressionSpec | None:
    if spec is not None and spec.budget == AUTO:
        raise ConfigError(
            field.replace(METHOD_KEY, BUDGET_KEY),
            f"{AUTO!r} (pixel-redundancy estimate) is implemented for LLaVA's fixed 24x24 grid only; "
            f"on Qwen-VL models give a count or {RATIO_KEY}",
        )
    if spec is not None and is_connector_method(spec.method):
        raise ConfigError(field, f"{spec.method!r} is a trained connector, served on LLaVA only")
    if spec is not None and qwen_route(spec.method) is None:
        raise ConfigError(
            field,
            f"method {spec.method!r} needs the vision tower's [CLS] attention, keys or the LM probe; the Qwen-VL "
            "towers have no [CLS] token, so the served methods are: " + ", ".join(sorted(qwen_methods())),
        )
    return spec


# Each 14 x 14 patch is described by its 2 x 2 block means per channel and frame: ToMe and DivPrune cost
# O(N^2 x D), and the raw 1176 values per patch made a 2304-token image take ~1.5 s of processor CPU.
DESCRIPTOR_POOL = 2


def pixel_descriptors(patches: torch.Tensor, merge: int, patch_size: int, pool: int = DESCRIPTOR_POOL) -> torch.Tensor:
    """``[tokens, D]`` descriptors of the merged tokens: each token's ``merge x merge`` patches (consecutive rows
    of the HF processor's ``[patches, C * T * P * P]`` layout), each patch average-pooled to ``pool x pool``
    per channel and frame, centred on the item's mean so that similarity measures contrast, not brightness.
    ``pool`` must divide ``patch_size``; ``pool == patch_size`` keeps the raw pixels."""
    if patch_size % pool:
        raise ValueError(f"pool {pool} does not divide patch size {patch_size}")
    rows, width = patches.shape
    planes = width // (patch_size * patch_size)  # channels x frames
    block = patch_size // pool
    pooled = patches.float().reshape(rows, planes, pool, block, pool, block).mean((3, 5))
    features = pooled.reshape(rows // (merge * merge), merge * merge * planes * pool * pool)
    return features - features.mean(0)


def pixel_assignment(
    spec: CompressionSpec | None, patches: torch.Tensor, grid: tuple[int, int, int], merge: int, patch_size: int
) -> torch.Tensor:
    """One item's :func:`settings.encode_assignment` row. For a pixel-decided method the method's own
    ``select`` runs on the item's merged tokens described by their pixels (:func:`pixel_descriptors`);
    every other item gets the identity. vLLM 0.32 hands the processor's pixels over unnormalised (uint8;
    the model normalises them), and these are what is used."""
    n = int(np.prod(grid))
    kept = settings.kept_tokens(spec, n)
    if spec is None or qwen_route(spec.method) != PIXELS or kept >= n:
        index = torch.arange(n)
        return settings.encode_assignment(index, index)
    pool = DESCRIPTOR_POOL if patch_size % DESCRIPTOR_POOL == 0 else patch_size
    features = pixel_descriptors(patches, merge, patch_size, pool)
    method = get_method(spec.method, **dict(spec.options))
    assignment = method.select(VisualTokens(features=features, grid=tuple(grid)), kept)
    return settings.encode_assignment(assignment.destination, assignment.anchor)


def item_anchors(spec: CompressionSpec | None, grid: tuple[int, ...], assignment_row: torch.Tensor | None,
                 ) -> torch.Tensor:
    """The anchors an item's kept tokens take their positions from: decided at processing time for the
    pixel-decided methods (its assignment row), else a function of the grid and the budget. For an
    encoder-decided method they are not known yet: the first ``kept`` raster indices stand in until the
    runner's recompute hook writes the real ones (:func:`encode_positions`)."""
    if spec is not None and qwen_route(spec.method) == PIXELS and assignment_row is not None:
        return settings.decode_assignment(assignment_row)[1]
    if spec is not None and qwen_route(spec.method) == ENCODER:
        return torch.arange(settings.kept_tokens(spec, int(np.prod(grid))))
    return kept_anchors(spec, grid)


def kept_anchors(spec: CompressionSpec | None, grid: tuple[int, ...]) -> torch.Tensor:
    """Raster indices (into ``grid``) whose positions the kept tokens take, in output order."""
    n = int(np.prod(grid))
    kept = settings.kept_tokens(spec, n)
    if kept >= n:
        return torch.arange(n)
    method = get_method(spec.method, **dict(spec.options))
    tokens = VisualTokens(features=torch.zeros(n, 1), grid=tuple(grid))
    return method.select(tokens, kept).anchor
