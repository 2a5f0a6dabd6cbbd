"""lab/benchmarks/mustdrop_auto.py (the pixel budget estimator against MustDrop's threshold form) and
lab/benchmarks/accuracy_positions.py (kept image tokens renumbered, as served, vs at their original positions)."""

import json


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

