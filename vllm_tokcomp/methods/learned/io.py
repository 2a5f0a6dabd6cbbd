"""Save and load a trained connector: ``NAME.safetensors`` (weights) next to ``NAME.json`` (how to build it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .base import LearnedCompressor
from .c_abstractor import CAbstractor
from .pixel_unshuffle import PixelUnshuffleMLP
from .qformer import QFormerResampler
from .residual import MeanResidual

# The image connectors (LLaMA-VID's two tokens per frame are for video, and its output is two projections).
LEARNED_CLASSES: dict[str, type[LearnedCompressor]] = {
    cls.name: cls for cls in (CAbstractor, PixelUnshuffleMLP, QFormerResampler)
}


def build_connector(method: str, kwargs: dict, mean_residual: bool = True) -> LearnedCompressor:
    """``method`` (a :data:`LEARNED_CLASSES` name) built with ``kwargs``, wrapped in :class:`MeanResidual`."""
    if method not in LEARNED_CLASSES:
        raise ValueError(f"unknown learned compressor {method!r}; known: {', '.join(sorted(LEARNED_CLASSES))}")
    inner = LEARNED_CLASSES[method](**kwargs)
    return MeanResidual(inner) if mean_residual else inner


def save_connector(module: LearnedCompressor, spec: dict, stem: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Weights (in ``dtype``) to ``stem.safetensors``; ``spec`` (``method``, ``kwargs``, ``mean_residual`` and
    whatever else describes the run) to ``stem.json``."""
    for key in ("method", "kwargs", "mean_residual"):
        if key not in spec:
            raise ValueError(f"connector spec lacks {key!r}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(spec, indent=1) + "\n")


def load_connector(stem: Path, dtype: torch.dtype = torch.float32) -> tuple[LearnedCompressor, dict]:
    """The connector saved at ``stem`` (in ``dtype``, eval mode) and its spec."""
    spec = json.loads(Path(stem).with_suffix(".json").read_text())
    module = build_connector(spec["method"], spec["kwargs"], spec["mean_residual"])
    module.load_state_dict(load_file(str(Path(stem).with_suffix(".safetensors"))))
    return module.to(dtype).eval(), spec
