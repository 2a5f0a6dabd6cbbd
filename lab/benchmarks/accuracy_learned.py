"""Accuracy of the trained learned connectors against the training-free rows at the same token count.

``python lab/benchmarks/accuracy_learned.py [--data DIR] [--model DIR] [--limit N] [--connectors STEM ...]``

The connectors (``python -m tokcomp_lab.train.connector``; the bundled ones are
``connectors/*.json``) replace the projector's 576 outputs with their fixed count of
tokens on the frozen model they were trained for. The plugin does not serve them (they need weights
vLLM's LLaVA does not have), so every arm runs here on the model's transformers weights, greedy, one
question at a time, image tokens at consecutive positions as the plugin serves compressed images:
``none`` (576 tokens), ``pool@N`` (the registry's ``pool`` at each connector's count, the connectors'
starting point) and each connector. Same data and scoring as ``accuracy.py``.

Writes ``OUT.json`` and ``OUT.md`` (default ``lab/results/accuracy-learned``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "lab"
for _path in (LAB, REPO):  # tokcomp_lab from lab/; vllm_tokcomp and lab.benchmarks from the repo root
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from lab.benchmarks.accuracy_positions import greedy  # noqa: E402
from vllm_tokcomp.bench.accuracy import (  # noqa: E402
    default_dataset,
    llava_prompt,
    load_dataset,
    majority_baseline,
    model_or_default,
    score,
    write_report,
)

DEFAULT_OUT = LAB / "results" / "accuracy-learned"
BUNDLED_CONNECTORS = REPO / "connectors"


def bundled_connectors() -> list[Path]:
    return sorted(path.with_suffix("") for path in BUNDLED_CONNECTORS.glob("*.json"))


def build_arms(model_dir: Path, stems: list[Path]) -> dict:
    """``none``, then per connector count N (largest first) ``pool@N`` and the connectors of that count; the
    stems are read and checked as the server reads them (:mod:`vllm_tokcomp.connectors`), and here a connector
    must also record the weights it was trained for: one trained for others is refused (its outputs mean
    nothing to this model's LM)."""
    from vllm_tokcomp.connectors import check_trained_for, read_catalog
    from vllm_tokcomp.errors import ConfigError
    from vllm_tokcomp.methods import get_method
    from vllm_tokcomp.methods.learned.io import load_connector

    try:
        catalog = read_catalog([str(stem) for stem in stems], "--connectors")
        unchecked = check_trained_for(catalog, model_dir / "model.safetensors", "--connectors")
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    if unchecked:
        raise SystemExit(f"--connectors: {', '.join(unchecked)} cannot be checked against "
                         f"{model_dir}/model.safetensors (no weights digest)")
    connectors = {f"{method}@{tokens}": load_connector(c.stem) for (method, tokens), c in catalog.items()}
    arms: dict = {"none": (None, {"tokens": None})}
    pool = get_method("pool")
    for count in sorted({spec["tokens"] for _, spec in connectors.values()}, reverse=True):
        arms[f"pool@{count}"] = (lambda tokens, n=count: pool(tokens, n), {"tokens": count})
        for name, (module, spec) in connectors.items():
            if spec["tokens"] == count:
                arms[name] = (lambda tokens, m=module: m(tokens), spec)
    return arms


def run(model_dir: Path, records: list[dict], arms: dict, max_tokens: int, progress: bool = True) -> dict:
    import torch
    from tqdm import tqdm
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vllm_tokcomp.methods import VisualTokens

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = processor.tokenizer
    table = model.get_input_embeddings()
    prepared = []
    for record in records:  # one <image> placeholder each, replaced by the arm's tokens
        prompt, pixels = llava_prompt(processor, record)
        ids, at = torch.tensor(prompt), prompt.index(model.config.image_token_index)
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
            prepared.append((table(ids[:at]), features, table(ids[at + 1:])))
    side = math.isqrt(prepared[0][1].shape[0]) if prepared else 0
    results = {}
    bar = tqdm(total=len(arms) * len(records), unit="q", disable=not progress, dynamic_ncols=True)
    for name, (compress, spec) in arms.items():
        bar.set_description(name)
        answers, counts = [], []
        for before, features, after in prepared:
            with torch.no_grad():
                visual = features if compress is None else compress(VisualTokens(features, (side, side))).features
            counts.append(visual.shape[0])
            embeds = torch.cat([before, visual, after])  # consecutive positions, as vLLM serves compressed images
            tokens = greedy(model, embeds, torch.arange(embeds.shape[0]), max_tokens, tokenizer.eos_token_id)
            answers.append(tokenizer.decode(tokens, skip_special_tokens=True))
            bar.update(1)
        results[name] = {"answers": answers, "tokens": sum(counts) / max(1, len(counts)),
                         **{k: spec[k] for k in ("steps", "images_seen", "parameters", "train_seconds") if k in spec}}
    bar.close()
    return results


def paired_against(records: list[dict], predictions: list[str], baseline: list[str]) -> list[int]:
    """``[won, lost]``: questions ``predictions`` gets right and ``baseline`` wrong, and the other way round (the
    discordant pairs a sign test reads; a difference in accuracy alone hides how many answers changed)."""
    from vllm_tokcomp.data.spec import normalize_answer

    won = lost = 0
    for record, mine, theirs in zip(records, predictions, baseline, strict=True):
        truth = normalize_answer(record["answer"])
        mine_ok, theirs_ok = normalize_answer(mine) == truth, normalize_answer(theirs) == truth
        won += mine_ok and not theirs_ok
        lost += theirs_ok and not mine_ok
    return [won, lost]


def markdown(report: dict) -> str:
    base = report["arms"]["none"]["accuracy"]
    types = sorted(report["arms"]["none"]["per_type"])
    lines = [
        f"# Learned connectors vs training-free pooling ({report['model_name']}, {report['n']} questions)",
        "",
        f"Data: `{report['data']}`; transformers, greedy, exact match after normalisation. Each connector is trained "
        "with the tower, projector and LM frozen (`python -m tokcomp_lab.train.connector`), started at the mean of "
        "its outputs' inputs (for pixel_unshuffle and c_abstractor exactly `pool` at the same count).",
        "",
        "| arm | tokens | trained (steps / images) | params | accuracy | rel | vs pool (won / lost) | "
        + " | ".join(types) + " |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(types),
    ]
    for name, arm in report["arms"].items():
        rel = f"{arm['accuracy'] / base:.0%}" if base else "–"
        trained = f"{arm['steps']} / {arm['images_seen']}" if "steps" in arm else "–"
        params = f"{arm['parameters'] / 1e6:.2f} M" if "parameters" in arm else "–"
        versus = f"{arm['vs_pool'][0]} / {arm['vs_pool'][1]}" if "vs_pool" in arm else "–"
        lines.append(
            f"| {name} | {arm['tokens']:.0f} | {trained} | {params} | {arm['accuracy']:.3f} | {rel} | {versus} | "
            + " | ".join(f"{arm['per_type'].get(t, float('nan')):.2f}" for t in types) + " |"
        )
    lines += ["", "vs pool: questions the connector answers right and `pool` at its count wrong / the other way round.",
              f"Majority-answer baseline: {report['chance']:.3f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="folder with questions.jsonl (default: test split)")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled trained tiny LLaVA)")
    parser.add_argument("--connectors", type=Path, nargs="*", default=None,
                        help="connector stems (STEM.json + STEM.safetensors; default: the bundled ones)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path stem (.json/.md)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    data = args.data or default_dataset()
    model = Path(model_or_default(args.model))
    stems = bundled_connectors() if args.connectors is None else args.connectors
    records = load_dataset(Path(data), args.limit)
    arms = build_arms(model, stems)
    start = time.perf_counter()
    results = run(model, records, arms, args.max_tokens, progress=not args.no_progress)
    report = {
        "model": str(model), "model_name": model.name, "data": str(data), "n": len(records),
        "chance": majority_baseline(records), "seconds": round(time.perf_counter() - start, 1),
        "command": "python lab/benchmarks/accuracy_learned.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "arms": {name: {**{k: v for k, v in r.items() if k != "answers"}, **score(records, r["answers"]),
                        "predictions": r["answers"]} for name, r in results.items()},
    }
    for arm in report["arms"].values():
        pool = f"pool@{arm['tokens']:.0f}"
        if "steps" in arm and pool in results:  # a connector, next to pool at its count
            arm["vs_pool"] = paired_against(records, arm["predictions"], results[pool]["answers"])
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
