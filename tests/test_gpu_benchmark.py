"""benchmarks/gpu_llava.py on CPU with the tiny geometry: the schema, the KV arithmetic, no vLLM import.

The script is meant for a GPU machine without vLLM; here it runs the same code on a tiny geometry (no timing is
asserted, only what the run must write and the admission arithmetic that decides each wave's batch).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQUESTS, TEXT, OUTPUT = 6, 60, 32
KV_GIB = 0.0013  # two plain requests' KV in the tiny geometry (668 tokens x 1024 bytes each)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-bench") / "gpu-tiny.json"
    argv = ["benchmarks/gpu_llava.py", "--geometry", "tiny", "--requests", str(REQUESTS), "--text-tokens", str(TEXT),
            "--output-tokens", str(OUTPUT), "--kv-gib", str(KV_GIB), "--methods", "tome,mustdrop,pool",
            "--budgets", "64,32", "--prefill-repeats", "1", "--device", "cpu", "--out", str(out)]
    # vLLM is made unimportable: the GPU machine has none.
    code = ("import runpy, sys; sys.modules['vllm'] = None; sys.argv = " + repr(argv) +
            "; runpy.run_path('benchmarks/gpu_llava.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".md").is_file()
    return json.loads(out.read_text())


def test_schema(run):
    assert run["benchmark"] == "gpu-geometry" and run["schema_version"] == 1
    assert run["machine"]["gpu"] is None  # CPU here; the GPU run records its card
    names = [arm["name"] for arm in run["arms"]]
    assert names == ["plain"] + [f"{m}@{b}" for m in ("tome", "mustdrop", "pool") for b in (64, 32)]
    for arm in run["arms"]:
        for key in ("name", "budget", "requests_per_s", "encoder_ms_per_image", "prefill_ms", "speedup_vs_plain",
                    "method_share_of_plain_prefill"):
            assert key in arm, key
        assert arm["requests_per_s"] > 0 and arm["requests"] == REQUESTS
    plain = run["arms"][0]
    assert plain["method_ms_per_image"] is None and plain["speedup_vs_plain"] == 1.0
    mustdrop = [arm for arm in run["arms"] if arm["method"] == "mustdrop"]
    assert all(arm["probe_ms_per_image"] > 0 and arm["budget"] <= arm["stage1_tokens"] <= 576 for arm in mustdrop)
    assert all(arm["probe_ms_per_image"] is None for arm in run["arms"] if arm["method"] != "mustdrop")


def test_kv_arithmetic_decides_the_batch(run):
    # tiny LM: 4 layers x 4 KV heads x 16 dims, K and V, bf16
    assert run["kv_bytes_per_token"] == 2 * 4 * 4 * 16 * 2
    budget = KV_GIB * 2**30
    for arm in run["arms"]:
        tokens = TEXT + arm["image_tokens"] + OUTPUT
        assert arm["kv_bytes_per_request"] == run["kv_bytes_per_token"] * tokens
        assert arm["batch"] == min(REQUESTS, int(budget // arm["kv_bytes_per_request"]))
        assert arm["waves"] == math.ceil(REQUESTS / arm["batch"])
    assert run["arms"][0]["batch"] == 2  # plain: two requests' KV fit
    assert all(arm["batch"] == REQUESTS for arm in run["arms"][1:])  # 64 or 32 image tokens: all six fit at once
