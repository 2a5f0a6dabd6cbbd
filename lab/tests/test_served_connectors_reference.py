"""The bundled connectors served through real vLLM (``benchmarks/accuracy.py``, the engine listing two of them,
each request picking one) against lab/benchmarks/accuracy_learned.py's transformers path (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
C16, Q16 = (str(REPO / "connectors" / name) for name in ("c_abstractor-16", "qformer-16"))


@pytest.mark.slow
def test_vllm_serves_connectors_as_the_transformers_reference_computes_them(tmp_path: Path) -> None:
    """The harness through real vLLM (engine listing two bundled connectors, each request picking one) against
    ``accuracy_learned``'s transformers path (the library module applied to the projector's outputs, fp32)."""
    from lab.benchmarks import accuracy_learned
    from vllm_tokcomp.bench import accuracy
    from vllm_tokcomp.data.spec import normalize_answer

    data = accuracy.default_dataset()
    model = Path(accuracy.model_or_default(None))
    limit = 16
    out = tmp_path / "acc"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"), "VLLM_PLUGINS": "tokcomp",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "accuracy.py"), "--data", str(data), "--model", str(model),
         "--methods", "pool", "--budgets", "64", "--auto", "", "--connectors", C16, Q16, "--limit", str(limit),
         "--out", str(out), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    served = {f"{arm['method']}@{arm['budget']}": arm for arm in report["arms"]}
    assert set(served) == {"pool@64", "c_abstractor@16", "qformer@16"}
    assert report["budgets"] == [576, 64, 16]
    records = accuracy.load_dataset(data, limit)
    reference = accuracy_learned.run(model, records, accuracy_learned.build_arms(model, [Path(C16), Path(Q16)]),
                                     max_tokens=4, progress=False)
    for name in ("c_abstractor@16", "qformer@16"):
        arm = served[name]
        assert arm["tokens_min"] == arm["tokens_max"] == 16  # prompt = text + the connector's 16 tokens
        agree = sum(normalize_answer(a) == normalize_answer(b)
                    for a, b in zip(arm["predictions"], reference[name]["answers"], strict=True))
        # vLLM runs the LM in bf16, the reference in fp32: near-ties may flip, nothing more
        assert agree >= limit - 2, (name, arm["predictions"], reference[name]["answers"])
    # and the connectors are not pool in disguise: at 16 tokens they answer differently somewhere
    pool16 = reference["pool@16"]["answers"]
    assert served["c_abstractor@16"]["predictions"] != pool16 or served["qformer@16"]["predictions"] != pool16

