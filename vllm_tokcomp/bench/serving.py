"""Online serving: ``tokcomp serve`` vs plain ``vllm serve`` under a concurrency / request-rate sweep.

Like ``vllm bench serve``: the ``openai`` client streams single-image chat completions
(fixed output length, ``ignore_eos``) and records per request the time to first token
(TTFT), the gaps between streamed chunks (ITL), time per output token after the first
(TPOT) and end-to-end latency (E2E). Goodput counts requests per second that meet the
SLO (TTFT and TPOT limits; by default twice plain vLLM's median at the lightest load of
the same run, or ``--slo-ttft-ms`` / ``--slo-tpot-ms``).

Arms as in ``throughput.py``: ``plain`` (``vllm serve`` with the plugin filtered out),
``off`` (``tokcomp serve``, no per-request setting) and ``<method>@<budget>`` (the same
``tokcomp serve`` process, ``extra_body={"mm_processor_kwargs": {...}}`` per request).
Rounds alternate which server starts first; within a server the arm order rotates per
round. After the sweep, one stream mixes per-request budgets (``--mixed-budgets``) on the
``tokcomp`` server and checks every request's prompt tokens (= text + its budget) and
KV blocks (read from the engine, ``kv_probe``).

Load levels: ``--concurrency 1,4`` (closed loop: at most C requests in flight) and/or
``--request-rates 2,inf`` (open loop, Poisson arrivals, seeded).

    .venv/bin/python benchmarks/serving.py --model llava-proportioned --methods tome --budgets 192,64,32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vllm_tokcomp.bench import common  # noqa: E402
from vllm_tokcomp.bench.common import OFF, PLAIN, SCHEDULER_CLS, Arm  # noqa: E402
from vllm_tokcomp.bench.models import MODEL_PRESETS, mm_limits, resolve_model  # noqa: E402
from vllm_tokcomp.bench.throughput import is_cpu_build  # noqa: E402

SERVED_NAME = "bench"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help=f"preset ({', '.join(MODEL_PRESETS)}) or a model directory")
    p.add_argument("--methods", default="tome", help="comma-separated servable methods")
    p.add_argument("--budgets", default="192,64,32", help="comma-separated budgets")
    p.add_argument("--no-plain", action="store_true")
    p.add_argument("--no-off", action="store_true")
    p.add_argument("--concurrency", default="1,4", help="closed-loop levels (max requests in flight); '' for none")
    p.add_argument("--request-rates", default="", help="open-loop Poisson rates in req/s ('inf' = all at once)")
    p.add_argument("--num-requests", type=int, default=8, help="requests per arm and load level per round")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed requests per arm after each server start")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--question", default=common.DEFAULT_QUESTION)
    p.add_argument("--mixed-budgets", default=None, help="budgets mixed in one stream ('' to skip; default: the "
                   "model's full image count and 1/3, 1/9, 1/18 of it, LLaVA's 576,192,64,32)")
    p.add_argument("--mixed-requests", type=int, default=None, help="requests in the mixed stream per round "
                   "(default 2 x number of mixed budgets)")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="default: 1024, or the next multiple of 1024 that holds an uncompressed image + 256 tokens")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--dtype", default=None, help="default: float32 on CPU builds, auto on CUDA")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="eager mode (default: on for CPU builds, off on CUDA so vLLM uses CUDA graphs)")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="VLLM_CPU_KVCACHE_SPACE on CPU (default 2)")
    p.add_argument("--server-args", default="", help="extra arguments for both servers (one string)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/serving-<model>.json)")
    p.add_argument("--plot", default=None, help="PNG output (default next to the JSON; 'none' to skip)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--quiet", action="store_true")
    return p


def default_mixed_budgets(full: int) -> list[int]:
    """The whole image and about 1/3, 1/9 and 1/18 of it (LLaVA: 576, 192, 64, 32)."""
    return [full, *(max(1, round(full / d)) for d in (3, 9, 18))]


def server_args(args: argparse.Namespace, model: Path, load_format: str) -> list[str]:
    dtype = args.dtype or ("float32" if is_cpu_build() else "auto")
    eager = is_cpu_build() if args.enforce_eager is None else args.enforce_eager
    return [
        str(model), "--served-model-name", SERVED_NAME, "--max-model-len", str(args.max_model_len),
        "--max-num-seqs", str(args.max_num_seqs), "--dtype", dtype, "--load-format", load_format,
        *(["--enforce-eager"] if eager else []), "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0",
        "--limit-mm-per-prompt", json.dumps(mm_limits(model)), "--scheduler-cls", SCHEDULER_CLS,
        "--seed", "0", *args.server_args.split(),
    ]


# --- client ------------------------------------------------------------------------------------------
async def one_request(client, question: str, url: str, mm_kwargs: dict | None, output_len: int) -> dict:  # noqa: ANN001
    extra = {"ignore_eos": True, "min_tokens": output_len}
    if mm_kwargs is not None:
        extra["mm_processor_kwargs"] = mm_kwargs
    record: dict = {"budget": (mm_kwargs or {}).get("tokcomp_budget"), "ok": False}
    start = time.perf_counter()
    chunks: list[float] = []
    try:
        stream = await client.chat.completions.create(
            model=SERVED_NAME, messages=common.chat_messages(question, url), max_tokens=output_len,
            temperature=0.0, stream=True, stream_options={"include_usage": True}, extra_body=extra,
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and (chunk.choices[0].delta.content or "") != "":
                chunks.append(now)
            if chunk.usage is not None:
                record["prompt_tokens"] = chunk.usage.prompt_tokens
                record["output_tokens"] = chunk.usage.completion_tokens
        end = time.perf_counter()
    except Exception as error:  # noqa: BLE001 - a failed request is data, not a crash
        record["error"] = f"{type(error).__name__}: {error}"[:300]
        return record
    record.update(ok=bool(chunks), start=start, end=end, e2e=end - start)
    if chunks:
        record["ttft"] = chunks[0] - start
        record["itl"] = [b - a for a, b in zip(chunks, chunks[1:], strict=False)]
        out = record.get("output_tokens") or len(chunks)
        record["tpot"] = (end - chunks[0]) / (out - 1) if out > 1 else None
    return record


async def run_load(base_url: str, load: str, jobs: list[tuple[str, dict | None]], question: str, output_len: int,
                   seed: int) -> list[dict]:
    """Fire ``jobs`` (image URL, mm kwargs) at one load level; return per-request records."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=3600)
    kind, _, value = load.partition("=")
    try:
        if kind == "c":
            limit = asyncio.Semaphore(int(value))

            async def limited(url: str, kw: dict | None) -> dict:
                async with limit:
                    return await one_request(client, question, url, kw, output_len)

            return list(await asyncio.gather(*(limited(url, kw) for url, kw in jobs)))
        rate = float(value)
        rng = random.Random(seed)
        tasks = []
        for url, kw in jobs:
            tasks.append(asyncio.create_task(one_request(client, question, url, kw, output_len)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        return list(await asyncio.gather(*tasks))
    finally:
        await client.close()


# --- analysis ------------------------------------------------------------------------------------------
def busy_seconds(records: list[dict]) -> float | None:
    """Sum over rounds of (last end - first start): the time the arm's requests were being served."""
    spans: dict[object, tuple[float, float]] = {}
    for r in records:
        if r.get("ok"):
            lo, hi = spans.get(r.get("round"), (r["start"], r["end"]))
            spans[r.get("round")] = (min(lo, r["start"]), max(hi, r["end"]))
    return sum(hi - lo for lo, hi in spans.values()) if spans else None


def level_row(arm: Arm, load: str, records: list[dict], slo: dict | None) -> dict:
    ok = [r for r in records if r.get("ok")]
    duration = busy_seconds(records)
    out_tokens = sum(r.get("output_tokens") or 0 for r in ok)
    good = None
    if slo and ok and duration:
        good = sum(1 for r in ok if r["ttft"] * 1e3 <= slo["ttft_ms"] and (r["tpot"] or 0) * 1e3 <= slo["tpot_ms"])
    return {
        **{f"{k}": v for k, v in arm.to_dict().items() if k != "name"},
        "arm": arm.name,
        "load": load,
        "requests": len(records),
        "completed": len(ok),
        "errors": sorted({r["error"] for r in records if "error" in r})[:5],
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration else None,
        "output_tokens_per_s": out_tokens / duration if duration else None,
        "goodput_requests_per_s": good / duration if good is not None else None,
        "slo_met_fraction": good / len(ok) if good is not None and ok else None,
        "prompt_tokens": sorted({r.get("prompt_tokens") for r in ok if r.get("prompt_tokens") is not None}),
        "latency_ms": {
            "ttft": common.summary((r["ttft"] for r in ok), 1e3),
            "tpot": common.summary((r["tpot"] for r in ok), 1e3),
            "itl": common.summary((x for r in ok for x in r["itl"]), 1e3),
            "e2e": common.summary((r["e2e"] for r in ok), 1e3),
        },
    }


def default_slo(levels: dict, args: argparse.Namespace, loads: list[str]) -> dict:
    if args.slo_ttft_ms and args.slo_tpot_ms:
        return {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms, "source": "given"}
    for ref in (PLAIN, OFF):
        records = levels.get((ref, loads[0]))
        ok = [r for r in records or [] if r.get("ok")]
        if ok:
            ttft = common.percentile([r["ttft"] for r in ok], 50) * 1e3
            tpot = common.percentile([r["tpot"] for r in ok if r["tpot"]], 50) * 1e3
            return {"ttft_ms": args.slo_ttft_ms or 2 * ttft, "tpot_ms": args.slo_tpot_ms or 2 * tpot,
                    "source": f"2 x {ref}'s median at {loads[0]}"}
    return {"ttft_ms": args.slo_ttft_ms or float("inf"), "tpot_ms": args.slo_tpot_ms or float("inf"),
            "source": "none"}


def mixed_summary(records: list[dict], kv: list[dict], text_tokens: int | None, method: str, load: str,
                  full: int = common.FULL_IMAGE_TOKENS) -> dict:
    ok = [r for r in records if r.get("ok")]
    duration = busy_seconds(records)
    budgets = sorted({r["budget"] for r in records})
    exact = text_tokens is not None and all(
        r.get("prompt_tokens") == text_tokens + min(r["budget"], full) for r in ok
    ) and len(ok) == len(records)
    kv_exact = bool(kv) and all(
        k["max_blocks"] == math.ceil((k["prompt_tokens"] + k["output_tokens"] - 1) / k["block_size"]) for k in kv
    )
    expected_prompts = sorted(text_tokens + min(r["budget"], full) for r in records) \
        if text_tokens is not None else None
    return {
        "method": method,
        "load": load,
        "requests": len(records),
        "completed": len(ok),
        "requests_per_s": len(ok) / duration if duration else None,
        "prompt_tokens_exact": exact,
        "kv_blocks_exact": kv_exact and sorted(k["prompt_tokens"] for k in kv) == expected_prompts,
        "kv_records": kv,
        "per_budget": [
            {
                "budget": b,
                "requests": sum(1 for r in ok if r["budget"] == b),
                "prompt_tokens": sorted({r.get("prompt_tokens") for r in ok if r["budget"] == b}),
                "latency_ms": {
                    key: common.summary((r[key] for r in ok if r["budget"] == b), 1e3)
                    for key in ("ttft", "tpot", "e2e")
                },
            }
            for b in budgets
        ],
    }


def _compact(record: dict) -> dict:
    keys = ("round", "ok", "budget", "start", "end", "ttft", "tpot", "e2e", "prompt_tokens", "output_tokens", "error")
    out = {k: record[k] for k in keys if k in record}
    if "itl" in record:
        out["itl"] = [round(x, 5) for x in record["itl"]]
    return out


# --- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    from vllm_tokcomp.launch import ServerProcess

    args = build_parser().parse_args(argv)
    methods = common.parse_list(args.methods)
    budgets = common.parse_list(args.budgets, int)
    common.check_methods(methods)
    loads = [f"c={c}" for c in common.parse_list(args.concurrency, int)]
    loads += [f"rate={r}" for r in common.parse_list(args.request_rates)]
    if not loads:
        raise SystemExit("give --concurrency and/or --request-rates")
    arms = common.make_arms(methods, budgets, plain=not args.no_plain, off=not args.no_off)
    model_path, load_format, model_info = resolve_model(args.model)
    full, image_size = model_info["image_tokens"], model_info["image_size"]
    if args.max_model_len is None:
        args.max_model_len = 1024 * math.ceil((full + 256) / 1024)
    mixed_budgets = (default_mixed_budgets(full) if args.mixed_budgets is None
                     else common.parse_list(args.mixed_budgets, int))
    mixed_n = args.mixed_requests or 2 * len(mixed_budgets)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tokcomp-serve-"))
    workdir.mkdir(parents=True, exist_ok=True)
    slug = args.model if args.model in MODEL_PRESETS else Path(args.model).name
    out = Path(args.out) if args.out else common.RESULTS_DIR / f"serving-{slug}.json"
    base_args = server_args(args, model_path, load_format)
    machine = common.machine_info()
    urls: dict[int, str] = {}

    def url(seed: int) -> str:
        if seed not in urls:
            urls[seed] = common.image_data_url(seed, image_size)
        return urls[seed]

    plugin_arms = [a for a in arms if not a.plain]
    servers = [("plain", [a for a in arms if a.plain]), ("tokcomp", plugin_arms)]
    servers = [s for s in servers if s[1] or (s[0] == "tokcomp" and mixed_budgets)]
    total = args.rounds * sum(len(s_arms) * (len(loads) + (1 if args.warmup else 0)) for _, s_arms in servers)
    total += args.rounds * (1 if mixed_budgets and any(n == "tokcomp" for n, _ in servers) else 0)
    progress = None
    if not args.quiet:
        from tqdm import tqdm

        progress = tqdm(total=total, unit="load", desc=f"serving {slug}", dynamic_ncols=True)
    levels: dict[tuple[str, str], list[dict]] = {}
    mixed_records: list[dict] = []
    mixed_kv: list[dict] = []
    server_info: dict = {}
    started = time.time()
    for r in range(args.rounds):
        order = servers if r % 2 == 0 else list(reversed(servers))
        for name, server_arms in order:
            kv_log = workdir / f"r{r}-{name}.kv.jsonl"
            env = common.engine_env(workdir / "vllm-cache", plain=name == "plain", kv_cache_gib=args.kv_cache_gib)
            env["TOKCOMP_KV_LOG"] = str(kv_log)
            if progress is not None:
                progress.set_postfix_str(f"r{r} {name}: starting server")
            t0 = time.perf_counter()
            cmd = base_args if name == "plain" else [base_args[0], "--method", "none", *base_args[1:]]
            with ServerProcess(cmd, plain=name == "plain", env=env, log_path=workdir / f"r{r}-{name}.log") as srv:
                server_info.setdefault(name, {"startup_s": time.perf_counter() - t0, "command": srv.command()[2:-4]})
                rotated = common.rotate(server_arms, r)
                for k, arm in enumerate(rotated if args.warmup else []):
                    jobs = [(url(10**6 + 1000 * r + 100 * k + i), arm.mm_kwargs()) for i in range(args.warmup)]
                    asyncio.run(run_load(srv.base_url, "c=1", jobs, args.question, args.output_len, seed=r))
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix_str(f"r{r} {name}: warmup {arm.name}")
                for load in loads:
                    for arm in rotated:
                        seeds = [1000 * (r + 1) + i for i in range(args.num_requests)]
                        jobs = [(url(s), arm.mm_kwargs()) for s in seeds]
                        records = asyncio.run(run_load(srv.base_url, load, jobs, args.question, args.output_len,
                                                       seed=r))
                        for record in records:
                            record["round"] = r
                        levels.setdefault((arm.name, load), []).extend(records)
                        if progress is not None:
                            progress.update(1)
                            progress.set_postfix_str(f"r{r} {name}: {arm.name} {load}")
                if name == "tokcomp" and mixed_budgets:
                    rng = random.Random(r)
                    method = methods[0] if methods else "uniform"
                    picks = [mixed_budgets[i % len(mixed_budgets)] for i in range(mixed_n)]
                    rng.shuffle(picks)
                    offset = sum(1 for _ in open(kv_log)) if kv_log.exists() else 0
                    jobs = [(url(5000 + 1000 * r + i), {"tokcomp_method": method, "tokcomp_budget": b})
                            for i, b in enumerate(picks)]
                    mixed_load = loads[-1] if loads[-1].startswith("c=") else "c=4"
                    batch = asyncio.run(run_load(srv.base_url, mixed_load, jobs, args.question, args.output_len,
                                                 seed=r))
                    for record in batch:
                        record["round"] = r
                    mixed_records += batch
                    time.sleep(0.5)  # the KV record is written when the engine frees the request
                    mixed_kv += [json.loads(line) for line in kv_log.read_text().splitlines()[offset:]]
                    if progress is not None:
                        progress.update(1)
    if progress is not None:
        progress.close()
    slo = default_slo(levels, args, loads)
    rows = [level_row(arm, load, levels[(arm.name, load)], slo) for load in loads for arm in arms
            if (arm.name, load) in levels]
    text_tokens = None
    for row in rows:
        if row["prompt_tokens"]:
            image = full if row["budget"] is None else min(row["budget"], full)
            text_tokens = row["prompt_tokens"][0] - image
            break
    for row in rows:
        image = full if row["budget"] is None else min(row["budget"], full)
        row["prompt_is_text_plus_budget"] = text_tokens is not None and row["prompt_tokens"] == [text_tokens + image]
    result = {
        "schema_version": common.SCHEMA_VERSION,
        "benchmark": "serving",
        "created": common.timestamp(),
        "duration_s": time.time() - started,
        "machine": machine,
        "model": model_info,
        "config": {
            "methods": methods, "budgets": budgets, "loads": loads, "rounds": args.rounds,
            "requests_per_level": args.num_requests * args.rounds, "warmup_per_arm": args.warmup,
            "output_len": args.output_len, "question": args.question, "server_args": base_args[1:],
            "kv_cache_gib": args.kv_cache_gib, "mixed_budgets": mixed_budgets,
            "dtype": args.dtype or ("float32" if is_cpu_build() else "auto"),
        },
        "servers": server_info,
        "slo": slo,
        "text_tokens": text_tokens,
        "levels": rows,
        "raw": {f"{arm}|{load}": [_compact(r) for r in recs] for (arm, load), recs in levels.items()},
        "mixed_raw": [_compact(r) for r in mixed_records],
        "mixed": mixed_summary(mixed_records, mixed_kv, text_tokens, methods[0] if methods else "uniform",
                               (loads[-1] if loads[-1].startswith("c=") else "c=4"), full) if mixed_records else None,
    }
    result["machine"]["load_avg_1m_end"] = common.machine_info()["load_avg_1m_start"]
    common.write_json(out, result)
    from vllm_tokcomp.bench.report import serving_markdown

    text = serving_markdown(result)
    out.with_suffix(".md").write_text(text)
    if args.plot != "none":
        from vllm_tokcomp.bench.plots import plot_serving

        plot_serving(result, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(text)
    print(f"results: {out}  (logs: {workdir})")
    return result


if __name__ == "__main__":
    main()
