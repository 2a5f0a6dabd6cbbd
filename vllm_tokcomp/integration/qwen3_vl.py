"""Qwen3-VL with visual-token compression before KV allocation: the Qwen2-VL integration
(``integration/qwen2_vl.py``: the same settings, routes, processing-time assignments and position hook) with
what Qwen3-VL changes (vLLM 0.32.0, ``model_executor/models/qwen3_vl.py``):

* **DeepStack.** The tower's output row per merged token is the main feature followed by one feature per
  DeepStack level (``visual_dim * (1 + levels)`` columns); vLLM splits the levels off in
  ``_compute_deepstack_embeds`` and adds them to the first LM layers' hidden states at the image tokens. A
  method's assignment is applied to the whole row, so every level keeps or merges exactly the tokens the main
  feature does; a method that reads content decides on the main feature alone.
* **Videos are frames.** Each temporal patch is its own ``<t seconds><|vision_start|><|video_pad|>*n
  <|vision_end|>`` span and its own M-RoPE grid ``(1, h, w)`` (time is carried by the timestamps' text positions).
  So a video is compressed frame by frame (:func:`parts.frame_counts`): the video's budget (a count, or a share of all
  its tokens) is spread evenly over its frames, earlier frames taking the remainder, every frame keeping at least
  one token; each frame is compressed on its own grid, and its kept tokens take their anchors' ``(0, row, col)``
  after that frame's ``<|vision_start|>``. Timestamps and the text after each frame keep their uncompressed
  positions (the frame's full extent, as vLLM's EVS rule).
* Interleaved M-RoPE changes how the LM rotates the three position axes, not the positions themselves.

vLLM's own video pruning (EVS / VidCom2, ``video_pruning_rate``) and tokcomp are not composed: one of them is
refused at startup or per request, as on Qwen2.5-VL.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ..config import CompressionSpec
from . import settings
from .debug_log import log_selection
from .mrope import item_positions
from .parts import frame_counts
from .preview import qwen_item
from .qwen2_vl import (
    MODALITY_FIELDS,
    QwenInfo,
    QwenProcessor,
    _compress_item,
    _log_positions,
    _ModelMixin,
    compress_rows,
)
from .qwen_routes import ENCODER, PIXELS, item_anchors, pixel_assignment, qwen_route
from .vllm_api import (
    MULTIMODAL_REGISTRY,
    PromptReplacement,
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeProcessingInfo,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
    without_encoder_cudagraphs,
)
from .worker_rpc import report_item


def frame_specs(spec: CompressionSpec, grid: tuple[int, int, int]) -> list[CompressionSpec]:
    """One spec per frame of a ``(t, h, w)`` video grid, each with its frame's count (:func:`frame_counts`)."""
    t, h, w = grid
    return [dataclasses.replace(spec, budget=count, ratio=None) for count in frame_counts(spec, t, h * w)]


def _frame_rows(row: torch.Tensor | None, frames: int) -> list[torch.Tensor | None]:
    return [None] * frames if row is None else list(torch.as_tensor(row).reshape(frames, -1))


def video_preview(spec: CompressionSpec, grid: tuple[int, int, int], assignment_row: torch.Tensor | None) -> dict:
    """A video's ``tokens_after``, ``groups`` and ``decided`` preview fields, frame by frame: each frame's groups
    (``preview.qwen_item`` on its ``(1, h, w)`` grid; a pixel-decided method's from its part of the processor's
    ``assignment_row``) with the output slots numbered across the frames as the model serves them; ``groups`` null
    while any frame's are unknown (an encoder-decided method: the engine fills them in)."""
    t, h, w = grid
    decided = assignment_row is not None and qwen_route(spec.method) == PIXELS
    rows = _frame_rows(assignment_row if decided else None, t)
    frames = [qwen_item("video", frame_spec, h * w, (1, h, w), row)
              for frame_spec, row in zip(frame_specs(spec, grid), rows, strict=True)]
    groups: list[int] | None = []
    served = 0
    for frame in frames:
        if groups is not None and frame["groups"] is not None:
            groups += [g + served if g >= 0 else g for g in frame["groups"]]
        else:
            groups = None
        served += frame["tokens_after"]
    return {"tokens_after": served, "groups": groups, "decided": frames[0]["decided"] if groups is not None else None}


class CompressedQwen3VLInfo(QwenInfo, Qwen3VLProcessingInfo):
    pass


class CompressedQwen3VLMoeInfo(QwenInfo, Qwen3VLMoeProcessingInfo):
    pass


class CompressedQwen3VLProcessor(QwenProcessor, Qwen3VLMultiModalProcessor):
    """Images as on Qwen2-VL; a video's assignment row and prompt replacement frame by frame."""

    def _item_assignment(self, modality: str, spec: CompressionSpec | None, patches: torch.Tensor,
                         grid: tuple[int, int, int], merge: int, patch_size: int) -> torch.Tensor:
        if modality != "video" or spec is None:
            return pixel_assignment(spec, patches, grid, merge, patch_size)
        t, h, w = grid
        # The HF processor's patch rows are frame-major: each frame's h * w * merge^2 patches are consecutive.
        frames = patches.reshape(t, -1, patches.shape[-1])
        return torch.cat([pixel_assignment(s, p, (1, h, w), merge, patch_size)
                          for s, p in zip(frame_specs(spec, grid), frames, strict=True)])

    def preview_items(self, engine_input) -> list[dict]:  # noqa: ANN001 - vLLM's engine input
        """As on Qwen2-VL, with a video's count and groups put together frame by frame (:func:`video_preview`)."""
        entries = super().preview_items(engine_input)
        for entry, (modality, _index, item, spec, grid) in zip(entries, self._item_specs(engine_input["mm_kwargs"]),
                                                              strict=True):
            if modality == "video" and spec is not None:
                row = item.get(settings.ASSIGNMENT_FIELDS["video"])
                entry.update(video_preview(spec, grid, None if row is None else row.data))
        return entries

    def _served_tokens(self, modality: str, spec: CompressionSpec, grid: tuple[int, int, int]) -> int:
        if modality != "video":
            return super()._served_tokens(modality, spec, grid)
        t, h, w = grid
        return sum(frame_counts(spec, t, h * w))

    def _compressed_replacement(self, modality: str, item, spec: CompressionSpec, original: PromptReplacement,  # noqa: ANN001
                                item_idx: int) -> object:
        if modality != "video":
            return super()._compressed_replacement(modality, item, spec, original, item_idx)
        config = self.info.get_hf_config()
        merge = config.vision_config.spatial_merge_size
        t, h, w = (int(v) for v in item["video_grid_thw"].data.tolist())
        # vLLM's own builder of the per-frame spans (timestamps, vision start/end), with our counts per frame.
        return Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=frame_counts(spec, t, (h // merge) * (w // merge)),
            timestamps=item["timestamps"].data,
            tokenizer=self.info.get_tokenizer(),
            vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id,
            video_token_id=config.video_token_id,
            select_token_id=True,
        )


class _Qwen3ModelMixin(_ModelMixin):
    """DeepStack-wide rows, videos frame by frame, Qwen3-VL's per-frame M-RoPE layout."""

    def _embedding_width(self) -> int:
        return self.visual_dim + (self.multiscale_dim if self.use_deepstack else 0)

    def _compress(self, modality: str, embedding: torch.Tensor, spec: CompressionSpec, grid: tuple[int, int, int],
                  assignment_row: torch.Tensor | None, text_embeds: torch.Tensor | None, t_factor: float,
                  ) -> torch.Tensor:
        del t_factor  # Qwen3-VL's frames carry time in their timestamps, not in the t position
        if modality != "video":
            return _compress_item(embedding, spec, grid, assignment_row, text_embeds, decision_width=self.visual_dim)
        # Frame by frame, timed and reported as one item (one observation, one selection record per video).
        start = time.perf_counter()
        t, h, w = grid
        frames = embedding.reshape(t, h * w, embedding.shape[-1])
        features, destinations, anchors, served_so_far = [], [], [], 0
        for f, (rows, frame_spec, row) in enumerate(
            zip(frames, frame_specs(spec, grid), _frame_rows(assignment_row, t), strict=True)
        ):
            frame_features, destination, kept = compress_rows(rows, frame_spec, (1, h, w), row, text_embeds,
                                                              decision_width=self.visual_dim)
            features.append(frame_features)
            destinations.append(torch.where(destination >= 0, destination + served_so_far, destination))
            anchors.append(kept + f * h * w)
            served_so_far += frame_features.shape[0]
        served = report_item(spec, torch.cat(destinations), time.perf_counter() - start)
        if served and qwen_route(spec.method) == ENCODER:
            log_selection(spec, grid, torch.cat(anchors))
        return torch.cat(features)

    def get_mrope_input_positions(self, input_tokens, mm_features):  # noqa: ANN001, ANN201 - SupportsMRoPE
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        specs = [_feature_spec(f) for f in features]
        if getattr(self, "is_multimodal_pruning_enabled", False) or all(s is None for s, _ in specs):
            return super(_ModelMixin, self).get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        positions: list[np.ndarray] = []
        next_start, st, items = 0, 0, []
        for feature, (spec, row) in zip(features, specs, strict=True):
            t, h, w = (int(v) for v in feature.data[f"{feature.modality}_grid_thw"].data.tolist())
            h, w = h // merge, w // merge
            offset = feature.mm_position.offset
            if feature.modality == "video":
                frames = [(None if spec is None else s, r) for s, r in zip(
                    [None] * t if spec is None else frame_specs(spec, (t, h, w)), _frame_rows(row, t), strict=True)]
            else:
                frames = [(spec, row)]
            for frame_spec, frame_row in frames:
                anchors = item_anchors(frame_spec, (1, h, w), frame_row)
                if feature.modality == "video":  # each frame's tokens follow its timestamp and <|vision_start|>
                    offset = input_tokens.index(self.config.vision_start_token_id, offset) + 1
                    end = input_tokens.index(self.config.vision_end_token_id, offset)
                else:
                    end = offset + feature.mm_position.length
                if anchors.numel() != end - offset:
                    raise RuntimeError(f"tokcomp: {feature.modality} at {offset} has {end - offset} placeholders, "
                                       f"layout {anchors.numel()}")
                text_len = offset - st
                positions.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_start)
                base = next_start + text_len
                kept, extent = item_positions((1, h, w), anchors)
                positions.append(kept + base)
                next_start, st = base + extent, end
                items.append({"offset": offset, "grid": [1, h, w], "anchors": anchors.tolist()})
                offset = end + 1
        if st < len(input_tokens):
            text_len = len(input_tokens) - st
            positions.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_start)
        llm_positions = np.concatenate(positions, axis=1).reshape(3, -1)
        delta = int(llm_positions.max()) + 1 - len(input_tokens)
        _log_positions(input_tokens, items, llm_positions, delta)
        return torch.from_numpy(np.ascontiguousarray(llm_positions)), delta


def _feature_spec(feature) -> tuple[CompressionSpec | None, torch.Tensor | None]:  # noqa: ANN001 - MultiModalFeatureSpec
    """An item's settings and processing-time assignment row (``None`` where absent)."""
    field = MODALITY_FIELDS.get(feature.modality)
    if field is None or feature.data is None or field not in feature.data:
        return None, None
    spec = settings.decode(feature.data[field].data)
    assignment = feature.data.get(settings.ASSIGNMENT_FIELDS[feature.modality])
    decided = spec is not None and qwen_route(spec.method) == PIXELS and assignment is not None
    return spec, assignment.data if decided else None


@MULTIMODAL_REGISTRY.register_processor(
    CompressedQwen3VLProcessor, info=CompressedQwen3VLInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
@without_encoder_cudagraphs
class CompressedQwen3VL(_Qwen3ModelMixin, Qwen3VLForConditionalGeneration):
    """``Qwen3VLForConditionalGeneration`` whose image and video embeddings (all DeepStack levels) are compressed
    per image and per frame."""


@MULTIMODAL_REGISTRY.register_processor(
    CompressedQwen3VLProcessor, info=CompressedQwen3VLMoeInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
@without_encoder_cudagraphs
class CompressedQwen3VLMoe(_Qwen3ModelMixin, Qwen3VLMoeForConditionalGeneration):
    """``Qwen3VLMoeForConditionalGeneration`` (the same vision path, a mixture-of-experts LM), compressed alike."""


__all__ = ["CompressedQwen3VL", "CompressedQwen3VLMoe", "ENCODER", "frame_specs", "video_preview"]
