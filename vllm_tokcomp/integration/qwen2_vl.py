"""Qwen2-VL with visual-token compression before KV allocation, M-RoPE positions kept right.

Same config keys and settings rows as the LLaVA integration (``integration/llava.py``), one row per image
(``tokcomp_settings``) and per video (``tokcomp_video_settings``): images and videos are compressed alike,
each item over its own merged grid ``(t, h, w)``.
Overrides (vLLM 0.32.0, ``model_executor/models/qwen2_vl.py``):

* ``CompressedQwen2VLInfo``: hides ``tokcomp_*`` keys from the HF processor, parses the engine config.
* ``CompressedQwen2VLProcessor``: validates request settings (HTTP 400), attaches each item's settings,
  and in ``_get_prompt_updates`` expands ``<|image_pad|>`` / ``<|video_pad|>`` to ``min(budget, t*h*w / merge^2)``
  tokens (uncompressed items get exactly vLLM's own replacement).
  ``get_mm_max_tokens_per_item`` stays the unpruned maximum (profiling and encoder-cache budgets).
* ``CompressedQwen2VL.embed_multimodal``: the tower as vLLM runs it, then every item compressed to
  exactly its placeholder count.
* ``CompressedQwen2VL.get_mrope_input_positions``: the *final* M-RoPE positions, computed when the
  request is added (route "positions up front", no runner internals):

  - a kept token takes the (t, h, w) position of its anchor (for a merged token: the input token it
    merged into, ``TokenAssignment.anchor``), shifted like the uncompressed item;
  - text after an item keeps the position it would have had uncompressed (vLLM's EVS rule): the
    next text starts at ``item_start + max(t, h, w extent)`` of the *full* grid.

  This needs each image's anchors before the encoder runs: the **fixed-layout** methods
  (:func:`qwen_route` ``"layout"``: uniform, random, pool, bilinear) have them from the grid and the budget, the
  **pixel-decided** ones (``"pixels"``: tome, divprune, adjacent, evs) run their ``select`` in
  the processor on each merged token's pixels and send the assignment with the item
  (``settings.ASSIGNMENT_FIELDS``); the model applies that assignment to the encoder output.
* ``CompressedQwen2VL.recompute_mrope_positions``: the **text-guided** methods (``"encoder"``:
  text_relevance, pumer) choose in ``embed_multimodal`` from the embeddings and the prompt's text,
  after the positions above were computed (provisionally for their placeholders). Each kept row carries its
  anchor's (t, h, w) in ``POSITION_CHANNELS`` extra columns, and the runner's EVS hook, which vLLM 0.32 calls
  only with ``video_pruning_rate > 0`` (and the CPU runner never), is switched on for these models by
  ``vllm_api.enable_runner_position_recompute``: it rewrites those placeholders' positions and strips the
  columns. (The plugin patches both runners when a worker is built: ``vllm_api.patch_runners_in_workers``.)
  Methods that need [CLS] attention are refused: Qwen's tower has no [CLS] token.

Which route serves a method and the processing-time decisions: ``integration/qwen_routes.py``; positions and
their packing into embedding columns: ``integration/mrope.py``.

A video's kept token keeps its frame: ``(start + frame * t_factor, start + row, start + col)``, with vLLM's
``t_factor`` (Qwen2.5-VL: seconds per temporal patch x ``tokens_per_second``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import torch

from ..config import (
    CompressionSpec,
    ConfigError,
)
from ..methods import TokenAssignment, VisualTokens, get_method
from ..show import qwen_pixels_to_image
from . import settings
from .debug_log import POSITIONS_LOG_ENV, append_record, log_selection
from .mrope import POSITION_CHANNELS, decode_positions, encode_positions, item_positions
from .parallel import PipelineLimit, qwen_pipeline_limit
from .preview import png_of_groups, qwen_item, uncompressed_item
from .processing import METHOD_FIELD, CompressingInfo, CompressingProcessor
from .qwen_routes import (
    ENCODER,
    PIXELS,
    check_served_on_qwen,
    item_anchors,
    kept_anchors,
    pixel_assignment,
    qwen_methods,
    qwen_route,
)
from .text_signals import user_turn_ids, with_text_fallback
from .vllm_api import (
    MULTIMODAL_REGISTRY,
    MultiModalFieldConfig,
    PromptReplacement,
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
    encoder_cudagraphs_requested,
    without_encoder_cudagraphs,
)
from .worker_rpc import report_item

logger = logging.getLogger("vllm_tokcomp")

def _evs_rate(ctx) -> float:  # noqa: ANN001
    """vLLM's own video pruning (EVS) rate; > 0 means vLLM prunes videos and rewrites positions itself."""
    return float(ctx.model_config.get_multimodal_config().video_pruning_rate or 0.0)


def _merged_tokens(grid_thw: torch.Tensor, merge: int) -> int:
    """LM tokens of an uncompressed item: its patch grid ``t*h*w`` over the spatial merge."""
    return int(grid_thw.prod()) // (merge * merge)


class QwenInfo(CompressingInfo):
    """Processing info of the Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): vLLM's own video pruning (EVS)
    and tokcomp exclude each other; methods are served by their route (:func:`qwen_route`)."""

    def read_model(self, ctx) -> None:  # noqa: ANN001 - vLLM's InputProcessingContext
        self.evs_rate = _evs_rate(ctx)

    def check_servable(self, spec: CompressionSpec) -> CompressionSpec:
        if self.evs_rate > 0:
            # Composing would need our selection inside vLLM's 4-channel EVS embeddings; refuse instead.
            raise ConfigError(
                METHOD_FIELD,
                f"tokcomp compression cannot be combined with vLLM's video_pruning_rate={self.evs_rate} (EVS); "
                "unset one of them",
            )
        return check_served_on_qwen(spec, METHOD_FIELD)

    def pipeline_limit(self, stages: int) -> PipelineLimit:
        return qwen_pipeline_limit(qwen_methods(ENCODER), stages)


class CompressedQwen2VLInfo(QwenInfo, Qwen2VLProcessingInfo):
    pass


class CompressedQwen2_5_VLInfo(QwenInfo, Qwen2_5_VLProcessingInfo):
    pass


class QwenProcessor(CompressingProcessor):
    info: QwenInfo

    def question_tokens(self, prompt: list[int]) -> tuple[list[int], set[int]]:
        """The user turns' tokens (:func:`user_turn_ids`), without the media placeholders and special tokens."""
        config, tokenizer = self.info.get_hf_config(), self.info.get_tokenizer()
        excluded = {config.image_token_id, config.video_token_id, *tokenizer.all_special_ids}
        return user_turn_ids(prompt, tokenizer), excluded

    def preview_items(self, engine_input) -> list[dict]:  # noqa: ANN001 - vLLM's engine input
        """Each image's or video's entry of ``POST /tokcomp/preview`` (integration/preview.py)."""
        entries = []
        for modality, index, item, spec, grid in self._item_specs(engine_input["mm_kwargs"]):
            if spec is None:
                placeholders = engine_input.get("mm_placeholders", {}).get(modality, [])
                entries.append(uncompressed_item(modality, placeholders[index].get_num_embeds()))
                continue
            row = item.get(settings.ASSIGNMENT_FIELDS[modality])
            decided = row is not None and qwen_route(spec.method) == PIXELS
            entries.append(qwen_item(modality, spec, int(np.prod(grid)), grid, row.data if decided else None))
        return entries

    def draw_previews(self, engine_input, entries: list[dict]) -> None:  # noqa: ANN001 - vLLM's engine input
        """Adds ``png`` to each image entry with known groups: the groups drawn over the image rebuilt from the
        processor's patches (one 28 px cell per merged token). Videos are not drawn."""
        image_processor = self.info.get_hf_processor().image_processor
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        items = self._item_specs(engine_input["mm_kwargs"])
        for entry, (modality, _index, item, _spec, grid) in zip(entries, items, strict=True):
            if modality != "image" or grid is None or entry["groups"] is None:
                continue
            thw = tuple(int(v) for v in item["image_grid_thw"].data.tolist())
            image = qwen_pixels_to_image(item["pixel_values"].data, thw, image_processor, merge)
            entry["png"] = png_of_groups(image, grid[1:], entry["groups"])

    def _compressed_items(self, result) -> list[tuple[str, int, int]]:  # noqa: ANN001 - vLLM's MultiModalInputs
        """``(method, tokens without compression, tokens served)`` per compressed image or video."""
        items = []
        for modality, _index, _item, spec, grid in self._item_specs(result["mm_kwargs"]):
            if spec is not None:
                items.append((spec.method, int(np.prod(grid)), self._served_tokens(modality, spec, grid)))
        return items

    def _item_specs(self, mm_kwargs) -> list[tuple]:  # noqa: ANN001 - vLLM's MultiModalKwargsItems
        """Per processed image and video: ``(modality, index, item, settings, (t, h, w) merged-token grid)``; the
        grid is ``None`` for an uncompressed item."""
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        out = []
        for modality, field_name in MODALITY_FIELDS.items():
            for index, item in enumerate(mm_kwargs.get(modality, [])):
                spec = settings.item_spec(item, field_name)
                grid = None
                if spec is not None:
                    t, h, w = (int(v) for v in item[f"{modality}_grid_thw"].data.tolist())
                    grid = (t, h // merge, w // merge)
                out.append((modality, index, item, spec, grid))
        return out

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):  # noqa: ANN001, ANN201
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        vision_config = self.info.get_hf_config().vision_config
        merge, patch_size = vision_config.spatial_merge_size, vision_config.patch_size
        spec = self.info.processed_spec(hf_processor_mm_kwargs)
        for modality, pixels_key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            grid_thw = processed_data.get(f"{modality}_grid_thw")
            if grid_thw is None or processed_data.get(pixels_key) is None:
                continue
            # One row per item: a ratio becomes each item's own count (dynamic resolution, video length).
            item_specs = [None if spec is None else spec.for_item(_merged_tokens(g, merge)) for g in grid_thw]
            processed_data[MODALITY_FIELDS[modality]] = torch.stack([settings.encode(s) for s in item_specs])
            patches = processed_data[pixels_key].split(grid_thw.prod(-1).tolist())
            processed_data[settings.ASSIGNMENT_FIELDS[modality]] = torch.cat([
                self._item_assignment(
                    modality, s, p, (int(g[0]), int(g[1]) // merge, int(g[2]) // merge), merge, patch_size
                )
                for s, p, g in zip(item_specs, patches, grid_thw, strict=True)
            ])
            processed_data[settings.QUERY_FIELDS[modality]] = settings.query_rows(hf_processor_mm_kwargs, len(grid_thw))
        return processed_data

    def _item_assignment(self, modality: str, spec: CompressionSpec | None, patches: torch.Tensor,
                         grid: tuple[int, int, int], merge: int, patch_size: int) -> torch.Tensor:
        """One item's assignment row (:func:`pixel_assignment` over the whole item)."""
        del modality
        return pixel_assignment(spec, patches, grid, merge, patch_size)

    def _served_tokens(self, modality: str, spec: CompressionSpec, grid: tuple[int, int, int]) -> int:
        """LM tokens a compressed item is given (its placeholder count)."""
        del modality
        return settings.kept_tokens(spec, int(np.prod(grid)))

    def _compressed_replacement(self, modality: str, item, spec: CompressionSpec, original: PromptReplacement,  # noqa: ANN001
                                item_idx: int) -> object:
        """The prompt replacement of a compressed item: its placeholder token, once per served token."""
        del item_idx
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        t, h, w = (int(v) for v in item[f"{modality}_grid_thw"].data.tolist())
        return [original.target[0]] * self._served_tokens(modality, spec, (t, h // merge, w // merge))

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:  # noqa: ANN001
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        for modality, field in MODALITY_FIELDS.items():
            fields[field] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
            grid_thw = hf_inputs.get(f"{modality}_grid_thw", torch.empty((0, 3)))
            fields[settings.ASSIGNMENT_FIELDS[modality]] = MultiModalFieldConfig.flat_from_sizes(
                modality, grid_thw.prod(-1) // (merge * merge), keep_on_cpu=True
            )
            fields[settings.QUERY_FIELDS[modality]] = MultiModalFieldConfig.batched(modality, keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptReplacement]:  # noqa: ANN001
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))

        def replacement(item_idx: int, modality: str, original: PromptReplacement) -> object:
            item = out_mm_kwargs[modality][item_idx]
            field = item.get(MODALITY_FIELDS[modality])
            spec = None if field is None else settings.decode(field.data)
            if spec is None:  # uncompressed: exactly what vLLM would insert (incl. its own EVS count)
                return original.replacement(item_idx) if callable(original.replacement) else original.replacement
            return self._compressed_replacement(modality, item, spec, original, item_idx)

        return [
            PromptReplacement(
                modality=update.modality, target=update.target,
                replacement=partial(replacement, modality=update.modality, original=update),
            )
            if update.modality in MODALITY_FIELDS
            else update
            for update in updates
        ]


class CompressedQwen2VLProcessor(QwenProcessor, Qwen2VLMultiModalProcessor):
    pass


class CompressedQwen2_5_VLProcessor(QwenProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


MODALITY_FIELDS = {"image": settings.FIELD, "video": settings.VIDEO_FIELD}
_KWARG_MODALITY = {"pixel_values": "image", "image_embeds": "image", "pixel_values_videos": "video",
                   "video_embeds": "video"}


def _compress_item(item: torch.Tensor, spec: CompressionSpec, grid: tuple[int, int, int],
                   assignment_row: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                   t_factor: float = 1.0, decision_width: int | None = None) -> torch.Tensor:
    """One image's or video's embeddings (raster order over the merged ``grid``) to its placeholder count
    (:func:`compress_rows`), timed and reported as one item (``worker_rpc.report_item``)."""
    start = time.perf_counter()
    features, destination, kept = compress_rows(item, spec, grid, assignment_row, text_embeds, t_factor,
                                                decision_width)
    served = report_item(spec, destination, time.perf_counter() - start)
    if served and qwen_route(spec.method) == ENCODER:
        log_selection(spec, grid, kept)
    return features


def compress_rows(item: torch.Tensor, spec: CompressionSpec, grid: tuple[int, int, int],
                  assignment_row: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                  t_factor: float = 1.0, decision_width: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (raster order over the merged ``grid``) to exactly the placeholder count: ``(features, destination per
    input row, kept anchors)``. A pixel-decided method applies the assignment the processor chose
    (``assignment_row``); an encoder-decided one selects here, with ``text_embeds``, and appends its kept tokens'
    grid-relative positions as ``POSITION_CHANNELS`` extra columns for
    :meth:`_ModelMixin.recompute_mrope_positions`. ``decision_width``: a method reads only the first columns
    (Qwen3-VL: the main features, not the DeepStack levels concatenated after them); the assignment is applied to
    the whole rows, so every level is kept or merged alike."""
    method = get_method(spec.method, **dict(spec.options))
    expected = settings.kept_tokens(spec, item.shape[0])
    tokens = VisualTokens(features=item, grid=grid)
    if qwen_route(spec.method) == ENCODER:
        deciding = tokens if decision_width is None else dataclasses.replace(tokens, features=item[:, :decision_width])
        deciding = with_text_fallback(spec.method, dataclasses.replace(deciding, text_embeds=text_embeds))
        result = method(deciding, expected)
        if decision_width is not None:
            result = method.apply(dataclasses.replace(deciding, features=item), result.assignment)
    elif qwen_route(spec.method) == PIXELS and expected < item.shape[0]:
        if assignment_row is None:
            raise RuntimeError("tokcomp: no processing-time assignment for a pixel-decided method")
        destination, anchors = settings.decode_assignment(assignment_row.cpu())
        result = method.apply(tokens, TokenAssignment(destination.to(item.device), anchors.to(item.device)))
    else:
        result = method(tokens, expected)
        anchors = kept_anchors(spec, grid)
    # vLLM silently truncates extra rows; a mismatch must fail here instead.
    if result.features.shape[0] != expected:
        raise RuntimeError(f"tokcomp produced {result.features.shape[0]} rows for {expected} placeholders")
    kept = result.assignment.anchor.cpu()
    if qwen_route(spec.method) == ENCODER:  # positions follow this selection (recompute_mrope_positions)
        relative, _ = item_positions(grid, kept, t_factor)
        features = torch.cat([result.features, encode_positions(relative, result.features)], dim=-1)
        return features, result.assignment.destination, kept
    if not torch.equal(kept, anchors):
        raise RuntimeError("tokcomp: the selection differs from the layout its positions were computed for")
    return result.features, result.assignment.destination, kept


class _ModelMixin:
    """Compression in ``embed_multimodal``; positions in ``get_mrope_input_positions``, rewritten for
    encoder-decided items in ``recompute_mrope_positions`` (the runner calls it: ``vllm_api.RECOMPUTE_FLAG``)."""

    tokcomp_recomputes_positions = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # noqa: ANN001 - vLLM's VllmConfig
        # vLLM passes these by keyword after reading this signature.
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if encoder_cudagraphs_requested(vllm_config):
            logger.warning("tokcomp: %s's vision encoder runs without CUDA graphs (compilation_config."
                           "cudagraph_mm_encoder): replaying them would skip compression", type(self).__name__)

    def embed_multimodal(self, **kwargs: object):  # noqa: ANN201 - vLLM's MultiModalEmbeddings
        rows = {modality: kwargs.pop(field, None) for modality, field in MODALITY_FIELDS.items()}
        assignments = {modality: kwargs.pop(field, None) for modality, field in settings.ASSIGNMENT_FIELDS.items()}
        queries = {modality: kwargs.pop(field, None) for modality, field in settings.QUERY_FIELDS.items()}
        specs = {modality: [] if r is None else [settings.decode(row) for row in r] for modality, r in rows.items()}
        embeddings = super().embed_multimodal(**kwargs)
        if not any(spec is not None for items in specs.values() for spec in items):
            return embeddings
        merge = self.config.vision_config.spatial_merge_size
        # embed_multimodal returns items modality by modality, in the order the kwargs' keys first name them.
        order = []
        for key in kwargs:
            modality = _KWARG_MODALITY.get(key)
            if modality is not None and modality not in order:
                order.append(modality)
        out = list(embeddings)
        start = 0
        for modality in order:
            grids = kwargs[f"{modality}_grid_thw"]
            rows_of_items = _split_assignments(assignments[modality], grids, merge)
            for index, spec in enumerate(specs[modality]):
                if spec is not None:
                    t, h, w = (int(v) for v in grids[index].tolist())
                    text = None
                    if qwen_route(spec.method) == ENCODER and queries[modality] is not None:
                        text = self._text_embeds(
                            settings.decode_query(torch.as_tensor(queries[modality][index])), out[start + index]
                        )
                    out[start + index] = self._compress(
                        modality, out[start + index], spec, (t, h // merge, w // merge), rows_of_items[index], text,
                        self._t_factor(kwargs, modality, index),
                    )
            start += len(grids)
        if start != len(out):
            raise RuntimeError(f"tokcomp: {len(out)} multimodal embeddings for {start} items")
        return tuple(out)

    def _compress(self, modality: str, embedding: torch.Tensor, spec: CompressionSpec, grid: tuple[int, int, int],
                  assignment_row: torch.Tensor | None, text_embeds: torch.Tensor | None, t_factor: float,
                  ) -> torch.Tensor:
        """One item's embeddings to its placeholder count (:func:`_compress_item` over the whole item)."""
        del modality  # images and videos alike: one selection over the item's (t, h, w) grid
        return _compress_item(embedding, spec, grid, assignment_row, text_embeds, t_factor)

    def _embedding_width(self) -> int:
        """Columns of an item's embedding rows before any ``POSITION_CHANNELS``: the LM's hidden size."""
        return self.config.get_text_config().hidden_size

    def _t_factor(self, kwargs: Mapping[str, object], modality: str, index: int) -> float:
        """Position steps per temporal patch, as vLLM's ``iter_mm_grid_thw`` computes them: for a video
        ``second_per_grid_ts x tokens_per_second`` (each 1 where absent), for an image 1."""
        if modality != "video":
            return 1.0
        seconds = kwargs.get("second_per_grid_ts")
        per_patch = 1.0 if seconds is None else float(torch.as_tensor(seconds[index]).reshape(-1)[0])
        return per_patch * getattr(self.config.vision_config, "tokens_per_second", 1.0)

    def _text_embeds(self, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
        """The LM's input embeddings of the prompt's text tokens; ``None`` for a prompt without text."""
        if ids.numel() == 0:
            return None
        return self.get_language_model().embed_input_ids(ids.to(like.device)).to(like.dtype)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions,  # noqa: ANN001, ANN201
                                  num_computed_tokens: int):
        """The runner's hook after it gathered this step's encoder outputs (``vllm_api.RECOMPUTE_FLAG``): items
        carrying ``POSITION_CHANNELS`` extra columns (encoder-decided selections) get their placeholders'
        positions rewritten to ``item start + their anchors' (t, h, w)`` and the columns stripped; every other
        item passes through. Text positions were final already (the full grid's extent, vLLM's EVS rule).

        ``multimodal_embeddings`` are this step's slices, in prompt order, of the items whose placeholders
        fall in the scheduled tokens (chunked prefill may cut an item): they fill the prompt's placeholders
        from the first one at or after ``num_computed_tokens`` on."""
        if getattr(self, "is_multimodal_pruning_enabled", False):  # vLLM's own EVS (Qwen2.5-VL) owns positions
            return super().recompute_mrope_positions(
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )
        hidden = self._embedding_width()
        if not any(mm.shape[-1] > hidden for mm in multimodal_embeddings):
            delta = int(mrope_positions.max()) + 1 - len(input_ids) if mrope_positions.numel() else 0
            return multimodal_embeddings, mrope_positions, delta
        ids = torch.as_tensor(input_ids).cpu()
        placeholders = torch.nonzero(
            (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
        ).flatten()
        starts = torch.nonzero(ids == self.config.vision_start_token_id).flatten()
        positions = mrope_positions.clone()
        cursor = int((placeholders < num_computed_tokens).sum())
        stripped = []
        for mm in multimodal_embeddings:
            indices = placeholders[cursor:cursor + mm.shape[0]]
            cursor += mm.shape[0]
            if mm.shape[-1] == hidden:
                stripped.append(mm)
                continue
            if mm.shape[-1] != hidden + POSITION_CHANNELS or indices.numel() != mm.shape[0]:
                raise RuntimeError(f"tokcomp: {mm.shape[0]} embeddings of width {mm.shape[-1]} for "
                                   f"{indices.numel()} placeholders (embedding width {hidden})")
            relative = decode_positions(mm[:, hidden:].cpu())
            start = starts[torch.searchsorted(starts, indices) - 1]  # each placeholder's <|vision_start|>
            base = positions[0, start.to(positions.device)] + 1
            positions[:, indices.to(positions.device)] = base + relative.to(positions.device)
            stripped.append(mm[:, :hidden])
        delta = int(positions.max()) + 1 - len(ids)
        _log_positions(list(ids.tolist()), [{"recomputed_from": num_computed_tokens}], positions.cpu().numpy(), delta)
        return stripped, positions, delta

    def get_mrope_input_positions(self, input_tokens, mm_features):  # noqa: ANN001, ANN201 - SupportsMRoPE
        if getattr(self, "is_multimodal_pruning_enabled", False):
            # vLLM's EVS is on (Qwen2.5-VL): tokcomp is refused at processing time, vLLM owns the positions.
            return super().get_mrope_input_positions(input_tokens, mm_features)
        positions: list[np.ndarray] = []
        next_start = 0  # first position after the last item / text span
        st = 0  # index in input_tokens
        items = []
        for feature, (offset, t, h, w, t_factor) in zip(
            sorted(mm_features, key=lambda f: f.mm_position.offset), self.iter_mm_grid_thw(mm_features), strict=True
        ):
            spec, assignment_row = None, None
            field = MODALITY_FIELDS.get(feature.modality)
            if field is not None and feature.data is not None and field in feature.data:
                spec = settings.decode(feature.data[field].data)
                assignment_field = settings.ASSIGNMENT_FIELDS[feature.modality]
                if assignment_field in feature.data:
                    assignment_row = feature.data[assignment_field].data
            anchors = item_anchors(spec, (t, h, w), assignment_row)
            if anchors.numel() != feature.mm_position.length:
                raise RuntimeError(
                    f"tokcomp: item at {offset} has {feature.mm_position.length} placeholders, layout {anchors.numel()}"
                )
            text_len = offset - st
            positions.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_start)
            base = next_start + text_len
            kept, extent = item_positions((t, h, w), anchors, t_factor)
            positions.append(kept + base)
            next_start = base + extent
            st = offset + anchors.numel()
            items.append({"offset": offset, "grid": [t, h, w], "anchors": anchors.tolist()})
        if st < len(input_tokens):
            text_len = len(input_tokens) - st
            positions.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_start)
        llm_positions = np.concatenate(positions, axis=1).reshape(3, -1) if positions else np.zeros((3, 0), np.int64)
        delta = int(llm_positions.max()) + 1 - len(input_tokens) if llm_positions.size else 0
        _log_positions(input_tokens, items, llm_positions, delta)
        return torch.from_numpy(np.ascontiguousarray(llm_positions)), delta


def _split_assignments(rows: object, grids: torch.Tensor, merge: int) -> list[torch.Tensor | None]:
    """Per item, its assignment row (vLLM concatenates a flat field's items; ``None`` where absent)."""
    if rows is None:
        return [None] * len(grids)
    if isinstance(rows, (list, tuple)):
        rows = torch.cat([torch.as_tensor(r).flatten() for r in rows])
    sizes = (grids.prod(-1) // (merge * merge)).tolist()
    if rows.numel() != sum(sizes):
        raise RuntimeError(f"tokcomp: {rows.numel()} assignment entries for items of {sizes} tokens")
    return list(rows.split(sizes))


@MULTIMODAL_REGISTRY.register_processor(
    CompressedQwen2VLProcessor, info=CompressedQwen2VLInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
@without_encoder_cudagraphs
class CompressedQwen2VL(_ModelMixin, Qwen2VLForConditionalGeneration):
    """``Qwen2VLForConditionalGeneration`` whose image embeddings are compressed per image."""


@MULTIMODAL_REGISTRY.register_processor(
    CompressedQwen2_5_VLProcessor, info=CompressedQwen2_5_VLInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
@without_encoder_cudagraphs
class CompressedQwen2_5_VL(_ModelMixin, Qwen2_5_VLForConditionalGeneration):
    """``Qwen2_5_VLForConditionalGeneration`` whose image embeddings are compressed per image."""


def _log_positions(input_tokens, items, positions: np.ndarray, delta: int) -> None:  # noqa: ANN001
    """Debug aid: with ``$TOKCOMP_POSITIONS_LOG`` set, append the M-RoPE positions handed to the runner."""
    append_record(POSITIONS_LOG_ENV, {"prompt": list(input_tokens), "items": items, "positions": positions.tolist(),
                                      "delta": delta})
