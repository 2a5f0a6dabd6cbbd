"""Does renumbering the kept visual tokens change the answers? Accuracy of one selection at two sets of positions.

``python lab/benchmarks/accuracy_positions.py [--data DIR] [--model DIR] [--limit N] [--method uniform]
[--budgets 192,128,64,32]``

When vLLM serves a compressed LLaVA prompt, the ``k`` kept image tokens sit at consecutive positions and the text
after the image moves up by ``576 - k`` (LLaVA's LM has 1-D RoPE over the token index). The in-LM references
(``lab/benchmarks/accuracy_hf.py``) keep every survivor at its original position instead. This script runs the same
selection (a fixed-budget method of the library on the projected image features) both ways on transformers, with
greedy decoding of up to ``--max-tokens`` tokens and no KV cache (every step is a full forward with explicit
``position_ids``), so a gap between the two columns is the effect of renumbering alone. The ``renumbered`` column
is what vLLM computes (compare with ``benchmarks/accuracy.py``'s arm of the same method and budget).

Writes ``OUT.json`` and ``OUT.md`` (default ``lab/results/accuracy-positions``).
"""

from __future__ import annotations

import argparse
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
    model_or_default,
    score,
    write_report,
)

DEFAULT_OUT = LAB / "results" / "accuracy-positions"
FULL = 576


def positions(before: int, kept, after: int, renumber: bool):  # noqa: ANN001, ANN201 - torch tensors
    """Position ids of ``before`` text tokens, the kept image tokens (original indices ``kept``) and ``after``
    text tokens: consecutive when ``renumber`` (vLLM), else each token where it was in the uncompressed prompt."""
    import torch

    if renumber:
        return torch.arange(before + len(kept) + after)
    return torch.cat([torch.arange(before), before + kept, before + FULL + torch.arange(after)])


def greedy(model, embeds, position_ids, max_tokens: int, eos: int) -> list[int]:  # noqa: ANN001
    import torch

    lm = model.model.language_model
    table = lm.embed_tokens.weight
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            hidden = lm(inputs_embeds=embeds[None], position_ids=position_ids[None]).last_hidden_state
            token = int(model.lm_head(hidden[0, -1]).argmax())
            if token == eos:
                break
            out.append(token)
            embeds = torch.cat([embeds, table[token][None]])
            position_ids = torch.cat([position_ids, position_ids[-1:] + 1])
    return out


def run(model_dir: str, records: list[dict], method: str, budgets: list[int], max_tokens: int,
        device: str = "cpu") -> dict:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vllm_tokcomp.methods import VisualTokens, get_method

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval().to(device)
    tokenizer = processor.tokenizer
    image_id = model.config.image_token_index
    compressor = get_method(method)
    answers: dict[str, list[str]] = {}
    for record in records:
        prompt, pixels = llava_prompt(processor, record)
        pixels, ids = pixels.to(device), torch.tensor(prompt, device=device)
        at = int((ids == image_id).nonzero()[0])  # one <image> placeholder: the tokenizer does not expand it
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=pixels)
            feats = getattr(feats, "pooler_output", feats)
            feats = (torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1]))
            table = model.get_input_embeddings()
            before, after = table(ids[:at]), table(ids[at + 1:])
        for budget in budgets:
            if budget >= FULL:
                kept = torch.arange(FULL, device=device)
            else:
                kept = compressor.select(VisualTokens(feats, (24, 24)), budget).anchor.sort().values
            embeds = torch.cat([before, feats[kept], after])
            for renumber in ((True,) if budget >= FULL else (True, False)):
                name = f"{budget}" + ("" if budget >= FULL else ("-renumbered" if renumber else "-original"))
                pos = positions(len(before), kept.cpu(), len(after), renumber).to(device)
                tokens = greedy(model, embeds, pos, max_tokens, tokenizer.eos_token_id)
                answers.setdefault(name, []).append(tokenizer.decode(tokens, skip_special_tokens=True))
    return answers


def markdown(report: dict) -> str:
    arms = report["arms"]
    base = arms[str(FULL)]["accuracy"]
    lines = [
        f"# Renumbered vs original positions ({report['model_name']}, `{report['method']}`, {report['n']} questions)",
        "",
        "Same kept tokens both ways, on transformers (greedy, no KV cache): `renumbered` = consecutive positions, "
        "what vLLM serves; `original` = each kept token and the text after the image at its uncompressed "
        "position, as the in-LM references keep them.",
        "",
        "| visual tokens | renumbered (vLLM) | original positions |",
        "|---:|---:|---:|",
        f"| {FULL} | {base:.3f} | {base:.3f} |",
    ]
    for budget in report["budgets"]:
        if budget < FULL:
            r, o = arms[f"{budget}-renumbered"]["accuracy"], arms[f"{budget}-original"]["accuracy"]
            lines.append(f"| {budget} | {r:.3f} ({r / base:.0%}) | {o:.3f} ({o / base:.0%}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="folder with questions.jsonl (default: test split)")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled trained tiny LLaVA)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--method", default="uniform", help="a pruning method that needs no tower or text signal")
    parser.add_argument("--budgets", default="192,128,64,32")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path stem (.json/.md)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    args = parser.parse_args(argv)

    from vllm_tokcomp.methods import method_class

    cls = method_class(args.method)
    if cls.required_signals() or not cls.prunes:
        parser.error(f"--method {args.method}: pick a pruning method that decides from the features alone "
                     "(uniform, random, divprune)")
    data = args.data or default_dataset()
    model = model_or_default(args.model)
    budgets = sorted({FULL, *(int(b) for b in args.budgets.split(",") if b)}, reverse=True)
    records = load_dataset(Path(data), args.limit)
    start = time.perf_counter()
    answers = run(model, records, args.method, budgets, args.max_tokens, args.device)
    report = {"model": model, "model_name": Path(model).name, "data": str(data), "n": len(records),
              "method": args.method, "budgets": budgets, "seconds": round(time.perf_counter() - start, 1),
              "arms": {name: {**score(records, a), "predictions": a} for name, a in answers.items()}}
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
