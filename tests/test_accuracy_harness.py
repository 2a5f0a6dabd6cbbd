"""benchmarks/accuracy.py: scoring and reports (fast), and one end-to-end run through real vLLM (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from vllm_tokcomp.bench import accuracy  # noqa: E402

RECORDS = [
    {"question": "q1", "answer": "red", "type": "color"},
    {"question": "q2", "answer": "3", "type": "count"},
    {"question": "q3", "answer": "yes", "type": "presence"},
    {"question": "q4", "answer": "no", "type": "presence"},
]


def test_score_normalises_and_splits_by_type() -> None:
    result = accuracy.score(RECORDS, [" Red.", "three", "Yes", "yes"])
    assert result["n"] == 4
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["per_type"] == {"color": 1.0, "count": 1.0, "presence": 0.5}


def test_score_splits_by_difficulty_when_the_data_labels_it() -> None:
    records = [{**r, "difficulty": d} for r, d in zip(RECORDS, ["easy", "hard", "hard", "easy"], strict=True)]
    result = accuracy.score(records, ["red", "2", "yes", "no"])
    assert result["per_difficulty"] == {"easy": 1.0, "hard": 0.5}
    assert "per_difficulty" not in accuracy.score(RECORDS, ["red", "2", "yes", "no"])


def test_majority_baseline() -> None:
    assert accuracy.majority_baseline(RECORDS) == pytest.approx(0.75)


def test_markdown_and_plot(tmp_path: Path) -> None:
    base = {"method": "none", "budget": 576, **accuracy.score(RECORDS, ["red", "3", "yes", "no"])}
    arm = {"method": "uniform", "budget": 64, **accuracy.score(RECORDS, ["red", "2", "yes", "no"]), "tokens": 64.0}
    auto = {"method": "mustdrop", "budget": "auto", "estimator": "texture", "tokens": 150.5, "tokens_min": 120,
            "tokens_max": 190, **accuracy.score(RECORDS, ["red", "3", "no", "no"])}
    report = {"model_name": "m", "data": "d", "n": 4, "budgets": [576, 64], "methods": ["uniform"],
              "baseline": base, "arms": [arm, auto], "chance": 0.5}
    text = accuracy.markdown(report)
    assert "| uniform | 1.000 (100%) | 0.750 (75%) |" in text
    assert "| none | 1.000 (100%) | – |" in text  # the uncompressed arm, labelled as such
    assert "| uniform | 64 | 64 | 0.750 | 75% |" in text
    assert "| mustdrop | texture | 150 (120–190) | 0.750 (75%) |" in text  # the adaptive table
    assert "| mustdrop | auto[texture] | 150 | 0.750 | 75% |" in text
    accuracy.plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_visual_tokens_are_prompt_length_minus_the_baselines_text() -> None:
    arms = [("none", 576, None), ("uniform", 32, None), ("mustdrop", "auto", "texture")]
    answers = [["red", "3", "yes", "no"]] * 3
    # prompts of 10, 12, 9 and 11 text tokens: uncompressed they are 576 longer
    lengths = [[586, 588, 585, 587], [42, 44, 41, 43], [110, 212, 85, 587]]
    report = accuracy.build_report("m", Path("d"), RECORDS, [576, 32], ["uniform"], arms, answers, 1.0, lengths)
    assert report["baseline"]["tokens"] == 576
    assert report["arms"][0]["tokens"] == 32 and report["arms"][0]["tokens_max"] == 32
    assert report["arms"][1]["tokens"] == (100 + 200 + 76 + 576) / 4
    assert (report["arms"][1]["tokens_min"], report["arms"][1]["tokens_max"]) == (76, 576)
    assert report["arms"][1]["estimator"] == "texture"


def test_parse_auto() -> None:
    assert accuracy.parse_auto("mustdrop:texture, tome,") == [("mustdrop", "auto", "texture"), ("tome", "auto", None)]
    assert accuracy.parse_auto("") == []
    assert accuracy.arm_kwargs(("mustdrop", "auto", "texture")) == {
        "tokcomp_method": "mustdrop", "tokcomp_budget": "auto", "tokcomp_options": {"auto_estimator": "texture"}}


def test_load_dataset_resolves_images(tmp_path: Path) -> None:
    (tmp_path / "questions.jsonl").write_text(json.dumps({"image": "a.png", "question": "q", "answer": "x"}) + "\n")
    [record] = accuracy.load_dataset(tmp_path)
    assert record["image_path"] == str(tmp_path / "a.png") and record["type"] == "all"


def harness_data_and_env(tmp_path: Path) -> dict[str, str]:
    """Two test images (4 questions) in ``tmp_path/data/test``, and the environment the harness runs vLLM in."""
    from vllm_tokcomp.data.generate import main as generate

    generate([str(tmp_path / "data"), "--seed", "0", "--test", "2"])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"), "VLLM_PLUGINS": "tokcomp", "PYTHONPATH": str(REPO_ROOT)}


@pytest.mark.slow
def test_default_dataset_is_written_once_when_processes_ask_at_once(tmp_path: Path) -> None:
    """Two processes asking for the cached test split at the same time (parallel test workers, two benchmarks)
    both get the whole split, byte-identical to a plain ``data.generate`` run, and no temporary folder is left."""
    code = ("import sys; from vllm_tokcomp.bench.accuracy import default_dataset, load_dataset; "
            "path = default_dataset(images=12); print(path, len(load_dataset(path)))")
    env = {**os.environ, "TOKCOMP_DATA_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
             for _ in range(2)]
    # the last line: the process that built the split also printed its spec
    outputs = {proc.communicate(timeout=300)[0].strip().splitlines()[-1] for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    folder = tmp_path / "cache" / "vqa-v1-seed0-test12"
    assert outputs == {f"{folder / 'test'} 24"}
    subprocess.run([sys.executable, "-m", "vllm_tokcomp.data.generate", str(tmp_path / "plain"), "--test", "12"],
                   check=True, capture_output=True, cwd=REPO_ROOT)
    plain = tmp_path / "plain"
    for name in ("spec.json", "test/questions.jsonl", "test/images/000011.png"):
        assert (folder / name).read_bytes() == (plain / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".vqa-v1-seed0-test12.lock",
                                                                       "vqa-v1-seed0-test12"]


def test_harness_end_to_end(tmp_path: Path) -> None:
    from vllm_tokcomp.tiny.llava_builder import ensure_default_model

    env = harness_data_and_env(tmp_path)
    out = tmp_path / "res" / "accuracy"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "accuracy.py"), "--data", str(tmp_path / "data" / "test"),
         "--model", str(ensure_default_model()), "--methods", "uniform,cls_topk", "--budgets", "576,32",
         "--auto", "uniform", "--out", str(out), "--no-progress"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["n"] == 4
    assert [(a["method"], a["budget"]) for a in report["arms"]] == [("uniform", 32), ("cls_topk", 32),
                                                                     ("uniform", "auto")]
    # the visual tokens read back from the prompts vLLM ran
    assert report["baseline"]["tokens"] == 576 and report["arms"][0]["tokens"] == report["arms"][1]["tokens"] == 32
    assert 1 <= report["arms"][2]["tokens_min"] <= report["arms"][2]["tokens_max"] <= 576
    assert len(report["baseline_predictions"]) == 4
    assert out.with_suffix(".md").read_text().startswith("# Accuracy vs visual tokens")
    assert out.with_suffix(".png").stat().st_size > 1000


def test_qwen_models_get_their_own_full_count_and_methods(tmp_path: Path) -> None:
    from PIL import Image

    from vllm_tokcomp.tiny import qwen2_vl_builder as qwen2_vl

    model = str(qwen2_vl.build_tiny_qwen2_vl(tmp_path / "qwen", seed=0))
    records = []
    for i, size in enumerate([(336, 336), (336, 336)]):
        Image.new("RGB", size).save(tmp_path / f"{i}.png")
        records.append({"image_path": str(tmp_path / f"{i}.png")})
    assert accuracy.full_image_tokens(model, records) == 144  # 12 x 12 merged tokens
    Image.new("RGB", (448, 224)).save(tmp_path / "wide.png")
    with pytest.raises(SystemExit, match="one size"):
        accuracy.full_image_tokens(model, [*records, {"image_path": str(tmp_path / "wide.png")}])
    methods = accuracy.methods_for(model)
    assert {"pool", "tome", "text_relevance"} <= set(methods)
    assert "cls_topk" not in methods and "mustdrop" not in methods  # Qwen's tower has no [CLS]
    assert "cls_topk" in accuracy.methods_for(str(accuracy.model_or_default(None)))


def test_bundled_model_names_resolve_like_tokcomp_serve(tmp_path: Path, monkeypatch) -> None:
    from vllm_tokcomp.cli import bundled_model_dir

    monkeypatch.setenv("TOKCOMP_MODELS_DIR", str(tmp_path))
    for name, model_type in (("tiny-qwen2-vl", "qwen2_vl"), ("tiny-qwen2.5-vl", "qwen2_5_vl")):
        model = accuracy.model_or_default(name)
        assert model == str(bundled_model_dir(name)) and accuracy.model_type(model) == model_type


@pytest.mark.slow
def test_harness_end_to_end_on_qwen(tmp_path: Path) -> None:
    from vllm_tokcomp.tiny.qwen2_vl_builder import ensure_default_model

    env = harness_data_and_env(tmp_path)
    out = tmp_path / "res" / "accuracy"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "accuracy.py"), "--data", str(tmp_path / "data" / "test"),
               "--model", str(ensure_default_model()), "--out", str(out), "--no-progress"]
    refused = subprocess.run([*command, "--methods", "cls_topk"], cwd=REPO_ROOT, env=env, capture_output=True,
                             text=True, timeout=900)
    assert refused.returncode != 0 and "not servable through vLLM on qwen2_vl: cls_topk" in refused.stderr
    proc = subprocess.run([*command, "--methods", "pool,text_relevance"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["full_tokens"] == 144 and report["budgets"] == [144, 48, 32, 16, 8, 4, 2]  # LLaVA's fractions of 576
    assert [(a["method"], a["budget"]) for a in report["arms"]] == [
        (m, b) for m in ("pool", "text_relevance") for b in (48, 32, 16, 8, 4, 2)]
    assert report["baseline"]["tokens"] == 144
    assert [a["tokens"] for a in report["arms"]] == [48, 32, 16, 8, 4, 2] * 2  # read back from the prompts vLLM ran


@pytest.mark.slow
def test_harness_end_to_end_on_qwen_videos(tmp_path: Path) -> None:
    from vllm_tokcomp.data.generate import main as generate
    from vllm_tokcomp.tiny.qwen2_vl_builder import ensure_default_model

    env = harness_data_and_env(tmp_path)
    generate([str(tmp_path / "clips"), "--videos", "--frames", "4", "--test", "2"])
    model = str(ensure_default_model())
    records = accuracy.load_dataset(tmp_path / "clips" / "test")
    assert accuracy.full_image_tokens(model, records) == 2 * 12 * 12  # 4 frames: 2 temporal slices of 12 x 12
    out = tmp_path / "res" / "accuracy"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "accuracy.py"), "--data",
                           str(tmp_path / "clips" / "test"), "--model", model, "--methods", "pool,tome",
                           "--budgets", "96,16", "--out", str(out), "--no-progress"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["n"] == len(records) == 4 and report["full_tokens"] == 288
    assert report["baseline"]["tokens"] == 288
    assert [(a["method"], a["budget"], a["tokens"]) for a in report["arms"]] == [
        ("pool", 96, 96), ("pool", 16, 16), ("tome", 96, 96), ("tome", 16, 16)]  # read back from vLLM's prompts
    with pytest.raises(SystemExit, match="need a Qwen model"):
        from vllm_tokcomp.tiny.llava_builder import ensure_default_model as llava_model

        accuracy.full_image_tokens(str(llava_model()), records)




def transformers_answers(model: str, records: list[dict], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers of transformers' own model class for ``records`` (fp32, the chat template and processor the
    model folder ships): an implementation independent of vLLM and the plugin."""
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor, LlavaOnevisionForConditionalGeneration
    from transformers import Qwen3VLForConditionalGeneration as Qwen3VL

    model_class = {"llava_onevision": LlavaOnevisionForConditionalGeneration, "qwen3_vl": Qwen3VL}[
        AutoConfig.from_pretrained(model).model_type]
    processor = AutoProcessor.from_pretrained(model)
    network = model_class.from_pretrained(model, dtype=torch.float32).eval()
    answers = []
    for record in records:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        with Image.open(record["image_path"]) as image:
            inputs = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            out = network.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


@pytest.mark.slow
@pytest.mark.parametrize(("name", "model_type", "full"), [("tiny-llava-onevision-vqa", "llava_onevision", 1176),
                                                          ("tiny-qwen3-vl-vqa", "qwen3_vl", 144)])
def test_harness_end_to_end_on_the_trained_new_families(tmp_path: Path, monkeypatch, name: str, model_type: str,
                                                        full: int) -> None:
    from vllm_tokcomp.data.spec import normalize_answer

    monkeypatch.setenv("TOKCOMP_MODELS_DIR", str(tmp_path / "models"))
    env = harness_data_and_env(tmp_path)
    out = tmp_path / "res" / "accuracy"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "accuracy.py"), "--data",
                           str(tmp_path / "data" / "test"), "--model", name, "--methods", "pool,divprune",
                           "--budgets", "64,8", "--out", str(out), "--no-progress"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["full_tokens"] == full and report["baseline"]["tokens"] == full
    assert [(a["method"], a["budget"], a["tokens"]) for a in report["arms"]] == [
        (m, b, b) for m in ("pool", "divprune") for b in (64, 8)]  # read back from the prompts vLLM ran
    # the uncompressed arm through vLLM + the plugin answers as transformers does with the same weights
    model = accuracy.model_or_default(name)  # the folder the harness built (same models dir)
    assert accuracy.model_type(model) == model_type and model.startswith(str(tmp_path / "models"))
    records = accuracy.load_dataset(tmp_path / "data" / "test")
    expected = [normalize_answer(a) for a in transformers_answers(model, records)]
    served = [normalize_answer(p["prediction"]) for p in report["baseline_predictions"]]
    assert sum(e == s for e, s in zip(expected, served, strict=True)) >= len(records) - 1, (expected, served)
