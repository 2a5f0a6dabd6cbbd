"""lab/benchmarks/mustdrop_auto.py (the pixel budget estimator against MustDrop's threshold form),
lab/benchmarks/accuracy_positions.py (kept image tokens renumbered, as served, vs at their original positions) and
lab/benchmarks/splits.py (uncompressed accuracy on every test set)."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_mustdrop_auto_compares_both_counts_on_real_images(tmp_path):
    """Smoke run of lab/benchmarks/mustdrop_auto.py on two test images with the bundled tiny model."""
    from lab.benchmarks import mustdrop_auto

    out = tmp_path / "auto.json"
    result = mustdrop_auto.main(["--images", "2", "--out", str(out)])
    assert json.loads(out.read_text())["summary"]["all"]["texture"]["images"] == 2
    for row in result["rows"]:
        assert set(row["auto"]) == {"cosine", "texture"} and 1 <= row["threshold_form"] <= 576
        assert all(1 <= count <= 576 for count in row["auto"].values())
    # 64 windows of 3x3: merging every one of them still leaves 64 tokens.
    assert all(row["threshold_form"] >= 64 for row in result["rows"])
    assert "| all | 2 | texture |" in out.with_suffix(".md").read_text()


def test_positions_renumbered_vs_original() -> None:
    import torch

    from lab.benchmarks.accuracy_positions import positions

    kept = torch.tensor([0, 5, 575])
    assert positions(3, kept, 2, renumber=True).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    # text before at 0..2, the kept image tokens where they were (3 + index), text after the full image
    assert positions(3, kept, 2, renumber=False).tolist() == [0, 1, 2, 3, 8, 578, 579, 580]



# the committed uncompressed results of the bundled tiny LLaVA on each test set splits.py scores
COMMITTED = {"v1": "accuracy", "v2": "accuracy-spec-v2", "v2-varied": "accuracy-spec-v2-varied",
             "strokes-2-5": "accuracy-spec-v2-strokes-2-5", "harder": "accuracy-hard"}


@pytest.mark.slow
def test_splits_scores_the_test_sets_the_committed_results_were_measured_on(tmp_path):
    """``lab/benchmarks/splits.py`` regenerates each test set and answers it through one vLLM engine per model: the
    bundled model's answers to the first questions of every set are the ones the accuracy harness committed for that
    set (same question ids, answers and predictions), so a candidate's row is comparable with the README's."""
    from lab.benchmarks import splits

    assert set(COMMITTED) == set(splits.TEST_SETS)
    out = tmp_path / "splits"
    assert splits.main(["--limit", "6", "--jobs", "1", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    bundled = report["models"]["bundled"]
    for name, stem in COMMITTED.items():
        committed = json.loads((REPO / "benchmarks" / "results" / f"{stem}.json").read_text())
        assert committed["provenance"]["weights_sha256"] == bundled["weights_sha256"]
        assert bundled["scores"][name]["predictions"] == committed["baseline_predictions"][:6], name
    assert "easy" in bundled["scores"]["harder"]["per_difficulty"]
    assert "| harder split" in out.with_suffix(".md").read_text()
