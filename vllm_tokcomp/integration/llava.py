"""LLaVA-1.5 with visual-token compression before KV allocation.

Overrides (vLLM 0.32.0, ``model_executor/models/llava.py``):

* ``CompressedLlavaInfo``: hides ``tokcomp_*`` keys from the HF processor.
* ``CompressedLlavaProcessor.apply``: validates the request's settings (bad
  values -> HTTP 400); ``_postprocess_hf_mm_data`` attaches each image's
  settings; ``_get_prompt_updates`` expands ``<image>`` to the *kept* count, so
  the scheduler allocates KV blocks only for kept tokens.
* ``CompressedLlava.embed_multimodal``: runs the tower (capturing CLS attention
  and keys when the method needs them), projects, and compresses every image to
  exactly its placeholder count (with a trained connector the server lists, when
  the request picks one).

Pixtral-HF configs (which share the LLaVA architecture name) and precomputed
``image_embeds`` pass through uncompressed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..auto_budget import adaptive_budget
from ..config import (
    AUTO,
    CONNECTORS_KEY,
    CompressionSpec,
    engine_connectors,
    method_reads_text,
)
from ..connectors import ConnectorModules, check_trained_for, is_connector_method
from ..methods import VisualTokens, get_method, method_class
from ..show import to_image
from . import settings
from .clip_signals import capture_feature_layer_signals
from .debug_log import log_selection
from .lm_probe import text_to_vision_attention
from .mustdrop_tower import encode_with_window_merge, supports_tower_merge
from .parallel import PipelineLimit, llava_pipeline_limit
from .preview import llava_item, png_of_groups, uncompressed_item
from .processing import CompressingInfo, CompressingProcessor
from .text_signals import with_text_fallback
from .vllm_api import (
    MULTIMODAL_REGISTRY,
    ImageEmbeddingItems,
    ImageProcessorItems,
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    MultiModalFieldConfig,
    PromptReplacement,
    engine_mm_processor_kwargs,
    in_tree_llava_info,
    in_tree_llava_processor,
)
from .worker_rpc import report_item

logger = logging.getLogger("vllm_tokcomp")


class CompressedLlavaInfo(CompressingInfo, LlavaProcessingInfo):
    def check_engine_only_settings(self, ctx) -> None:  # noqa: ANN001 - vLLM's InputProcessingContext
        _check_connectors_trained_for(self.engine_kwargs, ctx.model_config.model)

    def pipeline_limit(self, stages: int) -> PipelineLimit:
        return llava_pipeline_limit(self.get_hf_config().text_config.num_hidden_layers, stages)

    def unsupported_reason(self) -> str | None:
        vision_type = self.get_hf_config().vision_config.model_type
        if vision_type == "clip_vision_model":
            return None
        return f"vision tower {vision_type!r} is not supported (CLIP only)"


class CompressedLlavaProcessor(CompressingProcessor, LlavaMultiModalProcessor):
    info: CompressedLlavaInfo

    def preview_items(self, engine_input) -> list[dict]:  # noqa: ANN001 - vLLM's engine input
        """Each image's entry of ``POST /tokcomp/preview`` (integration/preview.py)."""
        side = self._grid_side()
        entries = []
        placeholders = engine_input.get("mm_placeholders", {}).get("image", [])
        for index, item in enumerate(engine_input["mm_kwargs"].get("image", [])):
            spec = settings.item_spec(item, settings.FIELD)
            if spec is None:
                entries.append(uncompressed_item("image", placeholders[index].get_num_embeds()))
            else:
                entries.append(llava_item(spec, side * side, (side, side)))
        return entries

    def draw_previews(self, engine_input, entries: list[dict]) -> None:  # noqa: ANN001 - vLLM's engine input
        """Adds ``png`` to each entry with known groups: the groups drawn over the image the model sees."""
        side = self._grid_side()
        for entry, item in zip(entries, engine_input["mm_kwargs"].get("image", []), strict=True):
            pixels = item.get("pixel_values")
            if entry["groups"] is not None and entry["method"] is not None and pixels is not None:
                image = to_image(pixels.data, self.info.get_hf_processor().image_processor)
                entry["png"] = png_of_groups(image, (side, side), entry["groups"])

    def _compressed_items(self, result) -> list[tuple[str, int, int]]:  # noqa: ANN001 - vLLM's MultiModalInputs
        """``(method, tokens without compression, tokens served)`` per compressed image of a processed request."""
        full = self._grid_side() ** 2
        specs = (settings.item_spec(item, settings.FIELD) for item in result["mm_kwargs"].get("image", []))
        return [(spec.method, full, settings.kept_tokens(spec, full)) for spec in specs if spec is not None]

    def _grid_side(self) -> int:
        vision = self.info.get_hf_config().vision_config
        return vision.image_size // vision.patch_size

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):  # noqa: ANN001, ANN201
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        pixel_values = processed_data.get("pixel_values")
        if pixel_values is not None:
            spec = self.info.processed_spec(hf_processor_mm_kwargs)
            count = len(pixel_values)
            processed_data[settings.FIELD] = torch.stack([self._resolve_budget(spec, image) for image in pixel_values])
            processed_data[settings.QUERY_FIELD] = settings.query_rows(hf_processor_mm_kwargs, count)
        return processed_data

    def _resolve_budget(self, spec: CompressionSpec | None, pixels: torch.Tensor) -> torch.Tensor:
        """The image's settings row; a ratio or an ``auto`` budget becomes a count (from the pixels for ``auto``)."""
        vision = self.info.get_hf_config().vision_config
        grid = vision.image_size // vision.patch_size
        if spec is not None:
            spec = spec.for_item(grid * grid)
        if spec is not None and spec.budget == AUTO:
            knobs = {k: v for k, v in spec.options if k in ("threshold", "window")}
            estimator = dict(spec.options).get("auto_estimator", "cosine")
            budget = adaptive_budget(pixels, grid * grid, patch=vision.patch_size, estimator=estimator, **knobs)
            spec = dataclasses.replace(spec, budget=budget)
        return settings.encode(spec)

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
            size = images.get_image_size(item_idx)
            full = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)
            spec = settings.decode(out_mm_kwargs["image"][item_idx][settings.FIELD].data)
            return [image_token_id] * settings.kept_tokens(spec, full)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=get_replacement)]


def build_info(ctx):  # noqa: ANN001, ANN201
    """Our info for CLIP/SigLIP LLaVA configs; vLLM's own for Pixtral-HF."""
    if ctx.get_hf_config().vision_config.model_type == "pixtral":
        return in_tree_llava_info(ctx)
    return CompressedLlavaInfo(ctx)


def build_processor(info, dummy_inputs):  # noqa: ANN001, ANN201
    if isinstance(info, CompressedLlavaInfo):
        return CompressedLlavaProcessor(info, dummy_inputs)
    return in_tree_llava_processor(info, dummy_inputs)


_connectors_checked: set[tuple[str, tuple[str, ...]]] = set()


def _check_connectors_trained_for(engine_kwargs: Mapping[str, object], model: str) -> None:
    """A listed connector must have been trained for the served weights (one ``model.safetensors``).

    Once per model and listing in a process: vLLM builds the processing info for every request, and the check
    hashes the whole weights file."""
    connectors = engine_connectors(engine_kwargs)
    key = (model, tuple(str(connector.stem) for connector in connectors.values()))
    if not connectors or key in _connectors_checked:
        return
    weights = Path(model) / "model.safetensors"
    unchecked = check_trained_for(connectors, weights if weights.is_file() else None,
                                  f"mm_processor_kwargs.{CONNECTORS_KEY}")
    if unchecked:
        logger.warning("tokcomp: could not check that these connectors were trained for %s: %s", model,
                       ", ".join(unchecked))
    _connectors_checked.add(key)


@MULTIMODAL_REGISTRY.register_processor(build_processor, info=build_info, dummy_inputs=LlavaDummyInputsBuilder)
class CompressedLlava(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` whose image embeddings are compressed per image."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # noqa: ANN001 - vLLM's VllmConfig
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # Not submodules: vLLM's loader would expect their weights in the model's checkpoint. The listing is
        # validated by the processor info (same engine kwargs); the weights are loaded here.
        self.tokcomp_connectors = ConnectorModules(engine_connectors(engine_mm_processor_kwargs(vllm_config)))

    def embed_multimodal(self, **kwargs: object):  # noqa: ANN201 - vLLM's MultiModalEmbeddings
        rows = kwargs.pop(settings.FIELD, None)
        queries = kwargs.pop(settings.QUERY_FIELD, None)
        pixel_values = kwargs.get("pixel_values")
        if rows is None or pixel_values is None:
            return super().embed_multimodal(**kwargs)
        specs = [settings.decode(row) for row in rows]
        if all(spec is None for spec in specs):
            return super().embed_multimodal(**kwargs)
        query_ids = [settings.decode_query(row) for row in queries] if queries is not None else [None] * len(specs)
        return self._embed_compressed(kwargs, specs, query_ids)

    def _text_signals(self, method: str, features: torch.Tensor, ids: torch.Tensor | None) -> dict:
        """Text embeddings and/or probe attention for text-guided methods; empty for a text-free prompt."""
        if ids is None or ids.numel() == 0 or not method_reads_text(method):
            return {}
        language_model = self.get_language_model()
        text = language_model.embed_input_ids(ids.to(features.device))
        signals = {"text_embeds": text}
        cls = method_class(method)
        if cls.reads_lm_probe():
            signals["text_attention"] = text_to_vision_attention(language_model, features, text)
        return signals

    def _embed_compressed(
        self, kwargs: dict, specs: list[CompressionSpec | None], query_ids: list[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        image_input = self._parse_and_validate_image_input(**kwargs)
        pixels = image_input["pixel_values"]
        grid_side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        grid = (grid_side, grid_side)
        num_patches = grid_side * grid_side
        in_tower = [index for index, spec in enumerate(specs) if self._merges_in_tower(spec)]
        batched = [index for index in range(len(specs)) if index not in in_tower]
        outputs: dict[int, torch.Tensor] = {}
        if batched:
            outputs.update(self._embed_batched(pixels, batched, [specs[i] for i in batched], query_ids, grid))
        for index in in_tower:
            outputs[index] = self._embed_mustdrop_in_tower(pixels[index], specs[index], query_ids[index], grid)
        ordered = []
        for index, spec in enumerate(specs):
            item = outputs[index]
            expected = settings.kept_tokens(spec, num_patches)
            # vLLM silently truncates extra rows; a mismatch must fail here instead.
            if item.shape[0] != expected:
                raise RuntimeError(f"tokcomp produced {item.shape[0]} rows for an image with {expected} placeholders")
            ordered.append(item)
        return ordered

    def _embed_batched(self, pixels, indices, specs, query_ids, grid) -> dict[int, torch.Tensor]:  # noqa: ANN001
        """The tower on the whole sub-batch as vLLM runs it, then each image compressed on its own."""
        wants_signals = any(spec is not None and _uses_vision_signals(spec.method) for spec in specs)
        subset = pixels[indices]
        if wants_signals:
            every_layer = any(spec is not None and _uses_layer_signals(spec.method) for spec in specs)
            with capture_feature_layer_signals(self.vision_tower, grid[0] * grid[1], every_layer) as signals:
                features = self._image_pixels_to_features(self.vision_tower, subset)
        else:
            signals = None
            features = self._image_pixels_to_features(self.vision_tower, subset)
        embeds = self.multi_modal_projector(features)
        outputs = {}
        for position, (index, spec) in enumerate(zip(indices, specs, strict=True)):
            item = embeds[position]
            if spec is not None:
                start = time.perf_counter()
                if is_connector_method(spec.method):
                    connector = self.tokcomp_connectors.get(spec.method, spec.budget, item.device)
                    result = connector(VisualTokens(features=item, grid=grid))
                else:
                    tokens = VisualTokens(
                        features=item,
                        grid=grid,
                        cls_attention=None if signals is None else signals[position].cls_attention,
                        layer_cls_attention=None if signals is None else signals[position].layer_cls_attention,
                        keys=None if signals is None else signals[position].keys,
                        key_heads=None if signals is None else signals[position].key_heads,
                        **self._text_signals(spec.method, item, query_ids[index]),
                    )
                    method = get_method(spec.method, **dict(spec.options))
                    result = method(with_text_fallback(spec.method, tokens), spec.budget)
                item = result.features
                if report_item(spec, result.assignment.destination, time.perf_counter() - start):
                    log_selection(spec, grid, result.assignment.anchor)
            outputs[index] = item
        return outputs

    def _merges_in_tower(self, spec: CompressionSpec | None) -> bool:
        if spec is None or spec.method != "mustdrop" or not dict(spec.options).get("stage1", True):
            return False
        return supports_tower_merge(self.vision_tower)

    def _embed_mustdrop_in_tower(self, pixels, spec: CompressionSpec, ids, grid) -> torch.Tensor:  # noqa: ANN001
        """MustDrop with stage 1 inside the tower (after layer 0), then stage 2 on the merged tokens."""
        options = dict(spec.options)
        method = get_method("mustdrop", **{**options, "stage1": False})
        tower = encode_with_window_merge(
            self.vision_tower, pixels, grid=grid, budget=spec.budget, threshold=method.threshold,
            window=method.window, feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        embeds = self.multi_modal_projector(tower.features)
        start = time.perf_counter()
        tokens = VisualTokens(
            features=embeds,
            grid=(embeds.shape[0],),
            cls_attention=tower.signals.cls_attention,
            keys=tower.signals.keys,
            key_heads=tower.signals.key_heads,
            sizes=tower.sizes,
            **self._text_signals("mustdrop", embeds, ids),
        )
        result = method(tokens, spec.budget)
        assignment = tower.assignment.then(result.assignment)
        if report_item(spec, assignment.destination, time.perf_counter() - start):
            log_selection(spec, grid, assignment.anchor)
        return result.features


def _uses_layer_signals(method: str) -> bool:
    """Whether every tower layer's [CLS] attention is captured for ``method`` (not only the feature layer's)."""
    return not is_connector_method(method) and method_class(method).needs_layer_cls_attention


def _uses_vision_signals(method: str) -> bool:
    """Whether the feature layer's [CLS] attention and keys are captured for ``method`` (trained connectors read
    neither)."""
    return not is_connector_method(method) and method_class(method).reads_tower_signals()
