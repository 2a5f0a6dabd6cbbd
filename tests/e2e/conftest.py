import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_llava_dir() -> Path:
    from vllm_tokcomp.tiny.llava import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory) -> dict[str, str]:
    """Environment for real vLLM processes on this machine: offline, small KV cache, private caches."""
    cache = tmp_path_factory.mktemp("vllm-cache")
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(cache),
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "PYTHONPATH": str(REPO),
    }


def run_engine(job: dict, env: dict[str, str], *, plugins: str, kv_log: Path) -> dict:
    """Run ``offline_runner`` in a fresh process with ``VLLM_PLUGINS=plugins``; return its RESULT."""
    env = {**env, "VLLM_PLUGINS": plugins, "TOKCOMP_KV_LOG": str(kv_log)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.e2e.offline_runner", json.dumps(job)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"engine failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
