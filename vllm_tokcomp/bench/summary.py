"""The README's result tables, generated from the committed results so they cannot drift from them.

``python -m vllm_tokcomp.bench.summary --write README.md`` replaces the text between each marker pair
(``<!-- throughput:start -->`` / ``<!-- throughput:end -->``, ``accuracy``, ``accuracy-llava-next``,
``accuracy-llava-onevision``, ``accuracy-qwen3-vl``, ``quality-splits``); without
``--write`` it prints every block. The full tables are in docs/benchmarks.md (``benchmarks/report.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import ROOT, device_description, provenance_line

RESULTS = ROOT / "benchmarks" / "results"
THROUGHPUT_RESULT = RESULTS / "throughput-llava-proportioned.json"
ACCURACY_RESULT = RESULTS / "accuracy.json"
LLAVA_NEXT_ACCURACY_RESULT = RESULTS / "accuracy-llava-next.json"
LLAVA_ONEVISION_ACCURACY_RESULT = RESULTS / "accuracy-llava-onevision.json"
QWEN3_VL_ACCURACY_RESULT = RESULTS / "accuracy-qwen3-vl.json"
ACCURACY_BUDGETS = (192, 64, 32, 16, 8)
# a Qwen image is 144 tokens: the harness's budgets are LLaVA's fractions of it (1/3 .. 1/72)
QWEN_ACCURACY_BUDGETS = (48, 32, 16, 8, 4, 2)
MARKERS = {"throughput": THROUGHPUT_RESULT, "accuracy": ACCURACY_RESULT,
           "accuracy-llava-next": LLAVA_NEXT_ACCURACY_RESULT,
           "accuracy-llava-onevision": LLAVA_ONEVISION_ACCURACY_RESULT,
           "accuracy-qwen3-vl": QWEN3_VL_ACCURACY_RESULT}
# Which model each accuracy block measured, as the table's first words say it.
MODEL_DESCRIPTIONS = {
    "accuracy": "the bundled tiny LLaVA",
    "accuracy-llava-next": "the tiny LLaVA-NeXT",
    "accuracy-llava-onevision": "the tiny LLaVA-OneVision (the tiny LLaVA's weights)",
    "accuracy-qwen3-vl": "the trained tiny Qwen3-VL",
}
MARKER_BUDGETS = {"accuracy-qwen3-vl": QWEN_ACCURACY_BUDGETS}
# The bundled LLaVA on each test set (docs/dataset.md), one row each in the ``quality-splits`` block.
SPLIT_RESULTS = (
    ("v1 test split (what the model was trained to)", ACCURACY_RESULT),
    ("spec v2, drawn exactly as the spec says", RESULTS / "accuracy-spec-v2.json"),
    ("spec v2, a training split's variation (strokes 3-4, sizes, colours, both plurals)",
     RESULTS / "accuracy-spec-v2-varied.json"),
    ("spec v2, digit strokes 2 and 5 (held-out renderings)", RESULTS / "accuracy-spec-v2-strokes-2-5.json"),
    ("harder split (8-16 small objects, 3-4 digit numbers)", RESULTS / "accuracy-hard.json"),
)
SPLIT_BUDGETS = (64, 16)


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def throughput_summary(result: dict, source: str) -> str:
    """Plain vLLM vs each method's budgets: prompt tokens, KV blocks per request, requests/s relative to plain."""
    arms = {arm["name"]: arm for arm in result["arms"]}
    plain = arms["plain"]
    shape = result["model"]["shape"]
    machine = result["machine"]
    dirty = " (uncommitted changes)" if machine.get("git_dirty") else ""
    lines = [
        f"Offline throughput, a LLaVA-1.5-proportioned model (vision {shape['vision_layers']}x"
        f"{shape['vision_hidden']}, LM {shape['text_layers']}x{shape['text_hidden']}, "
        f"{result['model'].get('load_format')} weights): one image and {result['text_tokens']} text tokens per "
        "request, "
        f"{result['config']['output_len']} output tokens, {result['config']['rounds']} interleaved rounds; "
        f"{device_description(machine)}. Source `{source}`, measured {result['created']} at commit "
        f"`{str(machine.get('git_commit'))[:10]}`{dirty}.",
        "",
        "| arm | prompt tokens | KV blocks / request | requests/s vs plain |",
        "|---|---:|---:|---:|",
        f"| plain vLLM | {plain['prompt_tokens'][0]} | {plain['kv']['mean_blocks_per_request']:.0f} | 1.00x |",
    ]
    full = result["model"].get("image_tokens", 576)
    for method in result["config"]["methods"]:
        compressed = [arms[f"{method}@{b}"] for b in result["config"]["budgets"]
                      if b < full and f"{method}@{b}" in arms]
        if not compressed:
            continue
        budgets = " / ".join(str(arm["budget"]) for arm in compressed)
        prompts = " / ".join(str(arm["prompt_tokens"][0]) for arm in compressed)
        blocks = " / ".join(f"{arm['kv']['mean_blocks_per_request']:.0f}" for arm in compressed)
        speedups = " / ".join(f"{arm['requests_per_s'] / plain['requests_per_s']:.2f}x" for arm in compressed)
        lines.append(f"| `{method}` @ {budgets} | {prompts} | {blocks} | {speedups} |")
    return "\n".join(lines) + "\n"


def accuracy_summary(result: dict, source: str, budgets: tuple[int, ...] = ACCURACY_BUDGETS,
                     model: str = MODEL_DESCRIPTIONS["accuracy"]) -> str:
    """Accuracy (and its share of the uncompressed accuracy) of every method at a few budgets."""
    base = result["baseline"]["accuracy"]
    by_arm = {(arm["method"], arm["budget"]): arm for arm in result["arms"]}
    shown = [b for b in budgets if b in result["budgets"]]
    lines = [
        f"Answer accuracy of {model} (`{result['model_name']}`) on the {result['n']} test questions of "
        f"the synthetic VQA task, served by vLLM, greedy, exact match: uncompressed ({result['full_tokens']} tokens "
        f"per image) **{base:.3f}**, always answering each question type's most common answer "
        f"{result['chance']:.3f}. Cells: accuracy (share of uncompressed). Source `{source}`. "
        + provenance_line(result.get("provenance")),
        "",
        "| method | " + " | ".join(f"{b} tokens" for b in shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    for method in result["methods"]:
        cells = []
        for budget in shown:
            arm = by_arm.get((method, budget))
            cells.append("–" if arm is None else f"{arm['accuracy']:.3f} ({arm['accuracy'] / base:.0%})")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def splits_summary(splits: tuple[tuple[str, Path], ...] = SPLIT_RESULTS,
                   budgets: tuple[int, ...] = SPLIT_BUDGETS) -> str:
    """One row per test set: uncompressed accuracy (and per difficulty where the set labels it), and at each budget
    the best and the worst method's share of it where methods were measured."""
    lines = [
        "| test set | questions | uncompressed | easy / hard half | "
        + " | ".join(f"best / worst method at {b} tokens" for b in budgets) + " | source |",
        "|---|---:|---:|---:|" + "---|" * len(budgets) + "---|",
    ]
    weights = set()
    for label, path in splits:
        result = json.loads(path.read_text())
        weights.add((result.get("provenance") or {}).get("weights_sha256", "?")[:12])
        base = result["baseline"]
        halves = base.get("per_difficulty")
        cells = [label, str(result["n"]), f"{base['accuracy']:.3f}",
                 f"{halves['easy']:.3f} / {halves['hard']:.3f}" if halves else "–"]
        for budget in budgets:
            arms = sorted((arm for arm in result["arms"] if arm["budget"] == budget),
                          key=lambda arm: (-arm["accuracy"], arm["method"]))
            if not arms:
                cells.append("–")
                continue
            best, worst = arms[0], arms[-1]
            cells.append(f"`{best['method']}` {best['accuracy'] / base['accuracy']:.0%} / "
                         f"`{worst['method']}` {worst['accuracy'] / base['accuracy']:.0%} ({len(arms)} methods)")
        cells.append(f"`{_relative(path)}`")
        lines.append("| " + " | ".join(cells) + " |")
    head = ("The bundled tiny LLaVA on every test set of the synthetic VQA task, served by vLLM, greedy, exact match "
            f"(weights sha256 `{'`, `'.join(sorted(weights))}`; each source has its provenance). Shares are of the "
            "set's uncompressed accuracy; – where no method was measured.")
    return head + "\n\n" + "\n".join(lines) + "\n"


def blocks(results: dict[str, Path] = MARKERS) -> dict[str, str]:
    """Each README marker's generated text, from the committed result files."""
    out = {"quality-splits": splits_summary()}
    for marker, path in results.items():
        result = json.loads(path.read_text())
        if marker == "throughput":
            out[marker] = throughput_summary(result, _relative(path))
        else:
            out[marker] = accuracy_summary(result, _relative(path), MARKER_BUDGETS.get(marker, ACCURACY_BUDGETS),
                                           model=MODEL_DESCRIPTIONS[marker])
    return out


def replace_blocks(text: str, generated: dict[str, str]) -> str:
    for marker, body in generated.items():
        start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = f"{head}{start}\n{body}{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", default=None, help="replace the marked blocks in this markdown file")
    args = parser.parse_args(argv)
    generated = blocks()
    if args.write:
        path = Path(args.write)
        path.write_text(replace_blocks(path.read_text(), generated))
    else:
        print("\n".join(generated.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
