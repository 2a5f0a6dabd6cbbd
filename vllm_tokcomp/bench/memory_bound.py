"""Memory-bound regime: a fixed, small KV cache; max concurrent running requests and throughput per arm.

Same runner as ``throughput.py`` (``--mode memory-bound``): the KV cache holds ``--plain-fit``
plain requests (``num_gpu_blocks_override``), 48 requests per arm and round are submitted at
once, and the scheduler's max ``len(running)`` is compared with the goal
0.95 x (text + 576) / (text + budget) x plain.

    .venv/bin/python benchmarks/memory_bound.py --model tiny
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vllm_tokcomp.bench.throughput import main  # noqa: E402

if __name__ == "__main__":
    main(mode_default="memory-bound")
