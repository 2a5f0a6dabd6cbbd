"""The README's and docs/benchmarks.md's generated parts match what they are generated from, and local links in
the project's pages resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vllm_tokcomp.bench import summary

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("marker", sorted(summary.blocks()))
def test_result_tables_are_generated_from_the_committed_results(marker):
    """Regenerate with ``python -m vllm_tokcomp.bench.summary --write README.md``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    shown = README.split(start, 1)[1].split(end, 1)[0].lstrip("\n")
    assert shown == summary.blocks()[marker]


def test_generated_tables_read_the_numbers_from_the_result():
    """The generator formats what the result holds (a changed number shows in the table)."""
    import json

    result = json.loads(summary.ACCURACY_RESULT.read_text())
    result["baseline"]["accuracy"] = 0.5
    for arm in result["arms"]:
        if (arm["method"], arm["budget"]) == ("pool", 64):
            arm["accuracy"] = 0.25
    text = summary.accuracy_summary(result, "x")
    assert "**0.500**" in text
    row = next(line for line in text.splitlines() if line.startswith("| `pool` |"))
    assert "0.250 (50%)" in row


def test_split_table_reads_each_test_set_and_ranks_its_methods(tmp_path):
    """One row per test set from its result: the uncompressed accuracy, the halves where the set has them, and the
    best and worst method's share at each budget (a changed number shows; a set without arms shows –)."""
    import json

    result = json.loads(summary.ACCURACY_RESULT.read_text())
    result["baseline"]["accuracy"] = 0.5
    result["baseline"]["per_difficulty"] = {"easy": 0.75, "hard": 0.25}
    for arm in result["arms"]:
        arm["accuracy"] = {"pool": 0.45, "random": 0.05}.get(arm["method"], 0.25)
    ranked = tmp_path / "ranked.json"
    ranked.write_text(json.dumps(result))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({**result, "arms": [], "n": 7}))
    rows = summary.splits_summary((("ranked set", ranked), ("bare set", bare)), (64, 16)).splitlines()
    ranked_row = next(line for line in rows if line.startswith("| ranked set |"))
    assert "| 0.500 | 0.750 / 0.250 |" in ranked_row
    assert ranked_row.count("`pool` 90% / `random` 10%") == 2
    bare_row = next(line for line in rows if line.startswith("| bare set |"))
    assert bare_row.startswith("| bare set | 7 | 0.500 |") and bare_row.split(" | ").count("–") == 2


def test_benchmark_page_is_generated_from_the_committed_results():
    """Regenerate with ``python benchmarks/report.py --write docs/benchmarks.md``."""
    from vllm_tokcomp.bench import report

    page = (ROOT / "docs" / "benchmarks.md").read_text()
    shown = page.split(report.BEGIN, 1)[1].split(report.END, 1)[0].lstrip("\n")
    assert shown == report.results_markdown()
    assert "## Answer accuracy" in shown


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


PAGES = ["README.md", "CHANGELOG.md", "connectors/README.md", "lab/README.md", "lab/training.md",
         *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES)
def test_local_links_resolve(page):
    path = ROOT / page
    missing = [target for target in LINK.findall(path.read_text())
               if not target.startswith(("http://", "https://", "mailto:")) and not (path.parent / target).exists()]
    assert not missing, f"{page} links to missing files: {missing}"
