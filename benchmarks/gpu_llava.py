"""LLaVA-1.5-7B's geometry on one GPU, outside vLLM: encoder, compression, prefill and KV-bound requests/s.

The implementation is ``vllm_tokcomp.bench.gpu_llava`` (also ``tokcomp bench``); see its docstring for the options.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout run without the package installed

if __name__ == "__main__":
    runpy.run_module("vllm_tokcomp.bench.gpu_llava", run_name="__main__", alter_sys=True)
