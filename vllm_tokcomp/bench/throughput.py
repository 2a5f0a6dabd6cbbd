"""Offline throughput of plain vLLM vs vllm-tokcomp (every method x budget) in one interleaved run.

Like ``vllm bench throughput``: each batch hands N single-image requests with a fixed output
length (``ignore_eos``) to ``LLM.generate`` at once and is timed from the call to its return.

Arms: ``plain`` (vLLM with the plugin filtered out, ``VLLM_PLUGINS=""``), ``off`` (plugin
loaded, no tokcomp setting) and ``<method>@<budget>`` (per-request ``mm_processor_kwargs``).
All plugin arms share one engine process, plain vLLM gets its own; nothing else differs
(same engine arguments, prefix caching and the multimodal processor cache off so repeated
images cost the same everywhere). The run goes in rounds: every round starts both engines
once (order alternating), warms each arm up, then runs one batch per arm in an order that
rotates from round to round, so load drift on the machine hits all arms alike. Every round
uses the same images for every arm.

Measured inside the engine (``benchmarks/probes.py``): KV blocks per request (the plugin's
``kv_probe``), engine steps split into steps with prompt work (prefill, the encoder runs
there) and decode-only steps, the max number of running requests, and the wall time of
``embed_multimodal`` (vision tower + projector [+ compression]) and of the compression call.

``--mode memory-bound`` fixes a small KV cache (``num_gpu_blocks_override``) that holds
``--plain-fit`` plain requests (block size 16 on CUDA, 32 on CPU) and submits many requests per batch, so
concurrency is limited by KV memory; it reports the max number of concurrently running
requests per arm against the goal 0.95 x (text+576)/(text+budget) x plain.

    .venv/bin/python benchmarks/throughput.py --model llava-proportioned --rounds 3 --num-requests 24
    .venv/bin/python benchmarks/throughput.py --mode memory-bound --model tiny
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vllm_tokcomp.bench import common  # noqa: E402
from vllm_tokcomp.bench.common import OFF, PLAIN, PROGRESS_PREFIX, STEP_LOG_ENV, Arm  # noqa: E402
from vllm_tokcomp.bench.models import MODEL_PRESETS, image_prompt, mm_limits, resolve_model  # noqa: E402
from vllm_tokcomp.cli import is_cpu_build  # noqa: E402

MEMORY_BOUND_BLOCK_SIZE = {"cpu": 32, "cuda": 16}  # vLLM's CPU attention needs multiples of 32


def build_parser(mode_default: str = "throughput") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=("throughput", "memory-bound"), default=mode_default)
    p.add_argument("--model", default="tiny", help=f"preset ({', '.join(MODEL_PRESETS)}) or a model directory")
    p.add_argument("--methods", default=",".join(common.DEFAULT_METHODS), help="comma-separated servable methods")
    p.add_argument("--budgets", default=",".join(map(str, common.DEFAULT_BUDGETS)), help="comma-separated budgets")
    p.add_argument("--no-plain", action="store_true", help="skip the plain-vLLM arm")
    p.add_argument("--no-off", action="store_true", help="skip the plugin-loaded-but-off arm")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per arm over the whole run (default: 4 x rounds; memory-bound: 48 x rounds)")
    p.add_argument("--rounds", type=int, default=2, help="rounds (each starts both engines once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests per arm after each engine start")
    p.add_argument("--warmup-batch", type=int, default=None,
                   help="untimed full batch of the largest arm first in each engine (default: requests per round)")
    p.add_argument("--output-len", type=int, default=16, help="generated tokens per request (ignore_eos)")
    p.add_argument("--question", default=common.DEFAULT_QUESTION, help="text of every request")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="default: 1024, or the next multiple of 1024 that holds an uncompressed image + 256 tokens")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None,
                   help="KV block size (default: the platform's; memory-bound: 32 on CPU, 16 on CUDA)")
    p.add_argument("--dtype", default=None, help="model dtype (default: float32 on CPU builds, auto on CUDA)")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="VLLM_CPU_KVCACHE_SPACE on CPU (default 2)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="num_gpu_blocks_override (memory-bound mode: "
                   "default fits --plain-fit plain requests)")
    p.add_argument("--plain-fit", type=int, default=4, help="memory-bound: plain requests the KV cache holds")
    p.add_argument("--async-scheduling", action="store_true", help="GPU: keep vLLM's async scheduling "
                   "(step times then overlap; KV and concurrency numbers are unaffected)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="eager mode (default: on for CPU builds, off on CUDA so vLLM uses CUDA graphs)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/<mode>-<model>.json)")
    p.add_argument("--markdown", default=None, help="markdown output (default: next to the JSON)")
    p.add_argument("--plot", default=None, help="PNG output (default: next to the JSON; 'none' to skip)")
    p.add_argument("--workdir", default=None, help="logs and per-engine files (default: a temp dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--reanalyse", default=None, metavar="JSON",
                   help="no engines: redo the analysis of an earlier run from its --workdir engine results "
                   "(arms, config, machine info from JSON) and rewrite JSON, markdown and plot")
    return p


# --- planning ------------------------------------------------------------------------------------
def plan_rounds(arms: list[Arm], rounds: int, per_round: int, warmup: int,
                warmup_batch: int | None = None) -> list[list[dict]]:
    """Per round, the engine runs in order: ``{"engine": "plain"|"plugin", "batches": [...]}``.

    Each engine first runs an untimed batch of ``warmup_batch`` (default ``per_round``) requests of
    its largest arm, so the first timed batch does not pay for first-time allocations and kernel
    setup at full batch size, then ``warmup`` untimed requests per arm, then the timed batches.
    """
    plugin_arms = [a for a in arms if not a.plain]
    plain_arms = [a for a in arms if a.plain]
    warmup_batch = per_round if warmup_batch is None else warmup_batch
    schedule = []
    for r in range(rounds):
        seeds = [1000 * (r + 1) + i for i in range(per_round)]
        engines = []
        for engine, engine_arms in (("plain", plain_arms), ("plugin", common.rotate(plugin_arms, r))):
            if not engine_arms:
                continue
            batches = []
            if warmup_batch:
                largest = max(engine_arms, key=lambda a: a.image_tokens())
                batches.append({"arm": largest.name, "round": r, "timed": False, "mm_kwargs": largest.mm_kwargs(),
                                "seeds": [2 * 10**6 + 1000 * r + i for i in range(warmup_batch)]})
            for k, arm in enumerate(engine_arms):
                if warmup:
                    warm = [10**6 + 1000 * r + 100 * k + i for i in range(warmup)]
                    batches.append({"arm": arm.name, "round": r, "timed": False, "seeds": warm,
                                    "mm_kwargs": arm.mm_kwargs()})
            for arm in engine_arms:
                batches.append({"arm": arm.name, "round": r, "timed": True, "seeds": seeds,
                                "mm_kwargs": arm.mm_kwargs()})
            engines.append({"engine": engine, "batches": batches})
        if r % 2 == 1:
            engines.reverse()
        schedule.append(engines)
    return schedule


def engine_kwargs(args: argparse.Namespace, load_format: str) -> dict:
    kwargs: dict = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                    "load_format": load_format, "async_scheduling": args.async_scheduling}
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.block_size:
        kwargs["block_size"] = args.block_size
    if args.num_kv_blocks:
        kwargs["num_gpu_blocks_override"] = args.num_kv_blocks
    if args.gpu_memory_utilization:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    kwargs["dtype"] = args.dtype or ("float32" if is_cpu_build() else "auto")
    kwargs["enforce_eager"] = is_cpu_build() if args.enforce_eager is None else args.enforce_eager
    return kwargs


def run_engine(name: str, batches: list[dict], args: argparse.Namespace, model: Path, ekwargs: dict,
               workdir: Path, tag: str, progress) -> dict:  # noqa: ANN001 - tqdm or None
    """Run one engine process over ``batches``; return its result (engine info + batches)."""
    job = {
        "model": str(model),
        "engine": ekwargs,
        "question": args.question,
        "prompt": args.prompt,
        "limit_mm_per_prompt": mm_limits(model),
        "image_size": args.image_size,
        "output_len": args.output_len,
        "batches": batches,
        "out": str(workdir / f"{tag}.result.json"),
    }
    job_path = workdir / f"{tag}.job.json"
    job_path.write_text(json.dumps(job))
    env = common.engine_env(workdir / "vllm-cache", plain=name == "plain", kv_cache_gib=args.kv_cache_gib)
    env["TOKCOMP_KV_LOG"] = str(workdir / f"{tag}.kv.jsonl")
    env[STEP_LOG_ENV] = str(workdir / f"{tag}.steps.jsonl")
    log_path = workdir / f"{tag}.log"
    if progress is not None:
        progress.set_postfix_str(f"{tag}: starting engine")
    with open(log_path, "w") as log:
        # Own process group: if this run is interrupted, the engine's EngineCore/worker processes go with it.
        proc = subprocess.Popen([sys.executable, "-m", "vllm_tokcomp.bench.engine_worker", str(job_path)],
                                cwd=common.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    event = json.loads(line[len(PROGRESS_PREFIX):])
                    if progress is not None and "arm" in event:
                        progress.update(1)
                        kind = "" if event["timed"] else " (warmup)"
                        progress.set_postfix_str(f"{tag}: {event['arm']}{kind} {event['wall_s']:.1f}s")
                else:
                    log.write(line)
            rc = proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
    if rc != 0 or not Path(job["out"]).exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"engine {tag} failed (rc={rc}); log {log_path}:\n{tail}")
    return json.loads(Path(job["out"]).read_text())


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- analysis -----------------------------------------------------------------------------------
def _steps_summary(steps: list[dict]) -> dict:
    active = [s for s in steps if s["prefill_tokens"] or s["decode_tokens"]]
    prefill = [s for s in active if s["prefill_tokens"]]
    decode = [s for s in active if not s["prefill_tokens"]]
    return {
        "steps": len(active),
        "prefill_steps": len(prefill),
        "decode_steps": len(decode),
        "exec_s": sum(s["exec_s"] for s in active),
        "prefill_step_s": sum(s["exec_s"] for s in prefill),
        "decode_step_s": sum(s["exec_s"] for s in decode),
        "max_running": max((s["running"] for s in steps), default=0),
        "max_waiting": max((s["waiting"] for s in steps), default=0),
        "preemptions": sum(s["preempted"] for s in steps),
        "max_kv_usage": max((s["kv_usage"] or 0.0 for s in steps), default=0.0),
        "mean_decode_batch": (sum(s["decode_tokens"] for s in decode) / len(decode)) if decode else None,
        "prefill_tokens": sum(s["prefill_tokens"] for s in active),
        "decode_tokens": sum(s["decode_tokens"] for s in active),
    }


def analyse_arm(arm: Arm, batches: list[dict], output_len: int, full: int = common.FULL_IMAGE_TOKENS) -> dict:
    requests = [r for b in batches for r in b["requests"]]
    kv = [k for b in batches for k in b["kv"]]
    steps = [s for b in batches for s in b["steps"]]
    wall = sum(b["wall_s"] for b in batches)
    n = len(requests)
    prompt_tokens = sorted({r["prompt_tokens"] for r in requests})
    out_tokens = sum(r["output_tokens"] for r in requests)
    encoder = {k: sum(b["encoder"].get(k, 0) for b in batches) for k in batches[0]["encoder"]} if batches else {}
    st = _steps_summary(steps)
    enc_s = encoder.get("encoder_s", 0.0)
    method_s = encoder.get("method_s", 0.0) + encoder.get("text_signals_s", 0.0)
    if arm.method is not None and arm.method != "none" and not encoder.get("method_calls"):
        method_s = None  # the compression timer hooks the LLaVA integration only: not measured, not zero
    lm_prefill_s = max(st["prefill_step_s"] - enc_s, 0.0)
    other_s = max(wall - st["exec_s"], 0.0)
    block_size = kv[0]["block_size"] if kv else None
    expected_image = arm.image_tokens(full)
    kv_rows = []
    for record in kv:
        expected_blocks = math.ceil((record["prompt_tokens"] + record["output_tokens"] - 1) / record["block_size"])
        kv_rows.append(record["max_blocks"] == expected_blocks)
    per_round = [len(b["requests"]) / b["wall_s"] for b in batches]
    ttft = [r["first_token_ts"] - r["queued_ts"] for r in requests if r.get("first_token_ts")]
    prefill_lat = [r["first_token_ts"] - r["scheduled_ts"] for r in requests if r.get("first_token_ts")]
    decode_lat = [r["last_token_ts"] - r["first_token_ts"] for r in requests if r.get("last_token_ts")]
    e2e = [r["last_token_ts"] - r["queued_ts"] for r in requests if r.get("last_token_ts")]
    result = {
        **arm.to_dict(),
        "image_tokens": expected_image,
        "requests": n,
        "batches": len(batches),
        "wall_s": wall,
        "requests_per_s": n / wall if wall else None,
        "output_tokens_per_s": out_tokens / wall if wall else None,
        "total_tokens_per_s": (sum(r["prompt_tokens"] for r in requests) + out_tokens) / wall if wall else None,
        "per_round_requests_per_s": per_round,
        "prompt_tokens": prompt_tokens,
        "output_tokens": sorted({r["output_tokens"] for r in requests}),
        "kv": {
            "block_size": block_size,
            "records": len(kv),
            "blocks_per_request": sorted({k["max_blocks"] for k in kv}),
            "mean_blocks_per_request": sum(k["max_blocks"] for k in kv) / len(kv) if kv else None,
            "exact": bool(kv_rows) and all(kv_rows) and len(kv) == n,
            "per_request": [{k: r[k] for k in ("prompt_tokens", "output_tokens", "max_blocks", "block_size")}
                            for r in kv],
        },
        "time": {
            "encoder_s": enc_s,
            "encoder_items": encoder.get("encoder_items", 0),
            "encoder_ms_per_image": 1e3 * enc_s / encoder["encoder_items"] if encoder.get("encoder_items") else None,
            "compression_s": method_s,
            "compression_ms_per_image": 1e3 * method_s / encoder["method_calls"] if encoder.get("method_calls")
            else None,
            "lm_prefill_s": lm_prefill_s,
            "decode_s": st["decode_step_s"],
            "engine_exec_s": st["exec_s"],
            "other_s": other_s,
            "encoder_share": enc_s / wall if wall else None,
            "compression_share": method_s / wall if wall and method_s is not None else None,
        },
        "steps": st,
        "latency_s": {
            "ttft_engine": common.summary(ttft),
            "prefill": common.summary(prefill_lat),
            "decode": common.summary(decode_lat),
            "e2e_engine": common.summary(e2e),
        },
        "load_avg_1m": [b.get("load_avg_1m") for b in batches],
    }
    if output_len and result["output_tokens"] != [output_len]:
        result["warning"] = f"output lengths {result['output_tokens']} != {output_len}"
    return result


def analyse(arms: list[Arm], engine_results: list[dict], args: argparse.Namespace) -> dict:
    timed: dict[str, list[dict]] = {a.name: [] for a in arms}
    for result in engine_results:
        for batch in result["batches"]:
            if batch["timed"]:
                timed[batch["arm"]].append(batch)
    full = getattr(args, "full_image_tokens", common.FULL_IMAGE_TOKENS)
    text_tokens = None
    for ref in (PLAIN, OFF):
        for batch in timed.get(ref, []):
            text_tokens = batch["requests"][0]["prompt_tokens"] - full
            break
        if text_tokens is not None:
            break
    rows = {a.name: analyse_arm(a, timed[a.name], args.output_len, full) for a in arms if timed[a.name]}
    if text_tokens is None:  # no uncompressed arm: infer from a compressed one
        for row in rows.values():
            text_tokens = row["prompt_tokens"][0] - row["image_tokens"]
            break
    baseline = rows.get(PLAIN) or rows.get(OFF)
    for row in rows.values():
        row["kv"]["prompt_is_text_plus_budget"] = row["prompt_tokens"] == [text_tokens + row["image_tokens"]]
        add_bounds(row, baseline, text_tokens, full)
    goals = evaluate_goals(rows, text_tokens, args, full)
    return {"text_tokens": text_tokens, "arms": list(rows.values()), "goals": goals}


def add_bounds(row: dict, base: dict | None, text_tokens: int, full: int = common.FULL_IMAGE_TOKENS) -> None:
    """Amdahl bound from the baseline's measured encoder share, and a phase-aware bound."""
    if base is None or not base.get("requests_per_s"):
        return
    ratio = (text_tokens + row["image_tokens"]) / (text_tokens + full)
    t = base["time"]
    wall = base["wall_s"]
    share = t["encoder_share"]
    bound = base["requests_per_s"] * common.amdahl_speedup(share, ratio)
    # Phase-aware: only the LM prefill shrinks with the tokens; decode and the rest stay.
    rest = wall - t["encoder_s"] - t["lm_prefill_s"]
    phase_speedup = wall / (t["encoder_s"] + t["lm_prefill_s"] * ratio + rest) if wall else None
    row["bounds"] = {
        "baseline": base["name"],
        "lm_token_ratio": ratio,
        "encoder_share": share,
        "speedup": row["requests_per_s"] / base["requests_per_s"],
        "amdahl_speedup": common.amdahl_speedup(share, ratio),
        "amdahl_requests_per_s": bound,
        "achieved_of_amdahl": row["requests_per_s"] / bound,
        "phase_aware_speedup": phase_speedup,
        "achieved_of_phase_aware": (row["requests_per_s"] / (base["requests_per_s"] * phase_speedup))
        if phase_speedup else None,
    }


def evaluate_goals(
    rows: dict, text_tokens: int, args: argparse.Namespace, full: int = common.FULL_IMAGE_TOKENS
) -> dict:
    goals: dict = {}
    goals["kv_blocks_exact"] = {
        "met": all(r["kv"]["exact"] and r["kv"]["prompt_is_text_plus_budget"] for r in rows.values()),
        "detail": {n: [r["kv"]["exact"], r["kv"]["prompt_is_text_plus_budget"]] for n, r in rows.items()},
    }
    plain, off = rows.get(PLAIN), rows.get(OFF)
    if plain and off:
        ratio = off["requests_per_s"] / plain["requests_per_s"]
        spreads = [s for s in (common.rel_spread(plain["per_round_requests_per_s"]),
                               common.rel_spread(off["per_round_requests_per_s"])) if s is not None]
        noise = max(spreads) if spreads else None
        goals["off_within_noise"] = {
            "off_over_plain": ratio,
            "noise_band": noise,
            "met": None if noise is None else abs(ratio - 1.0) <= noise,
            "note": "noise band = largest (max-min)/median of per-round req/s of the two arms",
        }
    at64 = [r for r in rows.values() if r["budget"] == 64 and "bounds" in r and args.mode == "throughput"]
    if at64:
        goals["budget64_vs_amdahl"] = {
            r["name"]: {
                "achieved_of_amdahl": r["bounds"]["achieved_of_amdahl"],
                "met": r["bounds"]["achieved_of_amdahl"] >= 0.9,
                "compression_share": r["time"]["compression_share"],
                "compression_met": None if r["time"]["compression_share"] is None
                else r["time"]["compression_share"] <= 0.02,
            }
            for r in at64
        }
    if args.mode == "memory-bound":
        base = plain or off
        detail = {}
        for r in rows.values():
            if r["method"] is None or base is None:
                continue
            target = 0.95 * (text_tokens + full) / (text_tokens + r["image_tokens"]) * base["steps"]["max_running"]
            blocks_base = base["kv"]["mean_blocks_per_request"]
            blocks_arm = r["kv"]["mean_blocks_per_request"]
            detail[r["name"]] = {
                "max_running": r["steps"]["max_running"],
                "plain_max_running": base["steps"]["max_running"],
                "target": target,
                "met": r["steps"]["max_running"] >= target,
                "ratio": r["steps"]["max_running"] / base["steps"]["max_running"],
                "token_ratio": (text_tokens + full) / (text_tokens + r["image_tokens"]),
                "kv_block_ratio": blocks_base / blocks_arm if blocks_arm else None,
                "capped_by_requests": r["steps"]["max_running"] >= r["requests"] / max(r["batches"], 1),
                "capped_by_max_num_seqs": r["steps"]["max_running"] >= args.max_num_seqs,
            }
        goals["memory_bound_concurrency"] = {"met": all(d["met"] for d in detail.values()) if detail else None,
                                             "detail": detail}
    return goals


# --- output ---------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    from vllm_tokcomp.bench.report import throughput_markdown

    return throughput_markdown(result)


def reanalyse(args: argparse.Namespace) -> dict:
    """Analysis of an earlier run again, from the raw engine results it left in ``--workdir``."""
    old = json.loads(Path(args.reanalyse).read_text())
    if not args.workdir:
        raise SystemExit("--reanalyse needs the run's --workdir (its r*-*.result.json files)")
    cfg = old["config"]
    args.mode, args.output_len = cfg["mode"], cfg["output_len"]
    args.max_num_seqs = cfg["engine_kwargs"]["max_num_seqs"]
    arms = [Arm.from_dict(a) for a in old["arms"]]
    args.full_image_tokens = old["model"].get("image_tokens", common.FULL_IMAGE_TOKENS)
    results = []
    for entry in old["rounds"]:
        path = Path(args.workdir) / f"r{entry['round']}-{entry['engine']}.result.json"
        results.append(json.loads(path.read_text()))
    result = {**old, **analyse(arms, results, args), "reanalysed": common.timestamp()}
    _write_outputs(result, Path(args.reanalyse), args)
    return result


def _write_outputs(result: dict, out: Path, args: argparse.Namespace) -> None:
    common.write_json(out, result)
    md_path = Path(args.markdown) if args.markdown else out.with_suffix(".md")
    md_path.write_text(markdown(result))
    if args.plot != "none":
        from vllm_tokcomp.bench.plots import plot_throughput

        plot_throughput(result, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(markdown(result))


def main(argv: list[str] | None = None, mode_default: str = "throughput") -> dict:
    args = build_parser(mode_default).parse_args(argv)
    if args.reanalyse:
        return reanalyse(args)
    methods = common.parse_list(args.methods)
    budgets = common.parse_list(args.budgets, int)
    common.check_methods(methods)
    memory_bound = args.mode == "memory-bound"
    if args.num_requests is None:
        args.num_requests = (48 if memory_bound else 4) * args.rounds
    per_round = max(1, math.ceil(args.num_requests / args.rounds))
    arms = common.make_arms(methods, budgets, plain=not args.no_plain, off=not args.no_off)
    model_path, load_format, model_info = resolve_model(args.model)
    args.full_image_tokens = model_info["image_tokens"]
    args.image_size = model_info["image_size"]
    if args.max_model_len is None:
        args.max_model_len = 1024 * math.ceil((args.full_image_tokens + 256) / 1024)
    args.prompt = image_prompt(model_path, args.question)  # once: for Qwen it loads the processor
    text_estimate = None
    if memory_bound:
        args.block_size = args.block_size or MEMORY_BOUND_BLOCK_SIZE["cpu" if is_cpu_build() else "cuda"]
        if args.num_kv_blocks is None:
            text_estimate = _count_text_tokens(model_path, args.prompt)
            per_plain = math.ceil((text_estimate + args.full_image_tokens + args.output_len - 1) / args.block_size)
            args.num_kv_blocks = max(args.plain_fit * per_plain, math.ceil(args.max_model_len / args.block_size))
    ekwargs = engine_kwargs(args, load_format)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tokcomp-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    slug = args.model if args.model in MODEL_PRESETS else Path(args.model).name
    out = Path(args.out) if args.out else common.RESULTS_DIR / f"{args.mode}-{slug}.json"
    schedule = plan_rounds(arms, args.rounds, per_round, args.warmup, args.warmup_batch)
    machine = common.machine_info()
    progress = None
    if not args.quiet:
        from tqdm import tqdm

        progress = tqdm(total=sum(len(e["batches"]) for rnd in schedule for e in rnd), unit="batch",
                        desc=f"{args.mode} {slug}", dynamic_ncols=True)
    started = time.time()
    engine_results, engine_info, rounds_log = [], {}, []
    for r, engines in enumerate(schedule):
        for engine in engines:
            tag = f"r{r}-{engine['engine']}"
            result = run_engine(engine["engine"], engine["batches"], args, model_path, ekwargs, workdir, tag, progress)
            engine_results.append(result)
            engine_info.setdefault(engine["engine"], result["engine"])
            rounds_log.append({
                "round": r, "engine": engine["engine"], "startup_s": result["engine"]["startup_s"],
                "order": [b["arm"] for b in engine["batches"] if b["timed"]],
                "wall_s": {b["arm"]: b["wall_s"] for b in result["batches"] if b["timed"]},
            })
    if progress is not None:
        progress.close()
    analysis = analyse(arms, engine_results, args)
    result = {
        "schema_version": common.SCHEMA_VERSION,
        "benchmark": "memory_bound" if memory_bound else "throughput",
        "created": common.timestamp(),
        "duration_s": time.time() - started,
        "machine": machine,
        "model": model_info,
        "config": {
            "mode": args.mode, "methods": methods, "budgets": budgets, "rounds": args.rounds,
            "requests_per_arm_per_round": per_round, "warmup_per_arm": args.warmup,
            "warmup_batch": per_round if args.warmup_batch is None else args.warmup_batch,
            "output_len": args.output_len,
            "question": args.question, "engine_kwargs": ekwargs, "kv_cache_gib": args.kv_cache_gib,
            "plain_fit": args.plain_fit if memory_bound else None,
            "encoder_timing": "wall time of embed_multimodal in the worker (benchmarks/probes.py EncoderTimer)",
        },
        "engines": engine_info,
        "rounds": rounds_log,
        **analysis,
    }
    result["machine"]["load_avg_1m_end"] = common.machine_info()["load_avg_1m_start"]
    _write_outputs(result, out, args)
    print(f"results: {out}  (logs: {workdir})")
    return result


def _count_text_tokens(model_path: Path, prompt: str) -> int:
    """Prompt tokens besides the image, from the model's tokenizer (``<image>`` expands to the image tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return len(ids) - 1  # the one image placeholder


if __name__ == "__main__":
    main()
