"""The connector trainer (``tokcomp_lab.train.connector``) and lab/benchmarks/accuracy_learned.py: presets, the
trainer's start and resume, the accuracy benchmark against transformers' own ``generate``, and the committed
results re-run from the bundled connectors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tokcomp_lab.train.connector import TOKEN_COUNTS, connector_kwargs
from vllm_tokcomp.methods.learned.io import build_connector, load_connector

DIM = 32


def test_connector_presets_give_their_token_count() -> None:
    for method in ("pixel_unshuffle", "c_abstractor", "qformer"):
        for tokens in (16, 36, 64, 144):
            assert build_connector(method, connector_kwargs(method, DIM, tokens)).output_count((24, 24)) == tokens
    with pytest.raises(ValueError, match="tokens must be one of"):
        connector_kwargs("qformer", DIM, 50)
    assert 64 in TOKEN_COUNTS and 576 not in TOKEN_COUNTS


def test_trainer_starts_at_pool_and_resumes(tmp_path: Path) -> None:
    """Step 0's validation accuracy is the registry's pool at 64 through the QA trainer's own compression path
    (``train.llava.qa_forward``, a separate forward); then a few steps move the weights and a rerun resumes."""
    from tokcomp_lab.train import connector as trainer
    from tokcomp_lab.train.llava import QAEncoder, Squeeze, answer_correct, val_batch
    from vllm_tokcomp.tiny.llava_builder import ensure_trained_model

    model_dir = ensure_trained_model()
    out = tmp_path / "run"
    common = ["--method", "pixel_unshuffle", "--model", str(model_dir), "--batch", "2", "--questions-per-image", "2",
              "--eval-images", "32", "--eval-every", "2", "--save-every", "2", "--threads", "1"]
    assert trainer.main([str(out), "--steps", "2", *common]) == 0
    spec = json.loads((out / "connector.json").read_text())
    assert [point["step"] for point in spec["validation"]] == [0, 2] and spec["steps"] == 2
    assert spec["images_seen"] == 4 and spec["tokens"] == 64 and "--method pixel_unshuffle" in spec["command"]

    model = trainer.load_frozen_model(model_dir)
    enc = QAEncoder(model_dir / "tokenizer.json")
    correct = []
    for start in (0, 16):
        batch, _ = val_batch(enc, 0, start, 16, Squeeze("pool", 64))
        correct += answer_correct(model, batch)
    assert spec["validation"][0]["acc"] == round(sum(correct) / len(correct), 3)

    loaded, _ = load_connector(out / "connector")
    assert torch.count_nonzero(loaded.inner.mlp[-1].weight) > 0  # it moved off the mean
    assert trainer.main([str(out), "--steps", "3", *common]) == 0
    resumed = json.loads((out / "connector.json").read_text())
    assert resumed["steps"] == 3 and [p["step"] for p in resumed["validation"]] == [0, 2, 3]


@pytest.mark.slow
def test_accuracy_benchmark_runs_connectors_and_matches_transformers_generate(tmp_path: Path) -> None:
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from lab.benchmarks import accuracy_learned
    from tokcomp_lab.train import connector as trainer
    from vllm_tokcomp.data.generate import main as generate
    from vllm_tokcomp.tiny.llava_builder import ensure_trained_model

    model_dir = ensure_trained_model()
    generate([str(tmp_path / "data"), "--seed", "0", "--test", "3"])
    for method in ("pixel_unshuffle", "qformer"):
        assert trainer.main([str(tmp_path / method), "--method", method, "--model", str(model_dir), "--steps", "1",
                             "--batch", "1", "--questions-per-image", "2", "--eval-images", "16", "--tokens", "16",
                             "--threads", "1"]) == 0
    out = tmp_path / "res" / "accuracy-learned"
    assert accuracy_learned.main(["--data", str(tmp_path / "data" / "test"), "--model", str(model_dir),
                                  "--connectors", str(tmp_path / "pixel_unshuffle" / "connector"),
                                  str(tmp_path / "qformer" / "connector"), "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["arms"]) == ["none", "pool@16", "pixel_unshuffle@16", "qformer@16"]
    assert report["n"] == 6 and [arm["tokens"] for arm in report["arms"].values()] == [576, 16, 16, 16]
    assert report["arms"]["qformer@16"]["steps"] == 1
    assert "vs_pool" not in report["arms"]["pool@16"] and "vs_pool" not in report["arms"]["none"]
    for name in ("pixel_unshuffle@16", "qformer@16"):
        won, lost = report["arms"][name]["vs_pool"]
        assert won - lost == round((report["arms"][name]["accuracy"] - report["arms"]["pool@16"]["accuracy"]) * 6)
    assert out.with_suffix(".md").read_text().startswith("# Learned connectors")

    # The uncompressed arm's greedy loop is transformers' own greedy decoding of the same prompt.
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    records = [json.loads(line) for line in (tmp_path / "data" / "test" / "questions.jsonl").read_text().splitlines()]
    for record, predicted in zip(records, report["arms"]["none"]["predictions"], strict=True):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        with Image.open(tmp_path / "data" / "test" / record["image"]) as image:
            inputs = processor(images=image.convert("RGB"), text=text, return_tensors="pt", add_special_tokens=False)
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert processor.tokenizer.decode(generated, skip_special_tokens=True) == predicted

    stem = tmp_path / "qformer" / "connector"
    assert list(accuracy_learned.build_arms(model_dir, [stem, stem])) == ["none", "pool@16", "qformer@16"]
    for suffix in (".json", ".safetensors"):  # the same connector under another name is a second one
        shutil.copy(stem.with_suffix(suffix), (tmp_path / "qformer" / "copy").with_suffix(suffix))
    with pytest.raises(SystemExit, match=r"--connectors\[1\]: a second qformer connector with 16 tokens"):
        accuracy_learned.build_arms(model_dir, [stem, tmp_path / "qformer" / "copy"])
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"not the weights the connector was trained on")
    with pytest.raises(SystemExit, match=r"--connectors\[0\]: .* was trained for other model weights"):
        accuracy_learned.build_arms(other, [tmp_path / "qformer" / "connector"])


def test_paired_counts_read_the_normalised_answers() -> None:
    from lab.benchmarks.accuracy_learned import paired_against

    records = [{"answer": "yes"}, {"answer": "2"}, {"answer": "red"}, {"answer": "left"}]
    assert paired_against(records, ["Yes.", "3", "red", "right"], ["no", "2", "Red", "right"]) == [1, 1]


@pytest.mark.slow
def test_committed_results_come_from_the_bundled_connectors() -> None:
    """The first questions of lab/results/accuracy-learned.json, re-run from the bundled files."""
    from lab.benchmarks import accuracy_learned
    from vllm_tokcomp.bench.accuracy import default_dataset, load_dataset
    from vllm_tokcomp.tiny.llava_builder import ensure_trained_model

    committed = json.loads(accuracy_learned.DEFAULT_OUT.with_suffix(".json").read_text())
    model_dir = ensure_trained_model()
    records = load_dataset(default_dataset(), 8)
    arms = accuracy_learned.build_arms(model_dir, accuracy_learned.bundled_connectors())
    assert set(arms) == set(committed["arms"])
    results = accuracy_learned.run(model_dir, records, arms, max_tokens=4, progress=False)
    for name, result in results.items():
        assert result["answers"] == committed["arms"][name]["predictions"][:8], name

