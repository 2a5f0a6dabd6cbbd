"""Accuracy vs visual-token budget through vLLM with the tokcomp plugin.

The implementation is ``vllm_tokcomp.bench.accuracy`` (also ``tokcomp bench``); see its docstring for the options.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout run without the package installed

if __name__ == "__main__":
    runpy.run_module("vllm_tokcomp.bench.accuracy", run_name="__main__", alter_sys=True)
