import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_llava_dir() -> Path:
    from vllm_tokcomp.tiny.llava_builder import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    """The tiny Qwen2-VL model, built once."""
    from vllm_tokcomp.tiny.qwen2_vl_builder import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def qwen25_dir() -> Path:
    """The tiny Qwen2.5-VL model, built once."""
    from vllm_tokcomp.tiny.qwen2_vl_builder import ensure_default_model

    return ensure_default_model("qwen2_5_vl")


@pytest.fixture(scope="session")
def qwen3_dir() -> Path:
    """The tiny Qwen3-VL model, built once."""
    from vllm_tokcomp.tiny.qwen3_vl_builder import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="module")
def selection_log(tmp_path_factory) -> Path:
    """A module's selection debug log (``TOKCOMP_SELECTION_LOG``): which tokens each compressed item kept."""
    return tmp_path_factory.mktemp("selection") / "selection.jsonl"


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
    proc = run_process_group([sys.executable, "-m", "tests.e2e.offline_runner", json.dumps(job)], env, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"engine failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def run_runner_module(module: str, job: dict, env: dict[str, str], *, plugins: str,
                      logs: dict[str, tuple[str, Path]]) -> dict:
    """Run ``python -m module JOB`` (a test file that is also an engine runner) in a fresh process group with
    ``VLLM_PLUGINS=plugins``; return its RESULT, with each debug log ``{key: (env var, path)}`` read back as
    ``result[key]`` (one JSON record per line)."""
    env = {**env, "VLLM_PLUGINS": plugins, **{var: str(path) for var, path in logs.values()}}
    proc = run_process_group([sys.executable, "-m", module, json.dumps(job)], env, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            for key, (_var, path) in logs.items():
                result[key] = [json.loads(x) for x in open(path)] if os.path.exists(path) else []
            return result
    raise AssertionError(f"engine failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def run_process_group(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group; on timeout kill the whole group (vLLM's engine and workers too)."""
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            output = f"{stdout[-3000:]}\n{stderr[-3000:]}"
            raise AssertionError(f"timed out after {timeout} s: {command[:4]}\n{output}") from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def post_preview(base_url: str, body: dict, query: str = "") -> dict:
    """``POST /tokcomp/preview`` with a chat completion ``body``; the JSON answer."""
    import urllib.request

    request = urllib.request.Request(f"{base_url}/tokcomp/preview{query}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def check_tiled_preview(preview: dict, kwargs: dict, full: list[int], base: int, side: int) -> None:
    """A tiled family's preview of two images (the first a square of ``side x side`` tiles after a ``base``-token
    view): per image its counts and, from the engine, one group per uncompressed placeholder (base view, then each
    tile row and its newline); the kept slots are exactly the budget's, every newline of the square is dropped."""
    items = preview["items"]
    assert [item["tokens_before"] for item in items] == full
    for item in items:
        assert item["decided"] == "engine" and item["tokens_after"] == kwargs["tokcomp_budget"]
        assert len(item["groups"]) == item["tokens_before"]
        assert {g for g in item["groups"] if g >= 0} == set(range(kwargs["tokcomp_budget"]))
    newlines = [base + row * (side + 1) + side for row in range(side)]
    assert all(items[0]["groups"][at] == -1 for at in newlines)
