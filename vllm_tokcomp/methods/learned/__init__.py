"""Learned visual-token compressors (``torch.nn.Module``s) with the same bookkeeping as the registry.

They are not in the fixed-budget registry: their output count is fixed by construction
(number of queries, pooled grid, tokens per frame), not chosen per call, and they need
trained weights. Each returns a :class:`~vllm_tokcomp.methods.base.CompressionResult`
whose assignment is *nominal* bookkeeping (which patches an output stands for and where it
sits), because a learned output mixes many inputs.
"""

from .base import LearnedCompressor, chunk_assignment
from .c_abstractor import CAbstractor
from .llama_vid import LlamaVidCompressor
from .pixel_unshuffle import PixelUnshuffleMLP
from .qformer import QFormerResampler

__all__ = [
    "CAbstractor",
    "LearnedCompressor",
    "LlamaVidCompressor",
    "PixelUnshuffleMLP",
    "QFormerResampler",
    "chunk_assignment",
]
