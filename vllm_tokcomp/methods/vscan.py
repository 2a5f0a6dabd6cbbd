"""VScan, its first stage: global and local scans with token merging, in the vision encoder.

Zhang et al., "VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models"
(arXiv:2505.22654); code: github.com/Tencent/SelfEvolvingAgent, ``VScan/llava/model/llava_arch.py``
(``encode_images``, ``window_cls_selection``, ``token_merging``). Its second stage prunes again inside the LM
(after a middle layer); that part acts on the LM's KV and is not a visual-token compressor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import assignment_from_labels
from .base import Compressor, TokenAssignment, VisualTokens
from .knobs import knob
from .prumerge import merge_into_nearest
from .registry import register


def shallow_layer_index(layers: int, depth: float) -> int:
    """The tower layer at ``depth`` (a fraction) of ``layers`` instantiated layers: ``round(depth * layers) - 1``,
    at least 0. CLIP-L as LLaVA-1.5 runs it (23 layers up to the feature layer) at 0.25 gives layer 5, VScan's."""
    return max(0, min(layers - 1, round(depth * layers) - 1))


def window_top(attention: torch.Tensor, grid: tuple[int, int], window: int, per_window: int) -> list[int]:
    """The ``per_window`` tokens of highest ``attention`` in each non-overlapping ``window x window`` window of the
    grid, windows in raster order (rows and columns beyond the last whole window are not scanned)."""
    height, width = grid
    attention_map = attention.reshape(height, width)
    picked = []
    for row in range(height // window):
        for col in range(width // window):
            block = attention_map[row * window:(row + 1) * window, col * window:(col + 1) * window].reshape(-1)
            for index in torch.topk(block, per_window).indices.tolist():
                dy, dx = divmod(index, window)
                picked.append((row * window + dy) * width + col * window + dx)
    return picked


@register
@dataclass(frozen=True)
class VScan(Compressor):
    """Local scan on a shallow layer's [CLS] attention, global scan on the feature layer's, the rest merged.

    As the official code: ``int(budget * local_ratio)`` local tokens, spread evenly over the non-overlapping
    ``window x window`` windows (each window its top tokens by the shallow layer's [CLS] attention; the official
    shallow layer is the 6th of CLIP-L, here the layer at ``shallow_depth`` of the tower), then global tokens by
    the feature layer's [CLS] attention among the rest; every other token merges into its most cosine-similar kept
    token (the plain mean of the kept token and its members); outputs in raster order. Exactly the budget: when the
    windows do not divide the local share, the official code keeps fewer tokens (``per_window x windows`` local),
    here the global scan takes the remainder (identical whenever the windows divide it, e.g. 192 to 32 tokens on
    24 x 24 with 6 x 6 windows). Merging compares the features the method is given (official: the projector's
    outputs, as on LLaVA here).
    """

    local_ratio: float = knob(0.5, low=0.0, high=1.0)  # share of the budget the local scan picks
    window: int = knob(6, low=1, high=64)  # side of the local scan's windows, in tokens
    shallow_depth: float = knob(0.25, low=0.0, high=1.0)  # where the local scan's layer sits in the tower

    name = "vscan"
    paper = "VScan (stage 1), Zhang et al., arXiv:2505.22654"
    family = "attention"
    needs_cls_attention = True
    needs_layer_cls_attention = True
    merges = True

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        n = tokens.num_tokens
        grid = tokens.grid[-2:] if len(tokens.grid) >= 2 else (1, n)
        frames = n // (grid[0] * grid[1])
        layers = tokens.layer_cls_attention
        shallow = layers[shallow_layer_index(layers.shape[0], self.shallow_depth)].to(torch.float32)
        local_target = int(budget * self.local_ratio)
        windows = frames * (grid[0] // self.window) * (grid[1] // self.window)
        per_window = min(local_target // windows, self.window * self.window) if windows else 0
        local = []
        for frame in range(frames):  # a video: every frame scanned on its own grid
            offset = frame * grid[0] * grid[1]
            local += [offset + i for i in window_top(shallow[offset:offset + grid[0] * grid[1]], grid, self.window,
                                                     per_window)]
        deep = tokens.cls_attention.to(torch.float32).clone()
        deep[local] = float("-inf")
        global_ = torch.topk(deep, budget - len(local)).indices
        kept = torch.sort(torch.cat([torch.tensor(local, dtype=torch.long), global_.cpu()])).values
        labels = merge_into_nearest(tokens.features, kept.to(tokens.features.device))
        return assignment_from_labels(labels)
