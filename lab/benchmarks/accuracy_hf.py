"""Accuracy of the in-LM pruning references (faithful MustDrop, FastV) on transformers, same data as accuracy.py.

``python lab/benchmarks/accuracy_hf.py [--data DIR] [--model DIR] [--limit N] [--fastv-budgets 192,128,64]``

Methods that act inside the LM after the KV cache is filled cannot be served by vLLM, so they run here on
the model's transformers weights through ``tokcomp_lab.reference.hf_pruning`` (greedy, one request at a
time). Arms: ``none`` (both stages off: transformers' own greedy decoding), ``mustdrop-ref`` at the paper's two
threshold presets (~192 and ~64 tokens on LLaVA-1.5-7B), its stage 1 alone, and ``fastv`` at each budget.
MustDrop's counts depend on the image, so the report gives the mean visual tokens each arm kept: entering
the LM, in the deepest layer's KV and averaged over the layers' KV. Pruning layers are scaled from the
7B model's 32 layers to this model's depth (``--prune-layers``, ``--fastv-layer``).

Writes ``OUT.json`` and ``OUT.md`` (default ``lab/results/accuracy-hf``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "lab"
for _path in (LAB, REPO):  # tokcomp_lab from lab/; vllm_tokcomp and lab.benchmarks from the repo root
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from vllm_tokcomp.bench.accuracy import (  # noqa: E402
    default_dataset,
    llava_prompt,
    load_dataset,
    majority_baseline,
    model_or_default,
    score,
    write_report,
)

DEFAULT_OUT = LAB / "results" / "accuracy-hf"
# The paper's (global, individual) threshold pairs and the token counts they gave on LLaVA-1.5-7B.
MUSTDROP_PRESETS = {"mustdrop-ref[~192]": (0.001, 0.001), "mustdrop-ref[~64]": (0.011, 0.01)}


def scaled_layer(layer: int, depth: int) -> int:
    """The paper's pruning layer ``layer`` of LLaVA-1.5-7B's 32, at the same relative depth of a ``depth``-layer
    LM (0-based, and never the last layer, after which pruning would change nothing)."""
    return min(depth - 2, max(0, round(layer * depth / 32)))


def build_arms(prune_layers: tuple[int, ...], fastv_layer: int, fastv_budgets: list[int],
               thresholds: list[tuple[float, float]] = ()) -> dict:  # noqa: B006 - not mutated
    """``none``, MustDrop at the paper's presets and at each extra (global, individual) threshold pair, its stage 1
    alone, FastV at each budget."""
    from tokcomp_lab.reference.hf_pruning import FastVReference, MustDropReference

    arms = {"none": MustDropReference(stage1=False, stage2=False)}
    presets = {**MUSTDROP_PRESETS, **{f"mustdrop-ref[{g:g}/{i:g}]": (g, i) for g, i in thresholds}}
    for name, (g, i) in presets.items():
        arms[name] = MustDropReference(prune_layers=prune_layers, global_threshold=g, individual_threshold=i)
    arms["mustdrop-ref[stage1]"] = MustDropReference(stage2=False)
    for budget in fastv_budgets:
        arms[f"fastv@{budget}"] = FastVReference(layer=fastv_layer, keep=budget)
    return arms


def run(model_dir: str, records: list[dict], arms: dict, max_tokens: int, progress: bool = True) -> dict:
    import torch
    from tqdm import tqdm
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokcomp_lab.reference.hf_pruning import generate

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = processor.tokenizer
    prepared = []
    for record in records:  # one <image> placeholder each, which the reference expands
        ids, pixels = llava_prompt(processor, record)
        prepared.append((ids, pixels[0]))
    results = {}
    bar = tqdm(total=len(arms) * len(records), unit="q", disable=not progress, dynamic_ncols=True)
    for name, cfg in arms.items():
        bar.set_description(name)
        answers, entering, deepest, mean_cache = [], [], [], []
        for ids, pixels in prepared:
            out = generate(model, ids, pixels, cfg, max_tokens, tokenizer.eos_token_id)
            answers.append(tokenizer.decode(out.tokens, skip_special_tokens=True))
            entering.append(out.visual_after_stage1)
            deepest.append(out.visual_in_cache[-1])
            mean_cache.append(sum(out.visual_in_cache) / len(out.visual_in_cache))
            bar.update(1)
        n = max(1, len(records))
        results[name] = {"config": repr(cfg), "answers": answers, "tokens_entering_lm": sum(entering) / n,
                         "tokens_deepest_kv": sum(deepest) / n, "tokens_mean_kv": sum(mean_cache) / n}
    bar.close()
    return results


def markdown(report: dict) -> str:
    base = report["arms"]["none"]["accuracy"]
    types = sorted(report["arms"]["none"]["per_type"])
    lines = [
        f"# In-LM pruning references on transformers ({report['model_name']}, {report['n']} questions)",
        "",
        f"Data: `{report['data']}`; greedy, exact match after normalisation; {report['depth']} LM layers, MustDrop "
        f"prunes after layers {report['prune_layers']}, FastV after layer {report['fastv_layer']} (0-based). Token "
        "columns are means over the questions: visual tokens entering the LM (after MustDrop's stage 1), in the "
        "deepest layer's KV, and averaged over the layers' KV (what decoding reads).",
        "",
        "| arm | enter LM | deepest KV | mean KV | accuracy | rel | " + " | ".join(types) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(types),
    ]
    for name, arm in report["arms"].items():
        rel = f"{arm['accuracy'] / base:.0%}" if base else "–"
        lines.append(
            f"| {name} | {arm['tokens_entering_lm']:.0f} | {arm['tokens_deepest_kv']:.0f} | "
            f"{arm['tokens_mean_kv']:.0f} | {arm['accuracy']:.3f} | {rel} | "
            + " | ".join(f"{arm['per_type'].get(t, float('nan')):.2f}" for t in types) + " |"
        )
    lines += ["", f"Majority-answer baseline: {report['chance']:.3f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="folder with questions.jsonl (default: test split)")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled trained tiny LLaVA)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--fastv-budgets", default="192,128,64")
    parser.add_argument("--prune-layers", default=None,
                        help="MustDrop's pruning layers, 0-based (default: the paper's 2,6,10,14 of 32 scaled to "
                        "this model's depth)")
    parser.add_argument("--fastv-layer", type=int, default=None,
                        help="0-based layer after which FastV prunes (default: the paper's K=2 of 32 scaled)")
    parser.add_argument("--mustdrop-thresholds", default="",
                        help="extra MustDrop arms, GLOBAL/INDIVIDUAL threshold pairs, comma separated (e.g. to match "
                        "the token counts of the served arms on this model)")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path stem (.json/.md)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    data = args.data or default_dataset()
    model = model_or_default(args.model)
    depth = json.loads((Path(model) / "config.json").read_text())["text_config"]["num_hidden_layers"]
    if args.prune_layers is None:
        prune_layers = tuple(sorted({scaled_layer(layer, depth) for layer in (2, 6, 10, 14)}))
    else:
        prune_layers = tuple(int(x) for x in args.prune_layers.split(",") if x)
    fastv_layer = scaled_layer(2, depth) if args.fastv_layer is None else args.fastv_layer
    if fastv_layer >= depth - 1 or any(layer >= depth - 1 for layer in prune_layers):
        parser.error(f"the model has {depth} LM layers: pruning after layer {depth - 1} (0-based) changes nothing")
    budgets = [int(b) for b in args.fastv_budgets.split(",") if b]
    records = load_dataset(Path(data), args.limit)
    try:
        thresholds = [(float(g), float(i)) for g, i in
                      (pair.split("/") for pair in args.mustdrop_thresholds.split(",") if pair)]
    except ValueError:
        parser.error(f"--mustdrop-thresholds: expected GLOBAL/INDIVIDUAL pairs, got {args.mustdrop_thresholds!r}")
    arms = build_arms(prune_layers, fastv_layer, budgets, thresholds)
    start = time.perf_counter()
    results = run(model, records, arms, args.max_tokens, progress=not args.no_progress)
    report = {
        "model": model, "model_name": Path(model).name, "data": str(data), "n": len(records), "depth": depth,
        "prune_layers": list(prune_layers), "fastv_layer": fastv_layer, "chance": majority_baseline(records),
        "seconds": round(time.perf_counter() - start, 1),
        "arms": {name: {**{k: v for k, v in r.items() if k != "answers"}, **score(records, r["answers"]),
                        "predictions": r["answers"]} for name, r in results.items()},
    }
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
