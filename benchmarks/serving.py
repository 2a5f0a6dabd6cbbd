"""Online serving: ``tokcomp serve`` vs plain ``vllm serve`` under a concurrency / request-rate sweep.

The implementation is ``vllm_tokcomp.bench.serving`` (also ``tokcomp bench``); see its docstring for the options.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout run without the package installed

if __name__ == "__main__":
    runpy.run_module("vllm_tokcomp.bench.serving", run_name="__main__", alter_sys=True)
