"""The benchmarks (benchmarks/): a smoke run on real vLLM plus unit tests of planning, analysis and reporting.

The slow test runs ``benchmarks/throughput.py`` exactly as a user does, on the tiny model with
every arm (plain vLLM, plugin off, 2 methods x 2 budgets), and checks the JSON schema and the KV
arithmetic read from inside the engine. Nothing here asserts anything about wall-clock time.
"""

import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from vllm_tokcomp.bench import common, report
from vllm_tokcomp.bench.models import SHAPES, flops
from vllm_tokcomp.bench.throughput import analyse, plan_rounds

REPO = Path(__file__).resolve().parents[1]
METHODS = ("tome", "mustdrop[stage2=false]")  # a method variant with knobs, as the throughput runs measure
BUDGETS = (64, 32)
OUTPUT_LEN = 4
BLOCK = 32  # vLLM's CPU attention needs a multiple of 32; 16 would be the CUDA default


# --- smoke run on real vLLM -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "throughput-tiny.json"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm-cache")),
        "PYTHONPATH": str(REPO),
    }
    cmd = [
        sys.executable, "benchmarks/throughput.py", "--model", "tiny", "--methods", ",".join(METHODS),
        "--budgets", ",".join(map(str, BUDGETS)), "--rounds", "1", "--num-requests", "2", "--warmup", "1",
        "--output-len", str(OUTPUT_LEN), "--block-size", str(BLOCK), "--kv-cache-gib", "1", "--max-model-len", "1024",
        "--out", str(out), "--workdir", str(tmp_path_factory.mktemp("work")), "--quiet",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out, json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_json_schema(smoke):
    path, result = smoke
    assert result["schema_version"] == common.SCHEMA_VERSION
    assert result["benchmark"] == "throughput"
    for key in ("created", "machine", "model", "config", "engines", "rounds", "text_tokens", "arms", "goals"):
        assert key in result, key
    assert set(result["machine"]["versions"]) >= {"vllm", "torch", "vllm_tokcomp"}
    assert result["config"]["methods"] == list(METHODS) and result["config"]["budgets"] == list(BUDGETS)
    assert set(result["engines"]) == {"plain", "plugin"}
    assert result["engines"]["plain"]["model_class"] == "LlavaForConditionalGeneration"
    assert result["engines"]["plugin"]["model_class"] == "CompressedLlava"
    names = [a["name"] for a in result["arms"]]
    assert names == ["plain", "off"] + [f"{m}@{b}" for m in METHODS for b in BUDGETS]
    for arm in result["arms"]:
        assert arm["requests"] == 2
        assert arm["output_tokens"] == [OUTPUT_LEN]
        for key in ("requests_per_s", "output_tokens_per_s", "wall_s"):
            assert isinstance(arm[key], float) and arm[key] > 0, (arm["name"], key)
        for key in ("encoder_s", "lm_prefill_s", "decode_s", "other_s", "encoder_share", "compression_share"):
            assert isinstance(arm["time"][key], float), (arm["name"], key)
        assert arm["time"]["encoder_items"] == 2  # one image per request, each through the encoder once
        assert arm["steps"]["max_running"] >= 1
        assert {"ttft_engine", "prefill", "decode", "e2e_engine"} <= set(arm["latency_s"])
        if arm["name"] != "plain":
            assert {"amdahl_requests_per_s", "achieved_of_amdahl", "encoder_share"} <= set(arm["bounds"])
        compressing = arm["method"] is not None
        assert (arm["time"]["compression_ms_per_image"] is not None) == compressing
    markdown = report.render(result)
    assert "| tome@32 |" in markdown and "Amdahl" in markdown
    assert path.with_suffix(".png").stat().st_size > 0
    assert path.with_suffix(".md").read_text() == markdown


@pytest.mark.slow
def test_smoke_kv_blocks_are_exactly_text_plus_budget(smoke):
    """Blocks read from the engine: ceil((prompt + out - 1) / block) with prompt = text + budget, per request."""
    _, result = smoke
    text = result["text_tokens"]
    assert result["engines"]["plugin"]["block_size"] == BLOCK
    plain_blocks = None
    for arm in result["arms"]:
        image = 576 if arm["budget"] is None else min(arm["budget"], 576)
        assert arm["prompt_tokens"] == [text + image], arm["name"]
        records = arm["kv"]["per_request"]
        assert len(records) == arm["requests"]
        for record in records:
            assert record["block_size"] == BLOCK
            assert record["prompt_tokens"] == text + image
            assert record["output_tokens"] == OUTPUT_LEN
            assert record["max_blocks"] == math.ceil((text + image + OUTPUT_LEN - 1) / BLOCK), arm["name"]
        assert arm["kv"]["exact"] is True
        if arm["name"] == "plain":
            plain_blocks = records[0]["max_blocks"]
        elif arm["method"] is not None:
            assert records[0]["max_blocks"] < plain_blocks
    assert result["goals"]["kv_blocks_exact"]["met"] is True


# --- fast unit tests ------------------------------------------------------------------------------------
def test_method_variants_carry_their_knobs_to_the_request():
    assert common.parse_list("tome,mustdrop[stage2=false,threshold=0.9],uniform") == [
        "tome", "mustdrop[stage2=false,threshold=0.9]", "uniform"]
    assert common.parse_method("mustdrop[stage2=false,threshold=0.9]") == ("mustdrop", {"stage2": False,
                                                                                       "threshold": 0.9})
    assert common.parse_method("tome") == ("tome", {})
    arms = common.make_arms(["mustdrop[stage2=false]"], [64], plain=False, off=False)
    assert [a.name for a in arms] == ["mustdrop[stage2=false]@64"]
    assert arms[0].mm_kwargs() == {"tokcomp_method": "mustdrop", "tokcomp_budget": 64,
                                   "tokcomp_options": {"stage2": False}}
    assert common.Arm.from_dict(arms[0].to_dict()) == arms[0]
    assert common.make_arms(["tome"], [8], plain=False, off=False)[0].mm_kwargs() == {
        "tokcomp_method": "tome", "tokcomp_budget": 8}
    with pytest.raises(SystemExit, match="stage9"):
        common.check_methods(["mustdrop[stage9=true]"])
    with pytest.raises(SystemExit, match="not servable"):
        common.check_methods(["bogus[x=1]"])


def test_plan_rounds_alternates_engines_and_rotates_arms():
    arms = common.make_arms(["tome"], [64, 32])
    plan = plan_rounds(arms, rounds=3, per_round=2, warmup=1)
    assert [[e["engine"] for e in rnd] for rnd in plan] == [["plain", "plugin"], ["plugin", "plain"],
                                                            ["plain", "plugin"]]
    orders = []
    for rnd in plan:
        plugin = next(e for e in rnd if e["engine"] == "plugin")
        timed = [b for b in plugin["batches"] if b["timed"]]
        orders.append([b["arm"] for b in timed])
        assert all(b["seeds"] == timed[0]["seeds"] for b in timed)  # same images for every arm in a round
        warm = [b for b in plugin["batches"] if not b["timed"]]
        assert not set(s for b in warm for s in b["seeds"]) & set(timed[0]["seeds"])
        assert warm[0]["arm"] == "off" and len(warm[0]["seeds"]) == 2  # full batch of the largest arm first
        assert plugin["batches"].index(timed[0]) == len(warm)
    assert orders == [["off", "tome@64", "tome@32"], ["tome@64", "tome@32", "off"], ["tome@32", "off", "tome@64"]]
    assert plan[0][1]["batches"][-1]["mm_kwargs"] == {"tokcomp_method": "tome", "tokcomp_budget": 32}
    assert plan[0][0]["batches"][-1]["mm_kwargs"] is None


def _batch(arm, prompt, wall, enc, *, blocks, out=4, method_s=0.0, round_=0):
    requests = [{"prompt_tokens": prompt, "output_tokens": out, "queued_ts": 0.0, "scheduled_ts": 0.0,
                 "first_token_ts": 0.1, "last_token_ts": 0.2, "num_preemptions": 0}] * 2
    return {
        "arm": arm, "round": round_, "timed": True, "wall_s": wall, "requests": requests,
        "kv": [{"prompt_tokens": prompt, "output_tokens": out, "max_blocks": blocks, "block_size": 16}] * 2,
        "steps": [
            {"prefill_tokens": 2 * prompt, "decode_tokens": 0, "encoder_items": 2, "running": 2, "waiting": 0,
             "preempted": 0, "kv_usage": 0.1, "exec_s": wall * 0.8},
            {"prefill_tokens": 0, "decode_tokens": 2, "encoder_items": 0, "running": 2, "waiting": 0,
             "preempted": 0, "kv_usage": 0.1, "exec_s": wall * 0.1},
        ],
        "encoder": {"encoder_calls": 1, "encoder_items": 2, "encoder_s": enc, "method_calls": 2 if method_s else 0,
                    "method_s": method_s, "text_signals_s": 0.0},
    }


def test_analysis_bounds_and_goals_from_synthetic_batches():
    text = 40
    arms = common.make_arms(["tome"], [64])
    batches = [
        _batch("plain", text + 576, 10.0, 1.0, blocks=math.ceil((text + 576 + 3) / 16)),
        _batch("plain", text + 576, 11.0, 1.0, blocks=math.ceil((text + 576 + 3) / 16), round_=1),
        _batch("off", text + 576, 10.5, 1.0, blocks=math.ceil((text + 576 + 3) / 16)),
        _batch("off", text + 576, 10.4, 1.0, blocks=math.ceil((text + 576 + 3) / 16), round_=1),
        _batch("tome@64", text + 64, 2.0, 1.0, blocks=math.ceil((text + 64 + 3) / 16), method_s=0.01),
        _batch("tome@64", text + 64, 2.0, 1.0, blocks=math.ceil((text + 64 + 3) / 16), method_s=0.01, round_=1),
    ]
    args = Namespace(output_len=4, mode="throughput", max_num_seqs=256)
    result = analyse(arms, [{"batches": batches}], args)
    assert result["text_tokens"] == text
    rows = {a["name"]: a for a in result["arms"]}
    plain, tome = rows["plain"], rows["tome@64"]
    assert plain["requests_per_s"] == pytest.approx(4 / 21.0)
    share = 2.0 / 21.0
    ratio = (text + 64) / (text + 576)
    assert tome["bounds"]["encoder_share"] == pytest.approx(share)
    assert tome["bounds"]["amdahl_requests_per_s"] == pytest.approx(4 / 21.0 / (share + (1 - share) * ratio))
    assert tome["bounds"]["achieved_of_amdahl"] == pytest.approx(1.0 / tome["bounds"]["amdahl_requests_per_s"])
    assert tome["time"]["compression_share"] == pytest.approx(0.02 / 4.0)
    assert result["goals"]["kv_blocks_exact"]["met"] is True
    assert result["goals"]["off_within_noise"]["met"] is True
    assert "tome@64" in result["goals"]["budget64_vs_amdahl"]
    # A wrong block count is caught.
    batches[4]["kv"] = [{**batches[4]["kv"][0], "max_blocks": 99}] * 2
    again = analyse(arms, [{"batches": batches}], args)
    assert again["goals"]["kv_blocks_exact"]["met"] is False
    # No compression timing recorded (the Qwen integration has no timer): "not measured", never a passed 0 %.
    for batch in batches[4:]:
        batch["encoder"] = {**batch["encoder"], "method_calls": 0, "method_s": 0.0}
    untimed = analyse(arms, [{"batches": batches}], args)
    goal = untimed["goals"]["budget64_vs_amdahl"]["tome@64"]
    assert goal["compression_share"] is None and goal["compression_met"] is None
    assert "compression not measured" in report.goals_markdown({**untimed, "model": {}})


def test_memory_bound_goal_uses_max_running_from_the_engine():
    text = 40
    arms = common.make_arms(["tome"], [64], off=False)
    plain = _batch("plain", text + 576, 10.0, 1.0, blocks=40)
    tome = _batch("tome@64", text + 64, 2.0, 1.0, blocks=7)
    for step in plain["steps"]:
        step["running"] = 4
    for step in tome["steps"]:
        step["running"] = 27
    args = Namespace(output_len=4, mode="memory-bound", max_num_seqs=256)
    goal = analyse(arms, [{"batches": [plain, tome]}], args)["goals"]["memory_bound_concurrency"]
    target = 0.95 * (text + 576) / (text + 64) * 4
    assert goal["detail"]["tome@64"]["target"] == pytest.approx(target)
    assert goal["met"] is (27 >= target)


def test_serving_rows_slo_and_mixed_stream():
    from vllm_tokcomp.bench.serving import default_slo, level_row, mixed_summary

    def rec(start, ttft, tpot, budget=None, prompt=100, out=4):
        end = start + ttft + tpot * (out - 1)
        return {"ok": True, "start": start, "end": end, "e2e": end - start, "ttft": ttft, "tpot": tpot,
                "itl": [tpot] * (out - 1), "prompt_tokens": prompt, "output_tokens": out, "budget": budget}

    plain = [rec(0.0, 0.1, 0.01, prompt=616), rec(0.0, 0.3, 0.01, prompt=616)]
    levels = {("plain", "c=1"): plain}
    args = Namespace(slo_ttft_ms=None, slo_tpot_ms=None)
    slo = default_slo(levels, args, ["c=1"])
    assert slo["ttft_ms"] == pytest.approx(400.0) and slo["tpot_ms"] == pytest.approx(20.0)
    row = level_row(common.Arm("plain"), "c=1", plain + [{"ok": False, "error": "boom", "budget": None}], slo)
    assert row["completed"] == 2 and row["errors"] == ["boom"]
    later = [{**rec(100.0, 0.1, 0.01, prompt=616), "round": 1}]  # a second round: its idle gap is not counted
    assert level_row(common.Arm("plain"), "c=1", plain + later, slo)["duration_s"] == pytest.approx(0.33 + 0.13)
    assert row["goodput_requests_per_s"] == pytest.approx(2 / row["duration_s"])
    assert row["latency_ms"]["ttft"]["median"] == pytest.approx(200.0)
    mixed = [rec(0, 0.1, 0.01, budget=64, prompt=104), rec(0, 0.1, 0.01, budget=576, prompt=616)]
    kv = [{"prompt_tokens": 104, "output_tokens": 4, "max_blocks": 7, "block_size": 16},
          {"prompt_tokens": 616, "output_tokens": 4, "max_blocks": 39, "block_size": 16}]
    summary = mixed_summary(mixed, kv, 40, "tome", "c=2")
    assert summary["prompt_tokens_exact"] and summary["kv_blocks_exact"]
    kv[0]["max_blocks"] = 8
    assert not mixed_summary(mixed, kv, 40, "tome", "c=2")["kv_blocks_exact"]
    # a Qwen image of 1024 tokens: the budget above it keeps the whole image, 40 + 1024 prompt tokens
    qwen = [rec(0, 0.1, 0.01, budget=2048, prompt=1064), rec(0, 0.1, 0.01, budget=114, prompt=154)]
    assert mixed_summary(qwen, [], 40, "pool", "c=2", full=1024)["prompt_tokens_exact"]
    assert not mixed_summary(qwen, [], 40, "pool", "c=2")["prompt_tokens_exact"]  # LLaVA's 576 would cap it
    from vllm_tokcomp.bench.serving import default_mixed_budgets

    assert default_mixed_budgets(576) == [576, 192, 64, 32] and default_mixed_budgets(1024) == [1024, 341, 114, 57]


def test_model_shapes_have_llava_proportions():
    assert flops(SHAPES["llava-1.5-7b"])["encoder_over_lm_prefill"] == pytest.approx(0.046, abs=0.003)
    assert 0.035 <= flops(SHAPES["llava-proportioned"])["encoder_over_lm_prefill"] <= 0.055
    small = SHAPES["llava-proportioned"]
    assert small.text_hidden // small.text_heads == small.vision_hidden // small.vision_heads == 64
    assert small.text_hidden == 4 * small.vision_hidden  # LLaVA-1.5's 4096 : 1024


def test_written_7b_config_has_the_llava_15_7b_architecture():
    from vllm_tokcomp.bench.models import resolve_model

    path, load_format, info = resolve_model("llava-1.5-7b")
    assert load_format == "dummy"
    config = json.loads((path / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (4096, 32, 32)
    assert (text["intermediate_size"], text["vocab_size"]) == (11008, 32064)
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["intermediate_size"]) == (1024, 24, 4096)
    assert (vision["image_size"], vision["patch_size"], config["vision_feature_layer"]) == (336, 14, -2)
    assert (path / "tokenizer.json").is_file() and (path / "processor_config.json").is_file()
    assert not (path / "model.safetensors").exists()


def test_report_section_replaces_only_the_marked_block(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nhand-written\n")
    report.write_section(doc, "table v1\n")
    report.write_section(doc, "table v2\n")
    text = doc.read_text()
    assert text.startswith("# Title\n\nhand-written\n")
    assert "table v2" in text and "table v1" not in text
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1


def test_report_renders_committed_results():
    rendered = report.results_markdown(common.RESULTS_DIR)
    assert rendered.startswith("## Results")
    for path, data in report.load_results(common.RESULTS_DIR):
        assert data["schema_version"] == common.SCHEMA_VERSION, path
    assert common.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)


def test_models_know_their_image_tokens_and_prompt():
    from vllm_tokcomp.bench import models

    llava, _, llava_info = models.resolve_model("tiny")
    qwen, _, qwen_info = models.resolve_model("tiny-qwen2-vl")
    assert llava_info["image_tokens"] == 576 and llava_info["family"] == "llava"
    assert qwen_info["image_tokens"] == 144 and qwen_info["family"] == "qwen2_vl"  # 336 px -> 12 x 12 merged
    assert models.image_prompt(llava, "Q?") == common.llava_prompt("Q?")
    prompt = models.image_prompt(qwen, "What is it?")
    assert prompt.count("<|image_pad|>") == 1 and "What is it?" in prompt
    assert models.mm_limits(qwen) == {"image": 1, "video": 0} and models.mm_limits(llava) == {"image": 1}


def test_qwen_presets_have_qwen2_5_vl_7b_architecture_and_proportions():
    from transformers import AutoConfig, AutoProcessor

    from vllm_tokcomp.bench.models import QWEN_SHAPES, qwen_flops, resolve_model

    path, load_format, info = resolve_model("qwen2.5-vl-7b")
    config = AutoConfig.from_pretrained(path)  # transformers reads it as a Qwen2.5-VL config
    text, vision = config.text_config, config.vision_config
    assert (config.model_type, load_format) == ("qwen2_5_vl", "dummy") and not (path / "model.safetensors").exists()
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        3584, 28, 28, 4)
    assert (text.intermediate_size, text.vocab_size, text.rope_parameters["mrope_section"]) == (18944, 152064,
                                                                                                  [16, 24, 24])
    assert (vision.hidden_size, vision.depth, vision.intermediate_size) == (1280, 32, 3420)
    assert vision.out_hidden_size == 3584
    assert (vision.fullatt_block_indexes, vision.window_size) == ([7, 15, 23, 31], 112)
    # the benchmark image goes through the real processor whole: 896 px = 32 x 32 merged tokens
    assert info["image_size"] == 896 and info["image_tokens"] == 1024 and info["family"] == "qwen2_vl"
    small, _, small_info = resolve_model("qwen2.5-vl-proportioned")
    assert small_info["image_tokens"] == 1024
    assert AutoProcessor.from_pretrained(small).image_processor.merge_size == 2
    head_dims = {QWEN_SHAPES["qwen2.5-vl-proportioned"].text_hidden // 16, 320 // 5}
    assert head_dims == {64}  # what vLLM's CPU attention supports
    ratio_7b = qwen_flops(QWEN_SHAPES["qwen2.5-vl-7b"])["encoder_over_lm_prefill"]
    ratio_small = small_info["flops_per_request"]["encoder_over_lm_prefill"]
    assert 0.3 < ratio_7b < 0.5 and abs(ratio_small - ratio_7b) < 0.03


def test_output_files_keep_dots_in_the_stem(tmp_path):
    stem = tmp_path / "accuracy-qwen2.5-vl"
    assert common.output_file(stem, ".json").name == "accuracy-qwen2.5-vl.json"
    assert common.output_file(tmp_path / "accuracy.json", ".md").name == "accuracy.md"
    assert common.output_file(tmp_path / "accuracy", ".png").name == "accuracy.png"
