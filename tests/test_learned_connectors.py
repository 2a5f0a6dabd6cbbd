"""Learned connectors: the mean-residual start, save/load, the trainer and the accuracy benchmark.

The plain references below (block means, raster-chunk means, transformers' own ``generate``) are written
independently of the code under test.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from vllm_tokcomp.methods import VisualTokens
from vllm_tokcomp.methods.learned.io import build_connector, load_connector, save_connector
from vllm_tokcomp.methods.learned.residual import MeanResidual
from vllm_tokcomp.train.connector import TOKEN_COUNTS, connector_kwargs

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DIM = 32


def block_means(x: torch.Tensor, side: int, block: int) -> torch.Tensor:
    """Raster-ordered means of ``block x block`` squares of a ``side x side`` grid of rows of ``x``."""
    cells = side // block
    return x.reshape(cells, block, cells, block, -1).mean(dim=(1, 3)).reshape(cells * cells, -1)


@pytest.mark.parametrize("tokens", [16, 64])
@pytest.mark.parametrize("method", ["pixel_unshuffle", "c_abstractor"])
def test_grid_connectors_start_at_block_means(method: str, tokens: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(576, DIM)
    connector = build_connector(method, connector_kwargs(method, DIM, tokens)).start_at_mean()
    out = connector(VisualTokens(x, (24, 24)))
    torch.testing.assert_close(out.features, block_means(x, 24, 24 // int(tokens**0.5)), atol=1e-5, rtol=1e-5)
    assert out.sizes.tolist() == [576 // tokens] * tokens


def test_qformer_starts_at_raster_chunk_means() -> None:
    torch.manual_seed(0)
    x = torch.randn(576, DIM)
    connector = build_connector("qformer", connector_kwargs("qformer", DIM, 64)).start_at_mean()
    torch.testing.assert_close(connector(VisualTokens(x, (24, 24))).features, x.reshape(64, 9, DIM).mean(1),
                               atol=1e-5, rtol=1e-5)


def test_zeroed_output_layer_still_learns() -> None:
    """The start is the mean, but the gradient reaches the zeroed layer, so training moves away from it."""
    torch.manual_seed(0)
    connector = build_connector("pixel_unshuffle", connector_kwargs("pixel_unshuffle", DIM, 64)).start_at_mean()
    connector(VisualTokens(torch.randn(576, DIM), (24, 24))).features.pow(2).sum().backward()
    last = connector.inner.mlp[-1]
    assert torch.count_nonzero(last.weight) == 0 and last.weight.grad.abs().sum() > 0


def test_connector_presets_give_their_token_count() -> None:
    for method in ("pixel_unshuffle", "c_abstractor", "qformer"):
        for tokens in (16, 36, 64, 144):
            assert build_connector(method, connector_kwargs(method, DIM, tokens)).output_count((24, 24)) == tokens
    with pytest.raises(ValueError, match="tokens must be one of"):
        connector_kwargs("qformer", DIM, 50)
    assert 64 in TOKEN_COUNTS and 576 not in TOKEN_COUNTS


def test_save_and_load_round_trip_in_bf16(tmp_path: Path) -> None:
    torch.manual_seed(0)
    kwargs = connector_kwargs("c_abstractor", DIM, 16)
    connector = build_connector("c_abstractor", kwargs)
    spec = {"method": "c_abstractor", "kwargs": kwargs, "mean_residual": True, "tokens": 16, "steps": 7}
    save_connector(connector, spec, tmp_path / "conn")
    loaded, loaded_spec = load_connector(tmp_path / "conn")
    assert isinstance(loaded, MeanResidual) and loaded_spec == spec and not loaded.training
    for key, value in connector.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16).float()), key
    with pytest.raises(ValueError, match="'kwargs'"):
        save_connector(connector, {"method": "c_abstractor", "mean_residual": True}, tmp_path / "bad")
    with pytest.raises(ValueError, match="unknown learned compressor 'resampler'"):
        build_connector("resampler", {})


def test_trainer_starts_at_pool_and_resumes(tmp_path: Path) -> None:
    """Step 0's validation accuracy is the registry's pool at 64 through the QA trainer's own compression path
    (``train.llava.qa_forward``, a separate forward); then a few steps move the weights and a rerun resumes."""
    from vllm_tokcomp.tiny.llava import ensure_trained_model
    from vllm_tokcomp.train import connector as trainer
    from vllm_tokcomp.train.llava import QAEncoder, Squeeze, answer_correct, val_batch

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

    from benchmarks import accuracy_learned
    from vllm_tokcomp.data.generate import main as generate
    from vllm_tokcomp.tiny.llava import ensure_trained_model
    from vllm_tokcomp.train import connector as trainer

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
    from benchmarks.accuracy_learned import paired_against

    records = [{"answer": "yes"}, {"answer": "2"}, {"answer": "red"}, {"answer": "left"}]
    assert paired_against(records, ["Yes.", "3", "red", "right"], ["no", "2", "Red", "right"]) == [1, 1]


def test_bundled_connectors_load_for_the_bundled_model() -> None:
    import hashlib

    from benchmarks.accuracy_learned import bundled_connectors
    from vllm_tokcomp.tiny.llava import ensure_trained_model

    stems = bundled_connectors()
    assert {stem.name for stem in stems} == {"pixel_unshuffle-16", "c_abstractor-16", "qformer-16",
                                             "pixel_unshuffle-64", "c_abstractor-64", "qformer-64"}
    digest = hashlib.sha256((ensure_trained_model() / "model.safetensors").read_bytes()).hexdigest()
    for stem in stems:
        module, spec = load_connector(stem)
        tokens = int(stem.name.rsplit("-", 1)[1])
        assert spec["model_weights_sha256"] == digest and spec["tokens"] == tokens and spec["method"] in stem.name
        assert module.output_count((24, 24)) == tokens and spec["steps"] > 0


@pytest.mark.slow
def test_committed_results_come_from_the_bundled_connectors() -> None:
    """The first questions of benchmarks/results/accuracy-learned.json, re-run from the bundled files."""
    from benchmarks import accuracy_learned
    from vllm_tokcomp.bench.accuracy import default_dataset, load_dataset
    from vllm_tokcomp.tiny.llava import ensure_trained_model

    committed = json.loads(accuracy_learned.DEFAULT_OUT.with_suffix(".json").read_text())
    model_dir = ensure_trained_model()
    records = load_dataset(default_dataset(), 8)
    arms = accuracy_learned.build_arms(model_dir, accuracy_learned.bundled_connectors())
    assert set(arms) == set(committed["arms"])
    results = accuracy_learned.run(model_dir, records, arms, max_tokens=4, progress=False)
    for name, result in results.items():
        assert result["answers"] == committed["arms"][name]["predictions"][:8], name
