"""lab/benchmarks/accuracy_hf.py: the in-LM references run over a data set folder and report their token counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lab.benchmarks import accuracy_hf  # noqa: E402


@pytest.mark.slow
def test_references_run_over_a_dataset_folder(tmp_path: Path) -> None:
    from vllm_tokcomp.data.generate import main as generate
    from vllm_tokcomp.tiny.llava_builder import ensure_default_model

    generate([str(tmp_path / "data"), "--seed", "0", "--test", "2"])
    out = tmp_path / "res" / "accuracy-hf"
    assert accuracy_hf.main(["--data", str(tmp_path / "data" / "test"), "--model", str(ensure_default_model()),
                             "--fastv-budgets", "64", "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    arms = report["arms"]
    assert list(arms) == ["none", "mustdrop-ref[~192]", "mustdrop-ref[~64]", "mustdrop-ref[stage1]", "fastv@64"]
    assert report["n"] == 4 and all(len(arm["predictions"]) == 4 for arm in arms.values())
    # 2,6,10,14 and FastV's 2 of 32 layers -> layer 0 of 2 (pruning after the last layer would change nothing)
    assert report["depth"] == 2 and report["prune_layers"] == [0] and report["fastv_layer"] == 0
    assert arms["none"]["tokens_mean_kv"] == 576
    # FastV after layer 0 of 2: layer 0 holds all 576 visual tokens, layer 1 the 64 kept.
    assert arms["fastv@64"]["tokens_deepest_kv"] == 64 and arms["fastv@64"]["tokens_mean_kv"] == 320
    stage1 = arms["mustdrop-ref[stage1]"]
    assert stage1["tokens_entering_lm"] == stage1["tokens_deepest_kv"] <= 576
    for preset in ("mustdrop-ref[~192]", "mustdrop-ref[~64]"):  # same stage 1; stage 3 cuts every layer's KV
        assert arms[preset]["tokens_entering_lm"] == stage1["tokens_entering_lm"]
        assert arms[preset]["tokens_deepest_kv"] == arms[preset]["tokens_mean_kv"] <= stage1["tokens_deepest_kv"]
    assert out.with_suffix(".md").read_text().startswith("# In-LM pruning references")
