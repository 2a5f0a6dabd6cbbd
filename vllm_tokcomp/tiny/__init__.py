"""Tiny, locally generated models for tests and CPU experiments (no downloads).

``from vllm_tokcomp.tiny import build_tiny_llava`` works; the submodule is imported lazily
so that ``python -m vllm_tokcomp.tiny.llava_builder`` runs cleanly.
"""

from __future__ import annotations

__all__ = ["build_tiny_llava", "default_model_dir", "ensure_default_model"]


def __getattr__(name: str):  # noqa: ANN202 - PEP 562 lazy attribute
    if name in __all__:
        from . import llava_builder as llava

        return getattr(llava, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
