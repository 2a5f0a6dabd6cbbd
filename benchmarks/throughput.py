"""Offline throughput of plain vLLM vs vllm-tokcomp (every method x budget) in one interleaved run.

The implementation is ``vllm_tokcomp.bench.throughput`` (also ``tokcomp bench``); see its docstring for the options.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout run without the package installed

if __name__ == "__main__":
    runpy.run_module("vllm_tokcomp.bench.throughput", run_name="__main__", alter_sys=True)
