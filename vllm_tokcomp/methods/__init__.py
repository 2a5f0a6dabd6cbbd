"""Visual-token compressors: pure torch, one interface, one registry. No vLLM imports here."""

from .base import (
    DROPPED,
    CompressionResult,
    Compressor,
    ScorePruner,
    TokenAssignment,
    VisualTokens,
    compress_batch,
    top_k_in_order,
)
from .registry import available_methods, describe, get_method, method_class, register

__all__ = [
    "DROPPED",
    "CompressionResult",
    "Compressor",
    "ScorePruner",
    "TokenAssignment",
    "VisualTokens",
    "available_methods",
    "compress_batch",
    "describe",
    "get_method",
    "method_class",
    "register",
    "top_k_in_order",
]
