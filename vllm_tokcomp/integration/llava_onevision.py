"""LLaVA-OneVision with visual-token compression before KV allocation.

vLLM 0.32.0 (``model_executor/models/llava_onevision.py``) serves

* an **image** as a base view (the tower's ``side x side`` grid, SigLIP's 27 x 27 at 384 px, no [CLS]) followed by
  the tiles of the best-fitting grid, unpadded to the image's aspect ratio and, beyond about nine tiles' worth,
  bilinearly shrunk (``anyres_max_9``) to ``H x W`` tokens, with one ``image_newline`` token after each row:
  ``side^2 + H*W + H`` placeholders;
* a **video** as its frames, each frame's tower grid 2x2 bilinearly pooled to ``p x p`` (``ceil(side / 2)``),
  followed by one ``image_newline`` token: ``frames * p^2 + 1`` placeholders.

The rules for a compressed item: an image keeps ``min(budget, side^2 + H*W)`` tokens split between the base view
and the tile grid in proportion to their sizes (:func:`parts.visual_counts`, as on LLaVA-NeXT); a video keeps
``min(budget, frames * p^2)`` tokens spread evenly over its frames, at least one each (:func:`parts.frame_counts`,
as on Qwen3-VL). A ratio counts every placeholder. A compressed item has **no newline tokens** (the kept tokens are
no longer rows). Each grid (base view, tile grid, frame) is compressed on its own, on the features the LM would
have seen (after the shrink and the pooling). A budget of at least every placeholder leaves the item exactly as
vLLM serves it.

Served: every method that needs no tower signal (SigLIP has no [CLS]; its attention is not captured): layout,
similarity and text-guided methods. Refused with a reason naming the field: methods that need [CLS] attention or
the tower's keys, methods that read the LM probe's text attention, trained connectors, ``"auto"`` budgets.
Precomputed ``image_embeds`` pass through uncompressed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

import torch

from ..config import CompressionSpec, ConfigError, servable_methods
from ..methods import get_method, method_class
from . import settings
from .llava_next import TiledImages, check_tiled_servable
from .parallel import PipelineLimit, llava_pipeline_limit
from .parts import Grid, compress_grids, frame_counts, tiled_image_groups, visual_counts, with_trailing_newline
from .processing import METHOD_FIELD, CompressingInfo, CompressingProcessor
from .text_signals import question_embeds
from .vllm_api import (
    MULTIMODAL_REGISTRY,
    ImageEmbeddingItems,
    ImageProcessorItems,
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
    MultiModalFieldConfig,
    PromptReplacement,
    VideoEmbeddingItems,
    VideoProcessorItems,
)
from .worker_rpc import report_item

logger = logging.getLogger("vllm_tokcomp")

VIDEO_QUERY_FIELD = settings.QUERY_FIELDS["video"]
FIELDS = {"image": (settings.FIELD, settings.QUERY_FIELD), "video": (settings.VIDEO_FIELD, VIDEO_QUERY_FIELD)}
MAX_TILES = 9  # vLLM 0.32's ``vision_aspect_ratio="anyres_max_9"`` (a default argument, not read from the config)


def serves(method: str) -> bool:
    """Whether LLaVA-OneVision compresses with ``method``: a fixed-budget library method that needs no tower signal
    and does not read the LM probe."""
    if method not in servable_methods():
        return False
    cls = method_class(method)
    return not cls.reads_lm_probe() and not (cls.needs_cls_attention or cls.needs_layer_cls_attention
                                            or cls.needs_keys)


def _check_servable(spec: CompressionSpec, field: str) -> CompressionSpec:
    spec = check_tiled_servable(spec, field, "LLaVA-OneVision")
    if not serves(spec.method):
        cls = method_class(spec.method)
        raise ConfigError(field, f"method {spec.method!r} needs the vision tower's "
                                 f"{', '.join(s for s in cls.required_signals() if not s.startswith('text'))}, "
                                 "which LLaVA-OneVision's SigLIP tower does not give (no [CLS] token)")
    return spec


def tile_grid_shape(image_size: tuple[int, int], tiles_high: int, tiles_wide: int, side: int) -> tuple[int, int]:
    """``(H, W)`` of an image's tile grid as vLLM serves it: the tiles' ``side``-patch grids unpadded to the
    image's aspect ratio (``image_size``: original ``(height, width)``), shrunk when more than ``1.1^2`` times
    nine tiles' worth (``LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings``)."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    unpadded = unpad_image(torch.empty(0, tiles_high * side, tiles_wide * side), image_size)
    height, width = unpadded.shape[1:]
    ratio = math.sqrt(height * width / (MAX_TILES * side ** 2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width


class CompressedLlavaOnevisionInfo(CompressingInfo, LlavaOnevisionProcessingInfo):
    def check_servable(self, spec: CompressionSpec) -> CompressionSpec:
        return _check_servable(spec, METHOD_FIELD)

    def pipeline_limit(self, stages: int) -> PipelineLimit:
        return llava_pipeline_limit(self.get_hf_config().text_config.num_hidden_layers, stages)

    def side(self) -> int:
        vision = self.get_hf_config().vision_config
        return vision.image_size // vision.patch_size

    def layout(self, width: int, height: int) -> tuple[int, int, int]:
        """``(base view tokens, grid rows H, grid columns W)`` of an image, as vLLM counts its placeholders."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        full = self.get_num_image_tokens(image_width=width, image_height=height)
        side = self.side()
        config = self.get_hf_config()
        tiles_high, tiles_wide = get_anyres_image_grid_shape(
            (height, width), config.image_grid_pinpoints, config.vision_config.image_size)
        rows, cols = tile_grid_shape((height, width), tiles_high, tiles_wide, side)
        if side * side + rows * cols + rows != full:
            raise RuntimeError(f"tokcomp: LLaVA-OneVision layout {side}^2 + {rows}x{cols} + {rows} != {full} "
                               "placeholders")
        return side * side, rows, cols

    def frame_tokens(self) -> int:
        """LM tokens of one video frame (the pooled grid), as vLLM counts them."""
        return self._get_num_frame_tokens(image_width=0, image_height=0)


class CompressedLlavaOnevisionProcessor(TiledImages, CompressingProcessor, LlavaOnevisionMultiModalProcessor):
    info: CompressedLlavaOnevisionInfo
    MODALITIES = ("image", "video")

    def question_tokens(self, prompt: list[int]) -> tuple[list[int], set[int]]:
        prompt, excluded = super().question_tokens(prompt)
        return prompt, excluded | {self.info.get_hf_config().video_token_index}

    def _video_counts(self, item) -> tuple[int, list[int] | None, CompressionSpec | None]:  # noqa: ANN001
        """A video's placeholders without compression, its per-frame counts when compressed, its settings."""
        frames, per_frame = item["pixel_values_videos"].data.shape[0], self.info.frame_tokens()
        full = frames * per_frame + 1
        spec = settings.item_spec(item, settings.VIDEO_FIELD)
        if spec is None or settings.kept_tokens(spec, full) >= full:
            return full, None, spec
        return full, frame_counts(spec, frames, per_frame), spec

    def _counts(self, modality: str, item) -> tuple[int, Sequence[int] | None, CompressionSpec | None]:  # noqa: ANN001
        return self._image_counts(item) if modality == "image" else self._video_counts(item)

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):  # noqa: ANN001, ANN201
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        spec = self.info.processed_spec(hf_processor_mm_kwargs)
        self._add_image_rows(processed_data, spec, hf_processor_mm_kwargs)
        videos = processed_data.get("pixel_values_videos")
        if videos is not None:
            per_frame = self.info.frame_tokens()
            rows = [settings.encode(None if spec is None else spec.for_item(len(video) * per_frame + 1))
                    for video in videos]
            processed_data[settings.VIDEO_FIELD] = torch.stack(rows)
            processed_data[VIDEO_QUERY_FIELD] = settings.query_rows(hf_processor_mm_kwargs, len(rows))
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:  # noqa: ANN001
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for modality, names in FIELDS.items():
            for name in names:
                fields[name] = MultiModalFieldConfig.batched(modality)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptReplacement]:  # noqa: ANN001
        config = self.info.get_hf_config()
        token_ids = {"image": config.image_token_index, "video": config.video_token_index}
        item_types = {"image": (ImageEmbeddingItems, ImageProcessorItems),
                      "video": (VideoEmbeddingItems, VideoProcessorItems)}

        def replacement(modality: str):  # noqa: ANN202
            def get_replacement(item_idx: int) -> list[int]:
                items = mm_items.get_items(modality, item_types[modality])
                if isinstance(items, (ImageEmbeddingItems, VideoEmbeddingItems)):
                    return [token_ids[modality]] * items.get_feature_size(item_idx)
                full, counts, _spec = self._counts(modality, out_mm_kwargs[modality][item_idx])
                return [token_ids[modality]] * (full if counts is None else sum(counts))

            return get_replacement

        return [PromptReplacement(modality=modality, target=[token_ids[modality]], replacement=replacement(modality))
                for modality in ("image", "video") if modality in mm_items]


@MULTIMODAL_REGISTRY.register_processor(
    CompressedLlavaOnevisionProcessor, info=CompressedLlavaOnevisionInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class CompressedLlavaOnevision(LlavaOnevisionForConditionalGeneration):
    """``LlavaOnevisionForConditionalGeneration`` whose images (base view and tile grid) and videos (frame by frame)
    are compressed per item."""

    def embed_multimodal(self, **kwargs: object):  # noqa: ANN201 - vLLM's MultiModalEmbeddings
        specs, queries = {}, {}
        for modality, (field, query_field) in FIELDS.items():
            rows, query_rows = kwargs.pop(field, None), kwargs.pop(query_field, None)
            if rows is not None:
                specs[modality] = [settings.decode(row) for row in rows]
                queries[modality] = ([settings.decode_query(row) for row in query_rows] if query_rows is not None
                                     else [None] * len(rows))
        if all(spec is None for item_specs in specs.values() for spec in item_specs):
            return super().embed_multimodal(**kwargs)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        outputs: list[torch.Tensor] = []
        for modality, modality_input in inputs.items():  # vLLM's order of the modalities
            if modality == "image":
                outputs += self._embed_images(modality_input, specs.get("image"), queries.get("image"))
            else:
                outputs += self._embed_videos(modality_input, specs.get("video"), queries.get("video"))
        return outputs

    def _embed_images(self, image_input, specs, queries) -> list[torch.Tensor]:  # noqa: ANN001
        sizes = image_input.get("image_sizes")
        if specs is None or image_input.get("type") != "pixel_values" or sizes is None:
            return list(self._process_image_input(image_input))  # precomputed embeddings: as vLLM serves them
        tiles_per_image = self._process_image_pixels(image_input)
        outputs = []
        for index, (tiles, spec) in enumerate(zip(tiles_per_image, specs, strict=True)):
            size = sizes[index]
            if spec is None:
                outputs.append(self._merge_image_patch_embeddings(size, tiles, image_newline=self.image_newline,
                                                                  strategy="spatial_unpad"))
            else:
                outputs.append(self._compress_image(tiles, tuple(int(v) for v in size.tolist()), spec,
                                                    queries[index], size))
        return outputs

    def _compress_image(self, tiles: torch.Tensor, image_size: tuple[int, int], spec: CompressionSpec,
                        query: torch.Tensor | None, size_tensor: torch.Tensor) -> torch.Tensor:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        started = time.perf_counter()
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        tiles_high, tiles_wide = get_anyres_image_grid_shape(image_size, self.config.image_grid_pinpoints,
                                                             vision.image_size)
        rows, cols = tile_grid_shape(image_size, tiles_high, tiles_wide, side) if tiles.shape[0] > 1 else (0, 0)
        counts = visual_counts(spec, side * side, rows, cols)
        if counts is None:
            return self._merge_image_patch_embeddings(size_tensor, tiles, image_newline=self.image_newline,
                                                      strategy="spatial_unpad")
        grids = [Grid((side, side), tiles[0])]
        if rows:
            # vLLM's own unpad and shrink, without the newline column: the grid the LM would see, row-major.
            merged = self._merge_image_patch_embeddings(size_tensor, tiles, image_newline=None,
                                                        strategy="spatial_unpad")
            if merged.shape[0] != side * side + rows * cols:
                raise RuntimeError(f"tokcomp: LLaVA-OneVision tile grid is {merged.shape[0] - side * side} tokens, "
                                   f"expected {rows}x{cols}")
            grids.append(Grid((rows, cols), merged[side * side:]))
        text = question_embeds(self.get_language_model(), spec, query, tiles)
        method = get_method(spec.method, **dict(spec.options))
        out, destinations = compress_grids(method, spec, grids, counts[:len(grids)], text)
        report_item(spec, tiled_image_groups(destinations, side * side, rows, cols), time.perf_counter() - started)
        return out

    def _embed_videos(self, video_input, specs, queries) -> list[torch.Tensor]:  # noqa: ANN001
        if specs is None or video_input.get("type") != "pixel_values_videos":
            return list(self._process_video_pixels(video_input))
        pixels = video_input["pixel_values_videos"]
        videos = list(pixels) if isinstance(pixels, (list, tuple)) else list(pixels.unbind(0))
        frames = self._video_pixels_to_features(self.vision_tower, torch.cat(videos))  # [frames, p^2, D], pooled
        side = math.isqrt(frames.shape[1])
        outputs, start = [], 0
        for video, spec, query in zip(videos, specs, queries, strict=True):
            video_frames = frames[start:start + video.shape[0]]
            start += video.shape[0]
            full = video_frames.shape[0] * video_frames.shape[1] + 1
            if spec is None or settings.kept_tokens(spec, full) >= full:
                outputs.append(torch.cat([video_frames.flatten(0, 1), self.image_newline[None].to(frames.dtype)]))
                continue
            started = time.perf_counter()
            counts = frame_counts(spec, video_frames.shape[0], video_frames.shape[1])
            text = question_embeds(self.get_language_model(), spec, query, video_frames)
            method = get_method(spec.method, **dict(spec.options))
            grids = [Grid((side, side), frame) for frame in video_frames]
            out, destinations = compress_grids(method, spec, grids, counts, text)
            report_item(spec, with_trailing_newline(destinations), time.perf_counter() - started)
            outputs.append(out)
        return outputs
