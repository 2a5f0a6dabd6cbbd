"""A budget from the pixels alone: MustDrop-style spatial redundancy, estimated before the encoder runs.

vLLM fixes every image's token count when the prompt is processed, before the
vision tower sees the image, so a threshold-based (content-adaptive) method
needs its count from something cheap that exists then: the pixels. We apply
MustDrop's stage-1 rule to raw patches instead of layer-1 features: split the
patch grid into non-overlapping ``window`` x ``window`` windows; a window whose
patches' mean pairwise cosine similarity (of their mean-removed pixel vectors,
plus a flatness test) reaches ``threshold`` would collapse to one token, saving
``members - 1`` tokens.

Two estimators (``estimator=``):

* ``"cosine"`` (default): patches compared by the cosine of their mean-removed pixel vectors (flat
  patches by their mean colour). Conservative: pixel noise and fine texture make patches look different.
* ``"texture"``: patches compared by a texture descriptor, per-channel mean and standard deviation;
  alike when both differ by less than ``texture_tolerance`` (normalised units), and a window is redundant
  when at least ``threshold`` of its pairs are alike. A ViT's first layer sees noisy or finely textured
  regions of one colour as near-identical tokens; on the synthetic test split this tracks the threshold form
  on layer-1 features much more closely (``lab/benchmarks/mustdrop_auto.py``, docs/mustdrop.md).
"""

from __future__ import annotations

import torch
from torch import Tensor


def patch_vectors(pixels: Tensor, patch: int) -> Tensor:
    """``[3, H, W]`` -> ``[H/patch * W/patch, 3 * patch * patch]`` raster-ordered patch vectors."""
    channels, height, width = pixels.shape
    grid_h, grid_w = height // patch, width // patch
    x = pixels[:, : grid_h * patch, : grid_w * patch].to(torch.float32)
    x = x.reshape(channels, grid_h, patch, grid_w, patch).permute(1, 3, 0, 2, 4)
    return x.reshape(grid_h * grid_w, -1)


def _window_savings(pixels: Tensor, patch: int, window: int, threshold: float, alike) -> int:  # noqa: ANN001
    """Tokens saved by collapsing every ``window`` x ``window`` window whose off-diagonal mean of
    ``alike(members)`` (a ``[n, n]`` pairwise similarity of the member patches) reaches ``threshold``."""
    grid_h, grid_w = pixels.shape[1] // patch, pixels.shape[2] // patch
    saved = 0
    for top in range(0, grid_h, window):
        for left in range(0, grid_w, window):
            rows = range(top, min(top + window, grid_h))
            cols = range(left, min(left + window, grid_w))
            members = torch.tensor([r * grid_w + c for r in rows for c in cols])
            if members.numel() < 2:
                continue
            off_diagonal = ~torch.eye(members.numel(), dtype=torch.bool)
            if float(alike(members)[off_diagonal].mean()) >= threshold:
                saved += members.numel() - 1
    return saved


def redundant_window_savings(
    pixels: Tensor, *, patch: int = 14, window: int = 3, threshold: float = 0.8, flat_tolerance: float = 0.05
) -> int:
    """Tokens MustDrop's stage 1 would save on this image, estimated from its pixels.

    Two patches count as alike when the cosine similarity of their pixel vectors is at least
    ``threshold`` and, for nearly flat patches (whose direction is noise), when their mean
    colours agree within ``flat_tolerance`` (in the processor's normalised units).
    """
    vectors = patch_vectors(pixels, patch)

    def alike(members: Tensor) -> Tensor:
        block = vectors[members]
        mean_colour = block.reshape(members.numel(), 3, -1).mean(-1)
        spread = block.reshape(members.numel(), 3, -1).std(-1).amax(-1)
        unit = torch.nn.functional.normalize(block - block.mean(1, keepdim=True), dim=1)
        flat = spread < flat_tolerance
        same_colour = (mean_colour[:, None] - mean_colour[None]).abs().amax(-1) < flat_tolerance
        return torch.where(flat[:, None] & flat[None], same_colour.float(), unit @ unit.T)

    return _window_savings(pixels, patch, window, threshold, alike)


ESTIMATORS = ("cosine", "texture")


def texture_window_savings(
    pixels: Tensor, *, patch: int = 14, window: int = 3, threshold: float = 0.8, texture_tolerance: float = 0.4
) -> int:
    """Like :func:`redundant_window_savings`, with patches compared by per-channel mean and std."""
    vectors = patch_vectors(pixels, patch).reshape(-1, 3, patch * patch)
    mean, std = vectors.mean(-1), vectors.std(-1)

    def alike(members: Tensor) -> Tensor:
        d_mean = (mean[members][:, None] - mean[members][None]).abs().amax(-1)
        d_std = (std[members][:, None] - std[members][None]).abs().amax(-1)
        return ((d_mean < texture_tolerance) & (d_std < texture_tolerance)).float()

    return _window_savings(pixels, patch, window, threshold, alike)


def adaptive_budget(
    pixels: Tensor, num_tokens: int, *, floor: int = 1, estimator: str = "cosine", **kwargs: float
) -> int:
    """``num_tokens`` minus the estimated stage-1 savings (``estimator``: "cosine" or "texture"), at least ``floor``."""
    if estimator == "texture":
        return max(floor, num_tokens - texture_window_savings(pixels, **kwargs))
    if estimator != "cosine":
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    return max(floor, num_tokens - redundant_window_savings(pixels, **kwargs))
