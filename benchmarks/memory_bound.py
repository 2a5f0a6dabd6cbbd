"""Memory-bound regime: a fixed, small KV cache; max concurrent running requests and throughput per arm.

The implementation is ``vllm_tokcomp.bench.memory_bound`` (also ``tokcomp bench``); see its docstring for the options.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout run without the package installed

if __name__ == "__main__":
    runpy.run_module("vllm_tokcomp.bench.memory_bound", run_name="__main__", alter_sys=True)
