"""Cost of every registered compressor per image, next to one CLIP-L-sized vision-encoder forward.

The implementation is ``vllm_tokcomp.bench.method_cost`` (also ``tokcomp bench``); see its docstring for the options.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout run without the package installed

if __name__ == "__main__":
    runpy.run_module("vllm_tokcomp.bench.method_cost", run_name="__main__", alter_sys=True)
