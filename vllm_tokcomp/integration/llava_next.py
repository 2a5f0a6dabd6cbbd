"""LLaVA-NeXT (anyres) with visual-token compression before KV allocation.

An image is a base view (the tower's ``side x side`` grid of a 336 px resize) and the tiles of the best-fitting grid,
whose features vLLM unpads to the image's aspect ratio (``H x W`` tokens) with one ``image_newline`` token after each
row: ``side^2 + H*W + H`` placeholders (vLLM 0.32.0, ``model_executor/models/llava_next.py``).

The rule for a compressed image (:func:`parts.visual_counts`): it keeps ``min(budget, side^2 + H*W)`` visual tokens (a
ratio counts every placeholder, newlines included) and **no newline tokens** (the kept tokens are no longer rows);
they are split between the two grids in proportion to their sizes, the base view first (at least one token each
when the budget allows). Each grid is compressed on its own by the method, with the tower's [CLS] attention and keys
of its own tiles (each tile's [CLS] over its patches) gathered into the grid's layout. A budget of at least every
placeholder leaves the image exactly as vLLM serves it.

Served: every method whose signals the tower and the prompt give (layout, similarity, [CLS] attention, text
embeddings); refused with a reason naming the field: trained connectors (trained for the tiny LLaVA's 576-token
grid), methods that read the LM probe's text attention, ``"auto"`` budgets. Precomputed ``image_embeds`` and SigLIP
towers pass through uncompressed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import torch

from ..config import (
    AUTO,
    BUDGET_KEY,
    METHOD_KEY,
    CompressionSpec,
    ConfigError,
    servable_methods,
)
from ..connectors import is_connector_method
from ..methods import get_method, method_class
from . import settings
from .clip_signals import capture_feature_layer_signals
from .parallel import PipelineLimit, llava_pipeline_limit
from .parts import Grid, compress_grids, tiled_image_groups, visual_counts
from .preview import uncompressed_item
from .processing import METHOD_FIELD, CompressingInfo, CompressingProcessor
from .text_signals import question_embeds
from .vllm_api import (
    MULTIMODAL_REGISTRY,
    ImageEmbeddingItems,
    ImageProcessorItems,
    LlavaDummyInputsBuilder,
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
    MultiModalFieldConfig,
    PromptReplacement,
)
from .worker_rpc import report_item

logger = logging.getLogger("vllm_tokcomp")


def grid_index(tiles_high: int, tiles_wide: int, side: int, image_size: tuple[int, int]) -> torch.Tensor:
    """``[H, W]`` index of each unpadded grid token into the tiles' concatenated patches (``tile * side^2 +
    patch``), the layout vLLM's ``_merge_image_patch_embeddings`` gives the tiles' features (``image_size``: the
    original ``(height, width)``)."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    index = torch.arange(tiles_high * tiles_wide * side * side).view(tiles_high, tiles_wide, side, side)
    index = index.permute(0, 2, 1, 3).reshape(1, tiles_high * side, tiles_wide * side)
    return unpad_image(index, image_size)[0]


def serves(method: str) -> bool:
    """Whether LLaVA-NeXT compresses with ``method``: a fixed-budget library method that does not read the LM
    probe (trained connectors: LLaVA-1.5 only)."""
    return method in servable_methods() and not method_class(method).reads_lm_probe()


def check_tiled_servable(spec: CompressionSpec, field: str, family: str = "LLaVA-NeXT") -> CompressionSpec:
    """What a tiled LLaVA (``family``: LLaVA-NeXT, LLaVA-OneVision) refuses, naming the field: ``"auto"`` budgets,
    trained connectors, methods that read the LM probe."""
    if spec.budget == AUTO:
        raise ConfigError(field.replace(METHOD_KEY, BUDGET_KEY),
                          f"{AUTO!r} is defined on LLaVA-1.5's fixed 24x24 grid; on {family} give a count or a ratio")
    if is_connector_method(spec.method):
        raise ConfigError(field, f"{spec.method!r} is a trained connector, served on LLaVA-1.5 only")
    if method_class(spec.method).reads_lm_probe():
        raise ConfigError(field, f"method {spec.method!r} reads the LM probe's text attention, which the {family} "
                                 "integration does not run")
    return spec


class CompressedLlavaNextInfo(CompressingInfo, LlavaNextProcessingInfo):
    def check_servable(self, spec: CompressionSpec) -> CompressionSpec:
        return check_tiled_servable(spec, METHOD_FIELD)

    def pipeline_limit(self, stages: int) -> PipelineLimit:
        return llava_pipeline_limit(self.get_hf_config().text_config.num_hidden_layers, stages)

    def unsupported_reason(self) -> str | None:
        if self.get_hf_config().vision_config.model_type == "clip_vision_model":
            return None
        return "LLaVA-NeXT with a non-CLIP tower is not supported"

    def layout(self, width: int, height: int) -> tuple[int, int, int]:
        """``(base view tokens, grid rows H, grid columns W)`` of an image, as vLLM counts its placeholders."""
        full = self.get_num_image_tokens(image_width=width, image_height=height)
        side = self.get_hf_config().vision_config.image_size // self.get_hf_config().vision_config.patch_size
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        tiles_high, tiles_wide = get_anyres_image_grid_shape(
            (height, width), self.get_hf_config().image_grid_pinpoints, self.get_hf_config().vision_config.image_size)
        unpadded, rows = self._get_num_unpadded_features(
            original_height=height, original_width=width, npatches=side, num_patch_height=tiles_high,
            num_patch_width=tiles_wide)
        if side * side + unpadded + rows != full:
            raise RuntimeError(f"tokcomp: LLaVA-NeXT layout {side}^2 + {unpadded} + {rows} != {full} placeholders")
        return side * side, rows, unpadded // max(rows, 1)


class TiledImages:
    """Processor mixin for an image served as a base view plus a tile grid with a newline per row (LLaVA-NeXT,
    LLaVA-OneVision): its counts and its settings rows, from the info's ``layout(width, height)`` (base view
    tokens, grid rows, grid columns), and each item's preview entry and metrics row for the modalities in
    ``MODALITIES`` (whose counts :meth:`_counts` gives)."""

    MODALITIES: tuple[str, ...] = ("image",)

    def _counts(self, modality: str, item) -> tuple[int, Sequence[int] | None, CompressionSpec | None]:  # noqa: ANN001
        """An item's placeholders without compression, its counts (per grid or frame) when compressed, its
        settings."""
        return self._image_counts(item)

    def preview_items(self, engine_input) -> list[dict]:  # noqa: ANN001 - vLLM's engine input
        """Each item's counts for ``POST /tokcomp/preview``; its groups come from the engine, in placeholder order
        (an image's base view, then each tile row and its newline; a video's frames, then its newline)."""
        entries = []
        for modality in self.MODALITIES:
            for item in engine_input["mm_kwargs"].get(modality, []):
                full, counts, spec = self._counts(modality, item)
                if spec is None or counts is None:
                    entries.append(uncompressed_item(modality, full))
                    continue
                entries.append({"modality": modality, "method": spec.method, "budget": spec.budget,
                                "ratio": spec.ratio, "tokens_before": full, "tokens_after": sum(counts),
                                "decided": None, "groups": None})
        return entries

    def _compressed_items(self, result) -> list[tuple[str, int, int]]:  # noqa: ANN001 - vLLM's MultiModalInputs
        items = []
        for modality in self.MODALITIES:
            for item in result["mm_kwargs"].get(modality, []):
                if item is None:  # served from vLLM's multimodal cache: counted when it was processed
                    continue
                full, counts, spec = self._counts(modality, item)
                if spec is not None:
                    items.append((spec.method, full, full if counts is None else sum(counts)))
        return items

    def _image_counts(self, item) -> tuple[int, tuple[int, int] | None, CompressionSpec | None]:  # noqa: ANN001
        """An image's placeholders without compression, its visual counts when compressed, its settings."""
        height, width = (int(v) for v in item["image_sizes"].data.tolist())
        base, rows, cols = self.info.layout(width, height)
        spec = settings.item_spec(item, settings.FIELD)
        return base + rows * cols + rows, visual_counts(spec, base, rows, cols), spec

    def _add_image_rows(self, processed_data, spec: CompressionSpec | None,  # noqa: ANN001 - HF's BatchFeature
                        hf_processor_mm_kwargs: Mapping[str, object]) -> None:
        """Each processed image's settings row (a ratio resolved over all its placeholders) and question row."""
        sizes = processed_data.get("image_sizes")
        if processed_data.get("pixel_values") is None or sizes is None:
            return
        rows = []
        for height, width in torch.as_tensor(sizes).tolist():
            base, grid_rows, grid_cols = self.info.layout(int(width), int(height))
            full = base + grid_rows * grid_cols + grid_rows
            rows.append(settings.encode(None if spec is None else spec.for_item(full)))
        processed_data[settings.FIELD] = torch.stack(rows)
        processed_data[settings.QUERY_FIELD] = settings.query_rows(hf_processor_mm_kwargs, len(rows))


class CompressedLlavaNextProcessor(TiledImages, CompressingProcessor, LlavaNextMultiModalProcessor):
    info: CompressedLlavaNextInfo

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):  # noqa: ANN001, ANN201
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        self._add_image_rows(processed_data, self.info.processed_spec(hf_processor_mm_kwargs), hf_processor_mm_kwargs)
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:  # noqa: ANN001
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[settings.FIELD] = MultiModalFieldConfig.batched("image")
        fields[settings.QUERY_FIELD] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptReplacement]:  # noqa: ANN001
        image_token_id = self.info.get_hf_config().image_token_index

        def get_replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                return [image_token_id] * images.get_feature_size(item_idx)
            full, counts, _spec = self._image_counts(out_mm_kwargs["image"][item_idx])
            return [image_token_id] * (full if counts is None else sum(counts))

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=get_replacement)]


@MULTIMODAL_REGISTRY.register_processor(
    CompressedLlavaNextProcessor, info=CompressedLlavaNextInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class CompressedLlavaNext(LlavaNextForConditionalGeneration):
    """``LlavaNextForConditionalGeneration`` whose images (base view and tile grid) are compressed per image."""

    def embed_multimodal(self, **kwargs: object):  # noqa: ANN201 - vLLM's MultiModalEmbeddings
        rows = kwargs.pop(settings.FIELD, None)
        queries = kwargs.pop(settings.QUERY_FIELD, None)
        if rows is None or kwargs.get("pixel_values") is None:
            return super().embed_multimodal(**kwargs)
        specs = [settings.decode(row) for row in rows]
        if all(spec is None for spec in specs):
            return super().embed_multimodal(**kwargs)
        query_ids = [settings.decode_query(row) for row in queries] if queries is not None else [None] * len(specs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        pixel_values = image_input["pixel_values"]
        per_image = list(pixel_values) if isinstance(pixel_values, (list, tuple)) else list(pixel_values.unbind(0))
        tiles_per_image = [p.shape[0] for p in per_image]
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        stacked = torch.cat(per_image)
        if any(spec is not None and method_class(spec.method).reads_tower_signals() for spec in specs):
            every_layer = any(spec is not None and method_class(spec.method).needs_layer_cls_attention
                              for spec in specs)
            with capture_feature_layer_signals(self.vision_tower, side * side, every_layer) as signals:
                features = self._image_pixels_to_features(self.vision_tower, stacked)
        else:
            signals, features = None, self._image_pixels_to_features(self.vision_tower, stacked)
        embeds = self.multi_modal_projector(features)
        image_sizes = image_input.get("image_sizes")
        outputs, start = [], 0
        for index, (count, spec) in enumerate(zip(tiles_per_image, specs, strict=True)):
            tiles = embeds[start:start + count]
            tile_signals = None if signals is None else signals[start:start + count]
            start += count
            merged = self._merge_image_patch_embeddings(image_sizes[index], tiles, strategy="spatial_unpad")
            if spec is None:
                outputs.append(merged)
                continue
            outputs.append(self._compress(merged, tiles, tile_signals, spec, tuple(image_sizes[index].tolist()),
                                          side, query_ids[index]))
        return outputs

    def _compress(self, merged: torch.Tensor, tiles: torch.Tensor, signals, spec: CompressionSpec,  # noqa: ANN001
                  image_size: tuple[int, int], side: int, query: torch.Tensor | None) -> torch.Tensor:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        started = time.perf_counter()
        base = side * side
        tiles_high, tiles_wide = get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
        index = grid_index(tiles_high, tiles_wide, side, image_size) if tiles.shape[0] > 1 else torch.empty(0, 0)
        rows, cols = index.shape
        counts = visual_counts(spec, base, rows, cols)
        if counts is None:
            return merged
        text = question_embeds(self.get_language_model(), spec, query, merged)
        grids = [Grid((side, side), tiles[0], _tower_signals(None if signals is None else [signals[0]], None))]
        if rows:
            flat = index.flatten().to(tiles.device)
            grids.append(Grid((rows, cols), tiles[1:1 + tiles_high * tiles_wide].reshape(-1, tiles.shape[-1])[flat],
                              _tower_signals(None if signals is None else signals[1:1 + tiles_high * tiles_wide],
                                             flat)))
        method = get_method(spec.method, **dict(spec.options))
        out, destinations = compress_grids(method, spec, grids, counts[:len(grids)], text)
        report_item(spec, tiled_image_groups(destinations, base, rows, cols), time.perf_counter() - started)
        return out


def _tower_signals(signals, flat: torch.Tensor | None) -> dict:  # noqa: ANN001 - VisionSignals per tile
    """[CLS] attention and keys of a grid's tiles, in the grid's token order (``flat`` indexes the tiles'
    concatenated patches; ``None`` for the base view, one tile)."""
    if not signals:
        return {}
    cls_attention = torch.cat([s.cls_attention for s in signals])
    keys = None if signals[0].keys is None else torch.cat([s.keys for s in signals])
    layers = None if signals[0].layer_cls_attention is None else torch.cat([s.layer_cls_attention for s in signals],
                                                                           dim=1)
    if flat is not None:
        cls_attention = cls_attention[flat.to(cls_attention.device)]
        keys = None if keys is None else keys[flat.to(keys.device)]
        layers = None if layers is None else layers[:, flat.to(layers.device)]
    return {"cls_attention": cls_attention, "keys": keys, "key_heads": signals[0].key_heads,
            "layer_cls_attention": layers}
