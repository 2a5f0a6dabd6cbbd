"""lab/benchmarks/text_alignment.py: the object-token mask follows the scene's label map, and a run on the bundled
trained Qwen2-VL scores the library's selection with the integration's query (the question, not the system turn)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

np = pytest.importorskip("numpy")
pytest.importorskip("transformers")

from lab.benchmarks import text_alignment  # noqa: E402


def test_object_tokens_are_cells_mostly_covered_by_an_object() -> None:
    from vllm_tokcomp.data.synth import Obj, Scene, label_map

    scene = Scene(background="plain", objects=[Obj(shape="square", color="red", size="large", x=150, y=170)])

    labels = label_map(scene)
    mask = text_alignment.object_tokens(scene, (12, 12))
    # independently: per 28 x 28 cell, the covered share
    for row in range(12):
        for col in range(12):
            covered = (labels[row * 28:(row + 1) * 28, col * 28:(col + 1) * 28] > 0).mean()
            assert mask[row * 12 + col] == (covered > text_alignment.OBJECT_SHARE)
    assert 0 < mask.sum() < 144


def test_a_run_on_the_trained_qwen_model_scores_the_question_tokens(tmp_path: Path, monkeypatch) -> None:
    from vllm_tokcomp.tiny import qwen2_vl_builder as qwen2_vl

    if not qwen2_vl.TRAINED_WEIGHTS_OF["qwen2_vl"].is_file():
        pytest.skip("no bundled trained Qwen2-VL weights")
    monkeypatch.setenv("TOKCOMP_MODELS_DIR", str(tmp_path / "models"))
    report = text_alignment.main(["--model", "tiny-qwen2-vl", "--images", "2", "--questions", "2", "--threads", "1",
                                  "--out", str(tmp_path / "ta")])
    assert json.loads((tmp_path / "ta.json").read_text()) == report
    assert sum(n for t, n in report["questions"].items() if t != "all") == report["questions"]["all"] == 4
    assert all(rate >= 0 for rate in report["object_rate"].values())
    # the query is the user's question (the integration's user turn), not the system turn or the template's words
    example = report["example_query"]
    assert example["query"].strip() == example["question"].strip()
    assert report["best_matching_query_tokens"]
    assert 0 < report["max_similarity"]["min"] <= report["max_similarity"]["median"] <= report["max_similarity"]["max"]
