"""MustDrop stage 1 inside the CLIP tower: merge redundant windows after the first layer.

The published MustDrop merges spatially redundant 3x3 windows right after the
first ViT layer, so every later layer runs on fewer tokens; this is where its
vision-encoder saving comes from. We re-run vLLM's CLIP tower layer by layer
(its own modules and weights) for one image: embeddings, pre-norm, layer 0,
window merge (never below the budget), the remaining layers on the merged
sequence, then vLLM's own feature selection. The returned ``TokenAssignment``
says which patches each surviving token stands for; CLS attention and keys of
the feature layer are captured on the merged sequence, as in the paper (the key
set is computed at the last layer over the tokens present there).

Checked against vLLM 0.32.0 ``CLIPVisionTransformer`` (``embeddings``,
``pre_layrnorm``, ``encoder.layers``, ``post_layernorm``) and
``resolve_visual_encoder_outputs``; tests/test_vllm_api.py guards them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from vllm.model_executor.models.vision import resolve_visual_encoder_outputs

from ..methods import TokenAssignment
from ..methods.mustdrop_stages import MustDropStage1
from .clip_signals import VisionSignals, capture_feature_layer_signals


@dataclass(frozen=True)
class TowerMergeResult:
    features: Tensor  # [M, Dv] feature-layer outputs of the surviving tokens
    assignment: TokenAssignment  # 576 patches -> M tokens
    sizes: Tensor  # [M] patches per token
    signals: VisionSignals  # CLS attention / keys over the M tokens


def supports_tower_merge(vision_tower: nn.Module) -> bool:
    """Merging after layer 0 needs at least one more layer (the feature layer) after it."""
    return len(vision_tower.vision_model.encoder.layers) >= 2


def encode_with_window_merge(
    vision_tower: nn.Module,
    pixel_values: Tensor,
    *,
    grid: tuple[int, int],
    budget: int,
    threshold: float,
    window: int,
    feature_select_strategy: str | None,
) -> TowerMergeResult:
    """Run one image (``[3, H, W]``) through the tower with MustDrop's stage-1 merge after layer 0."""
    model = vision_tower.vision_model
    layers = model.encoder.layers
    hidden = model.pre_layrnorm(model.embeddings(pixel_values[None].to(model.dtype)))
    hidden = layers[0](hidden)
    # The key set is unknown this early (it comes from the last layer), so nothing is protected here.
    stage1 = MustDropStage1(threshold=threshold, window=window, key_ratio=0.0)
    assignment, sizes, merged = stage1.merge_in_tower(hidden[0, 1:], grid, budget)
    hidden = torch.cat([hidden[0, :1], merged], dim=0)[None]
    rest = layers[1:]
    num_tokens = merged.shape[0]
    with capture_feature_layer_signals(vision_tower, num_tokens) as captured:
        for layer in rest:
            hidden = layer(hidden)
    features = resolve_visual_encoder_outputs(
        hidden, model.post_layernorm, feature_select_strategy=feature_select_strategy
    )[0]
    return TowerMergeResult(features=features, assignment=assignment, sizes=sizes, signals=captured[0])
