"""Markdown tables from the committed benchmark JSON (``benchmarks/results/*.json``).

    .venv/bin/python benchmarks/report.py                       # markdown to stdout
    .venv/bin/python benchmarks/report.py --write docs/benchmarks.md

``--write`` replaces the text between ``<!-- tokcomp-results:begin -->`` and
``<!-- tokcomp-results:end -->`` in the file (appending the block if the markers are
missing), so hand-written text around it stays. Accuracy results (``accuracy*.json``, from
``benchmarks/accuracy.py``) get their own section; files of other benchmarks (``method_cost.json``) are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vllm_tokcomp.bench.common import RESULTS_DIR, ROOT, device_description, fmt  # noqa: E402

BEGIN, END = "<!-- tokcomp-results:begin -->", "<!-- tokcomp-results:end -->"
KINDS = ("throughput", "memory_bound", "serving")


def _pct(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def _ms(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{1e3 * value:.{digits}f}"


def _yes(flag: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "–"}[flag]


def _met_cell(d: dict) -> str:
    if not d:
        return "–"
    if not d.get("met") and d.get("capped_by_requests"):
        return "**no** (every request of a batch was running: too few requests)"
    return _yes(d.get("met"))


def _machine_line(result: dict) -> str:
    m = result["machine"]
    eng = next(iter(result.get("engines", {}).values()), {}) if result.get("engines") else {}
    dtype = eng.get("dtype") or result.get("config", {}).get("engine_kwargs", {}).get("dtype")
    dtype = dtype or result.get("config", {}).get("dtype")
    return (f"{device_description(m)}, dtype {dtype}, "
            f"load avg {fmt(m.get('load_avg_1m_start'), 1)}→{fmt(m.get('load_avg_1m_end'), 1)}, "
            f"{result.get('created')}, commit {str(m.get('git_commit'))[:10]}")


def _model_line(result: dict) -> str:
    model = result["model"]
    shape = model.get("shape") or {}
    flops = model.get("flops_per_request") or {}
    name = model.get("preset") or model.get("path")
    parts = [f"model `{name}`"]
    if shape:
        parts.append(
            f"vision {shape['vision_layers']}x{shape['vision_hidden']}, LM {shape['text_layers']}x"
            f"{shape['text_hidden']} (weights: {model.get('load_format')})"
        )
    if flops:
        tokens = f"{flops.get('image_tokens', 576)}+{flops.get('text_tokens', 64)}"
        parts.append(f"encoder FLOPs = {flops['encoder_over_lm_prefill']:.3g} x LM-prefill FLOPs at {tokens} tokens")
    if model.get("image_tokens") not in (None, 576):
        parts.append(f"{model['image_tokens']} LM tokens per uncompressed image")
    return ", ".join(parts)


def throughput_markdown(result: dict, level: int = 3) -> str:
    h = "#" * level
    cfg = result["config"]
    eng = result.get("engines", {}).get("plugin") or next(iter(result.get("engines", {}).values()), {})
    memory = result["benchmark"] == "memory_bound"
    full = result["model"].get("image_tokens", 576)
    title = "Memory-bound regime (fixed small KV cache)" if memory else "Offline throughput"
    lines = [
        f"{h} {title}: {result['model'].get('preset') or result['model'].get('path')}",
        "",
        f"{_model_line(result)}. {_machine_line(result)}.",
        "",
        f"{cfg['rounds']} round(s) x {cfg['requests_per_arm_per_round']} requests per arm; per engine start an "
        f"untimed batch of {cfg.get('warmup_batch', 0)} requests of its largest arm and {cfg['warmup_per_arm']} per "
        f"arm; output {cfg['output_len']} tokens, text {result['text_tokens']} tokens + image, "
        f"KV block {eng.get('block_size')} tokens, {eng.get('num_kv_blocks')} blocks, "
        f"max_num_seqs {eng.get('max_num_seqs')}, max_num_batched_tokens {eng.get('max_num_batched_tokens')}.",
        "",
    ]
    if memory:
        lines += [
            f"| arm | prompt tok | KV blocks/req | max running | goal ≥ 0.95·(t+{full})/(t+b)·plain | met | "
            "KV-block ratio | preemptions | req/s | speedup |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        detail = result["goals"].get("memory_bound_concurrency", {}).get("detail", {})
        for a in result["arms"]:
            d = detail.get(a["name"], {})
            b = a.get("bounds", {})
            lines.append(
                f"| {a['name']} | {','.join(map(str, a['prompt_tokens']))} | "
                f"{fmt(a['kv']['mean_blocks_per_request'], 1)} | {a['steps']['max_running']} | "
                f"{fmt(d.get('target'), 1)} | {_met_cell(d)} | "
                f"{fmt(d.get('kv_block_ratio'), 2)} | {a['steps']['preemptions']} | "
                f"{fmt(a['requests_per_s'], 2)} | {fmt(b.get('speedup'), 2)} |"
            )
        lines += [
            "",
            "Max running = max `len(scheduler.running)` over the run, read in the engine. vLLM admits a request "
            "when its prompt's blocks are free and preempts (recomputes) later ones when running requests grow "
            "past the cache, so max running follows prompt blocks while the KV-block ratio (blocks held at full "
            "length, plain over the arm) is what fits without preemption; both are limited by whole blocks.",
        ]
    else:
        lines += [
            "| arm | prompt tok | KV blocks/req | req/s | per round | out tok/s | speedup | Amdahl bound req/s | "
            "achieved | phase-aware achieved | encoder ms/img | compress ms/img | LM prefill ms/tok | encoder | "
            "LM prefill | decode | other | TTFT p50 s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for a in result["arms"]:
            b, t = a.get("bounds", {}), a["time"]
            wall = a["wall_s"] or 1.0
            rounds = a.get("per_round_requests_per_s") or []
            spread = f"{min(rounds):.3g}–{max(rounds):.3g}" if len(rounds) > 1 else "–"
            prefill_tokens = a["steps"].get("prefill_tokens") or (
                sum(a["prompt_tokens"]) / len(a["prompt_tokens"]) * a["requests"])
            lines.append(
                f"| {a['name']} | {','.join(map(str, a['prompt_tokens']))} | "
                f"{fmt(a['kv']['mean_blocks_per_request'], 1)} | {fmt(a['requests_per_s'], 3)} | {spread} | "
                f"{fmt(a['output_tokens_per_s'], 1)} | {fmt(b.get('speedup'), 2)} | "
                f"{fmt(b.get('amdahl_requests_per_s'), 3)} | {_pct(b.get('achieved_of_amdahl'))} | "
                f"{_pct(b.get('achieved_of_phase_aware'))} | {fmt(t['encoder_ms_per_image'], 1)} | "
                f"{fmt(t['compression_ms_per_image'], 2)} | {_ms(t['lm_prefill_s'] / prefill_tokens, 2)} | "
                f"{_pct(t['encoder_s'] / wall)} | "
                f"{_pct(t['lm_prefill_s'] / wall)} | {_pct(t['decode_s'] / wall)} | {_pct(t['other_s'] / wall)} | "
                f"{fmt(a['latency_s']['ttft_engine'].get('median'), 2)} |"
            )
        lines += [
            "",
            "Speedup and bounds are against the plain-vLLM arm of the same run. Amdahl bound: "
            f"1 / (s + (1 - s)·(t+b)/(t+{full})) x plain req/s, s = plain's measured encoder share of wall time "
            "(everything but the encoder shrinks with the LM tokens). Phase-aware: only plain's LM-prefill time "
            "shrinks, decode and the rest stay. Encoder / LM prefill / decode / other: shares of the arm's wall "
            "time (encoder = `embed_multimodal` incl. compression; LM prefill = engine time of steps with prompt "
            "work minus encoder; decode = decode-only steps; other = wall minus engine step time: input "
            "processing, scheduling, output handling). TTFT here is engine-side under a full batch "
            "(first token - queued). Per round: the arm's req/s in each round (the run's noise). LM prefill ms/tok: "
            "LM-prefill time over prompt tokens; when it is lower for short prompts than for plain's, the "
            "compressed arm beats the token-proportional bound.",
        ]
    lines += ["", goals_markdown(result), ""]
    return "\n".join(lines)


def goals_markdown(result: dict) -> str:
    g = result.get("goals", {})
    full = result["model"].get("image_tokens", 576)
    out = ["Goals:"]
    encoder_ms = {arm["name"]: (arm.get("time") or {}).get("encoder_ms_per_image") for arm in result.get("arms", [])}
    if "kv_blocks_exact" in g:
        out.append(f"- KV blocks per request = ceil((prompt + output - 1) / block) and prompt = text + budget, "
                   f"every request of every arm: {_yes(g['kv_blocks_exact']['met'])}")
    if "off_within_noise" in g:
        o = g["off_within_noise"]
        out.append(f"- plugin installed, compression off vs plain vLLM: {fmt(o['off_over_plain'], 3)}x req/s, "
                   f"noise band ±{_pct(o['noise_band'], 1)}: within noise {_yes(o['met'])}")
    for name, d in (g.get("budget64_vs_amdahl") or {}).items():
        share = ("not measured (its timer hooks the LLaVA integration only)" if d["compression_share"] is None
                 else f"{_pct(d['compression_share'], 2)} of wall time (goal ≤ 2%: {_yes(d['compression_met'])})")
        beyond = ""
        if (d.get("achieved_of_amdahl") or 0) > 1.05:
            arm, plain = encoder_ms.get(name), encoder_ms.get("plain")
            beyond = (f" (the bound holds the encoder fixed; this arm's own encoder took {arm / plain:.0%} of "
                      "plain's time per image: merging inside the tower)" if arm and plain and arm < 0.6 * plain
                      else " (above the bound: shorter prompts also cost less per token)")
        out.append(f"- {name}: {_pct(d['achieved_of_amdahl'])} of the Amdahl bound{beyond} (goal ≥ 90%: "
                   f"{_yes(d['met'])}); compression {share}")
    if "memory_bound_concurrency" in g:
        out.append(f"- max concurrent ≥ 0.95·(t+{full})/(t+b)·plain for every compressed arm: "
                   f"{_yes(g['memory_bound_concurrency']['met'])}")
    return "\n".join(out)


def serving_markdown(result: dict, level: int = 3) -> str:
    h = "#" * level
    cfg = result["config"]
    slo = result.get("slo", {})
    lines = [
        f"{h} Online serving: {result['model'].get('preset') or result['model'].get('path')}",
        "",
        f"{_model_line(result)}. {_machine_line(result)}.",
        "",
        f"{cfg['rounds']} round(s), {cfg['requests_per_level']} requests per arm and load level, output "
        f"{cfg['output_len']} tokens (streamed), text {result.get('text_tokens')} tokens + image. Goodput SLO: "
        f"TTFT ≤ {fmt(slo.get('ttft_ms'), 0)} ms and TPOT ≤ {fmt(slo.get('tpot_ms'), 0)} ms ({slo.get('source')}).",
        "",
        "| arm | load | req/s | out tok/s | goodput req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
        "ITL p50 / p99 ms | E2E p50 / p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def pair(lat: dict, key: str) -> str:
        d = lat.get(key, {})
        return f"{fmt(d.get('median'), 0)} / {fmt(d.get('p99'), 0)}"

    for row in result["levels"]:
        lat = row["latency_ms"]
        lines.append(
            f"| {row['arm']} | {row['load']} | {fmt(row['requests_per_s'], 2)} | "
            f"{fmt(row['output_tokens_per_s'], 1)} | {fmt(row['goodput_requests_per_s'], 2)} | {pair(lat, 'ttft')} | "
            f"{pair(lat, 'tpot')} | {pair(lat, 'itl')} | {pair(lat, 'e2e')} |"
        )
    mixed = result.get("mixed")
    if mixed:
        lines += [
            "",
            f"Mixed budgets in one stream ({mixed['load']}, {mixed['requests']} requests, method "
            f"`{mixed['method']}`, budgets drawn per request): {fmt(mixed['requests_per_s'], 2)} req/s overall; "
            f"prompt tokens = text + budget for every request: {_yes(mixed['prompt_tokens_exact'])}; KV blocks "
            f"read from the engine = ceil((prompt + output - 1) / block) for every request: "
            f"{_yes(mixed.get('kv_blocks_exact'))}.",
            "",
            "| budget | requests | TTFT p50 ms | TPOT p50 ms | E2E p50 ms |",
            "|---:|---:|---:|---:|---:|",
        ]
        for b in mixed["per_budget"]:
            lat = b["latency_ms"]
            lines.append(f"| {b['budget']} | {b['requests']} | {fmt(lat['ttft'].get('median'), 0)} | "
                         f"{fmt(lat['tpot'].get('median'), 0)} | {fmt(lat['e2e'].get('median'), 0)} |")
    lines.append("")
    return "\n".join(lines)


def render(result: dict, level: int = 3) -> str:
    if result.get("benchmark") == "serving":
        return serving_markdown(result, level)
    return throughput_markdown(result, level)


def _display(folder: Path) -> str:
    try:
        return str(folder.relative_to(ROOT))
    except ValueError:
        return str(folder)


def load_results(folder: Path) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("benchmark") in KINDS:
            found.append((path, data))
    order = {k: i for i, k in enumerate(KINDS)}
    found.sort(key=lambda item: (order[item[1]["benchmark"]], item[0].name))
    return found


def results_markdown(folder: Path = RESULTS_DIR, level: int = 3) -> str:
    parts = [
        f"{'#' * (level - 1)} Results",
        "",
        f"Generated by `benchmarks/report.py` from `{_display(folder)}/*.json`; "
        "all ratios compare arms of the same run.",
        "",
    ]
    results = load_results(folder)
    if not results:
        parts.append("No results committed yet.")
    def model_of(data: dict) -> tuple:
        return data["benchmark"], data["model"].get("preset") or data["model"].get("path")

    seen = [model_of(data) for _path, data in results]
    for path, data in results:
        rendered = render(data, level)
        if seen.count(model_of(data)) > 1:  # two runs of one model: the headings name their files
            heading, rest = rendered.split("\n", 1)
            rendered = f"{heading} (`{path.stem}`)\n{rest}"
        parts.append(rendered)
        parts.append(f"Source: `{path.name}`" + (f", plot `{path.with_suffix('.png').name}`"
                                                  if path.with_suffix(".png").exists() else "") + ".")
        parts.append("")
    parts.append(accuracy_markdown(folder, level))
    return "\n".join(parts).rstrip() + "\n"


def load_accuracy_results(folder: Path) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(folder.glob("accuracy*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and {"baseline", "arms", "methods", "budgets"} <= data.keys():
            found.append((path, data))
    return sorted(found, key=lambda item: (item[0].stem != "accuracy", item[0].name))  # the main result first


def accuracy_markdown(folder: Path = RESULTS_DIR, level: int = 3) -> str:
    """Every accuracy result's table (per question type left to each result's own ``.md``)."""
    from vllm_tokcomp.bench.accuracy import markdown

    parts = [f"{'#' * (level - 1)} Answer accuracy", "",
             "Answer accuracy vs visual tokens on the synthetic VQA task (docs/dataset.md), served by vLLM, greedy, "
             "exact match; written by `benchmarks/accuracy.py`. Per question type: each result's `.md`.", ""]
    results = load_accuracy_results(folder)
    if not results:
        parts.append("No accuracy results committed yet.")
    for path, data in results:
        text = markdown(data).split("\n## Per question type", 1)[0].rstrip()
        text = "\n".join("#" * (level - 1) + line if line.startswith("#") else line for line in text.splitlines())
        title, rest = text.split("\n", 1)
        parts += [f"{title} (`{path.stem}`)", rest.rstrip(), "",
                  f"Source: `{path.name}`" + (f", plot `{path.with_suffix('.png').name}`"
                                              if path.with_suffix(".png").exists() else "") + ".", ""]
    return "\n".join(parts).rstrip() + "\n"


def write_section(path: Path, body: str) -> None:
    block = f"{BEGIN}\n{body}{END}\n"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS_DIR), help="folder with the JSON results")
    parser.add_argument("--write", default=None, help="also write the section into this markdown file")
    parser.add_argument("--level", type=int, default=3, help="heading level of each table (default 3)")
    args = parser.parse_args(argv)
    body = results_markdown(Path(args.results).resolve(), args.level)
    sys.stdout.write(body)
    if args.write:
        write_section(Path(args.write), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
