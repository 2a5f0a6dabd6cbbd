"""Lab tests import ``tokcomp_lab`` (from lab/), ``lab.benchmarks`` and ``vllm_tokcomp`` (from the repo root)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for path in (REPO / "lab", REPO):  # the repo root ends up first: ``benchmarks`` stays the product's folder
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
