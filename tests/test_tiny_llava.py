"""Tests for the tiny LLaVA-1.5-shaped model builder (vllm_tokcomp.tiny.llava_builder).

Fast tests build the model into a temporary directory and check it with transformers.
``@pytest.mark.slow`` tests start a real vLLM engine (in a subprocess, plugins off) and
compare its prompts and greedy outputs with transformers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the package need not be installed to run the tests
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from PIL import Image  # noqa: E402

from vllm_tokcomp.tiny import llava_builder as tiny  # noqa: E402

QUESTION = "What is in the image?"
MAX_TOKENS = 16


# ----------------------------------------------------------------------------- helpers
def make_images() -> list[Image.Image]:
    """Three deterministic test images: two noise images of different sizes, one solid red."""
    images = []
    for seed, (height, width) in ((0, (300, 400)), (1, (420, 336))):
        generator = torch.Generator().manual_seed(seed)
        pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8)
        images.append(Image.fromarray(pixels.numpy()))
    images.append(Image.new("RGB", (336, 336), (220, 30, 30)))
    return images


def image_conversation(image, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def multi_turn_conversation(image) -> list[dict]:
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "There is a red circle in the center."},
        {"role": "user", "content": [{"type": "text", "text": "How many circles are there?"}]},
    ]


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.build_tiny_llava(tmp_path_factory.mktemp("tiny") / "tiny-llava", seed=0)


@pytest.fixture(scope="module")
def processor(model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def hf_inputs(processor, conversation):
    return processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


# ----------------------------------------------------------------------------- fast tests
def test_model_dir_layout_and_config(model_dir):
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == sorted(
        [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "processor_config.json",
            "tokcomp_tiny.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    assert tiny.is_complete_model_dir(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["dtype"] == "bfloat16"
    assert config["image_token_index"] == tiny.IMAGE_TOKEN_ID
    assert config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default"
    assert config["projector_hidden_act"] == "gelu"
    vision, text = config["vision_config"], config["text_config"]
    assert (vision["image_size"], vision["patch_size"], vision["hidden_size"]) == (336, 14, 64)
    assert (vision["num_attention_heads"], vision["num_hidden_layers"], vision["intermediate_size"]) == (2, 3, 256)
    assert (text["hidden_size"], text["num_attention_heads"], text["head_dim"]) == (256, 4, 64)
    assert (text["num_hidden_layers"], text["intermediate_size"], text["vocab_size"]) == (2, 512, 2048)
    assert text["max_position_embeddings"] == 4096
    assert text["tie_word_embeddings"] is False and config["tie_word_embeddings"] is False
    assert text["rope_parameters"]["rope_type"] == "default"
    processor_config = json.loads((model_dir / "processor_config.json").read_text())
    assert processor_config["patch_size"] == 14
    assert processor_config["num_additional_image_tokens"] == 1
    assert processor_config["vision_feature_select_strategy"] == "default"
    assert processor_config["image_token"] == "<image>"


def test_checkpoint_uses_llava_hf_names(model_dir):
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as handle:
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
        dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118
    assert shapes == tiny.checkpoint_shapes()
    assert dtypes == {"BF16"}
    # vLLM's LLaVA needs the CLIP tower under vision_tower.vision_model.*
    assert not [n for n in shapes if n.startswith("vision_tower.") and not n.startswith("vision_tower.vision_model.")]
    assert shapes["vision_tower.vision_model.embeddings.position_embedding.weight"] == (577, 64)


def test_tokenizer(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == 2048
    assert tokenizer.is_fast
    expected = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4}
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in expected} == expected
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    # <image> is one token, also glued to text; BOS is never added implicitly.
    ids = tokenizer("USER: <image>\nWhat is in the image?").input_ids
    assert ids.count(tiny.IMAGE_TOKEN_ID) == 1 and ids[0] != tokenizer.bos_token_id
    assert tokenizer("x<image>y", add_special_tokens=True).input_ids.count(tiny.IMAGE_TOKEN_ID) == 1
    sentence = "There are 3 red circles and a small blue square in the top left corner."
    encoded = tokenizer(sentence).input_ids
    assert len(encoded) < len(sentence) // 3  # a real BPE, not characters
    assert tokenizer.decode(encoded) == sentence
    assert tokenizer.decode(tokenizer("Zebra 1234 ünïcode ✓").input_ids) == "Zebra 1234 ünïcode ✓"


def test_chat_template_rendering(model_dir):
    import jinja2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template == tiny.CHAT_TEMPLATE
    assert (model_dir / "chat_template.jinja").read_text() == tiny.CHAT_TEMPLATE

    def render(messages, **kwargs):
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    expected = "<s>USER: <image>\nWhat is in the image? ASSISTANT:"
    assert render(parts, add_generation_prompt=True) == expected
    assert render(parts) == expected[: -len("ASSISTANT:")]
    # What vLLM sends for the "string" content format: placeholder + "\n" + text.
    string = [{"role": "user", "content": "<image>\n" + QUESTION}]
    assert render(string, add_generation_prompt=True) == expected
    # Images are always rendered first, text parts joined by "\n" (as vLLM's string format).
    text_first = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]}]
    assert render(text_first, add_generation_prompt=True) == expected
    two_texts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render(two_texts, add_generation_prompt=True) == "<s>USER: a\nb ASSISTANT:"
    conversation = multi_turn_conversation(None)
    assert render(conversation, add_generation_prompt=True) == (
        "<s>You are a helpful assistant. USER: <image>\nWhat is in the image? "
        "ASSISTANT: There is a red circle in the center.</s>USER: How many circles are there? ASSISTANT:"
    )
    # Whitespace control on every tag: same output with or without trim_blocks/lstrip_blocks.
    for env in (jinja2.Environment(), jinja2.Environment(trim_blocks=True, lstrip_blocks=True)):
        rendered = env.from_string(tiny.CHAT_TEMPLATE).render(
            messages=parts, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
        )
        assert rendered == expected
    with pytest.raises(Exception, match="Unsupported role"):
        render([{"role": "tool", "content": "x"}])


def test_vllm_detects_openai_content_format():
    pytest.importorskip("vllm")
    from vllm.renderers.hf import _detect_content_format

    assert _detect_content_format(tiny.CHAT_TEMPLATE, default="string") == "openai"


def test_transformers_forward(model_dir, processor, hf_model):
    from safetensors.torch import load_file

    # transformers maps the llava-hf names back onto its modules.
    saved = load_file(str(model_dir / "model.safetensors"))
    loaded = {tiny.normalize_checkpoint_key(k): v for k, v in hf_model.state_dict().items()}
    assert set(saved) <= set(loaded)
    assert all(torch.equal(saved[name], loaded[name]) for name in saved)

    images = make_images()
    inputs = hf_inputs(processor, image_conversation(images[0]))
    ids = inputs["input_ids"][0].tolist()
    text = processor.apply_chat_template(image_conversation(images[0]), add_generation_prompt=True, tokenize=False)
    text_ids = processor.tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(tiny.IMAGE_TOKEN_ID) == tiny.NUM_IMAGE_TOKENS == 576
    assert len(ids) == len(text_ids) - 1 + 576
    assert ids[0] == 1 and ids.count(1) == 1  # exactly one BOS, from the template
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)
    with torch.no_grad():
        logits = hf_model(**inputs).logits
    assert tuple(logits.shape) == (1, len(ids), 2048)
    assert torch.isfinite(logits.float()).all()
    # Special tokens have zero lm_head rows: never the greedy choice with random weights.
    assert int(logits[0, -1].argmax()) >= len(tiny.SPECIAL_TOKENS)

    continuations = []
    for image in images:
        inputs = hf_inputs(processor, image_conversation(image))
        with torch.no_grad():
            out = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert len(new) == 8 and min(new) >= len(tiny.SPECIAL_TOKENS)
        assert len(set(new)) >= 4, new  # not degenerate
        continuations.append(tuple(new))
    assert len(set(continuations)) == len(images), continuations


def test_build_is_deterministic(model_dir, tmp_path):
    again = tiny.build_tiny_llava(tmp_path / "again", seed=0)
    assert file_bytes(again) == file_bytes(model_dir)
    other = tiny.build_tiny_llava(tmp_path / "seed1", seed=1)
    first, second = file_bytes(model_dir), file_bytes(other)
    assert first["model.safetensors"] != second["model.safetensors"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        assert first[name] == second[name], name


def test_weights_override(model_dir, hf_model, tmp_path):
    from safetensors.torch import load_file, save_file

    # Same weights in the llava-hf layout -> byte-identical checkpoint.
    same = tiny.build_tiny_llava(tmp_path / "same", weights=model_dir / "model.safetensors")
    assert (same / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()

    # transformers' in-memory names (e.g. a trained LlavaForConditionalGeneration), float32.
    trained = {k: v.float() * 0.5 for k, v in hf_model.state_dict().items()}
    save_file(trained, str(tmp_path / "trained.safetensors"))
    out = tiny.build_tiny_llava(tmp_path / "trained", weights=tmp_path / "trained.safetensors")
    loaded = load_file(str(out / "model.safetensors"))
    reference = load_file(str(model_dir / "model.safetensors"))
    assert set(loaded) == set(reference)
    assert torch.equal(loaded["language_model.lm_head.weight"], reference["language_model.lm_head.weight"] * 0.5)
    assert loaded["language_model.lm_head.weight"].dtype == torch.bfloat16
    manifest = json.loads((out / "tokcomp_tiny.json").read_text())
    assert manifest["weights"].startswith("external:")


def test_weights_override_rejects_bad_shapes(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(model_dir / "model.safetensors"))
    state["language_model.model.embed_tokens.weight"] = torch.zeros(1000, 256, dtype=torch.bfloat16)
    save_file(state, str(tmp_path / "bad.safetensors"))
    target = tmp_path / "bad-model"
    with pytest.raises(ValueError, match=r"shape mismatch for language_model\.model\.embed_tokens\.weight"):
        tiny.build_tiny_llava(target, weights=tmp_path / "bad.safetensors")
    assert not target.exists()  # validated before anything is written

    del state["language_model.model.embed_tokens.weight"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*embed_tokens[\s\S]*unexpected 1 tensor.*extra\.weight"):
        tiny.build_tiny_llava(target, weights=tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        tiny.build_tiny_llava(target, weights=tmp_path / "nope.safetensors")


def test_cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "vllm_tokcomp.tiny.llava_builder", str(tmp_path / "cli"), "--seed", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert tiny.is_complete_model_dir(tmp_path / "cli")
    assert json.loads((tmp_path / "cli" / "tokcomp_tiny.json").read_text())["seed"] == 3
    assert "RuntimeWarning" not in result.stderr


def test_default_model_dir_and_ensure(tmp_path, monkeypatch):
    monkeypatch.delenv(tiny.MODELS_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tiny.default_model_dir() == tmp_path / "home" / ".cache" / "vllm-tokcomp" / "models" / "tiny-llava-v1"
    root = tmp_path / "models"
    monkeypatch.setenv(tiny.MODELS_DIR_ENV, str(root))
    assert tiny.default_model_dir() == root / "tiny-llava-v1"

    # Concurrent callers: one builds, all get the finished directory, no temp dirs remain.
    results, errors = [], []

    def worker():
        try:
            results.append(tiny.ensure_default_model())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results == [root / "tiny-llava-v1"] * 3
    assert tiny.is_complete_model_dir(root / "tiny-llava-v1")
    assert sorted(p.name for p in root.iterdir()) == [".tiny-llava-v1.lock", "tiny-llava-v1"]

    # Complete: returned as is. Incomplete (a file missing): rebuilt.
    stamp = (root / "tiny-llava-v1" / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_default_model() == root / "tiny-llava-v1"
    assert (root / "tiny-llava-v1" / "model.safetensors").stat().st_mtime_ns == stamp
    (root / "tiny-llava-v1" / "model.safetensors").unlink()
    assert not tiny.is_complete_model_dir(root / "tiny-llava-v1")
    assert tiny.ensure_default_model() == root / "tiny-llava-v1"
    assert tiny.is_complete_model_dir(root / "tiny-llava-v1")
    assert sorted(p.name for p in root.iterdir()) == [".tiny-llava-v1.lock", "tiny-llava-v1"]


# ----------------------------------------------------------------------------- vLLM (slow)
VLLM_CHILD = textwrap.dedent(
    """
    import json, sys, time

    def main():
        from vllm import LLM, SamplingParams

        model_dir, spec_path, out_path = sys.argv[1:4]
        spec = json.load(open(spec_path))
        start = time.perf_counter()
        llm = LLM(
            model=model_dir,
            max_model_len=2048,
            enforce_eager=True,
            dtype="bfloat16",
            seed=0,
            max_num_seqs=2,
            limit_mm_per_prompt={"image": 1},
        )
        load_s = time.perf_counter() - start
        params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=5)
        runs = {}
        for name, request in spec["requests"].items():
            start = time.perf_counter()
            out = llm.chat(request["messages"], params, use_tqdm=False, **request.get("kwargs", {}))[0]
            completion = out.outputs[0]
            runs[name] = {
                "seconds": time.perf_counter() - start,
                "prompt": out.prompt,
                "prompt_token_ids": list(out.prompt_token_ids),
                "token_ids": list(completion.token_ids),
                "text": completion.text,
                "finish_reason": completion.finish_reason,
                "logprobs": [{str(k): v.logprob for k, v in step.items()} for step in completion.logprobs],
            }
        json.dump({"load_s": load_s, "runs": runs}, open(out_path, "w"))

    if __name__ == "__main__":
        main()
    """
)


def _openai_messages(conversation: list[dict]) -> list[dict]:
    """The test conversations with PIL images replaced by OpenAI image_url data URLs."""
    messages = []
    for message in conversation:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image_url", "image_url": {"url": png_data_url(part["image"])}}
                if part["type"] == "image"
                else part
                for part in content
            ]
        messages.append({"role": message["role"], "content": content})
    return messages


@pytest.fixture(scope="module")
def vllm_results(model_dir, tmp_path_factory):
    pytest.importorskip("vllm")
    work = tmp_path_factory.mktemp("vllm")
    images = make_images()
    requests = {f"image{i}": {"messages": _openai_messages(image_conversation(img))} for i, img in enumerate(images)}
    requests["string_format"] = {
        "messages": requests["image0"]["messages"],
        "kwargs": {"chat_template_content_format": "string"},
    }
    requests["no_special_tokens"] = {  # what the OpenAI server does (add_special_tokens=False)
        "messages": requests["image0"]["messages"],
        "kwargs": {"tokenization_kwargs": {"add_special_tokens": False}},
    }
    requests["multi_turn"] = {"messages": _openai_messages(multi_turn_conversation(images[1]))}
    (work / "spec.json").write_text(json.dumps({"max_tokens": MAX_TOKENS, "requests": requests}))
    (work / "child.py").write_text(VLLM_CHILD)
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_PLUGINS="none",  # no plugin (ours included) may interfere
        VLLM_CACHE_ROOT=str(work / "vllm-cache"),
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_LOGGING_LEVEL="WARNING",
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    out_path = work / "out.json"
    result = subprocess.run(
        [sys.executable, str(work / "child.py"), str(model_dir), str(work / "spec.json"), str(out_path)],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + "\n" + result.stderr[-8000:]
    data = json.loads(out_path.read_text())
    print(f"vLLM engine load: {data['load_s']:.1f}s")
    return data


@pytest.mark.slow
def test_vllm_prompt_tokens(vllm_results, processor):
    images = make_images()
    runs = vllm_results["runs"]
    for i, image in enumerate(images):
        run = runs[f"image{i}"]
        expected = hf_inputs(processor, image_conversation(image))["input_ids"][0].tolist()
        assert run["prompt_token_ids"] == expected
        assert run["prompt"] == "<s>USER: <image>\nWhat is in the image? ASSISTANT:"
        text_ids = processor.tokenizer(run["prompt"], add_special_tokens=False).input_ids
        assert len(run["prompt_token_ids"]) == len(text_ids) - 1 + 576  # one <image> -> 576 tokens
        assert run["prompt_token_ids"].count(tiny.IMAGE_TOKEN_ID) == 576
        assert run["prompt_token_ids"].count(1) == 1  # one BOS although LLM.chat adds special tokens
    # "string" content format and add_special_tokens=False give the very same prompt.
    for name in ("string_format", "no_special_tokens"):
        assert runs[name]["prompt_token_ids"] == runs["image0"]["prompt_token_ids"], name
        assert runs[name]["token_ids"] == runs["image0"]["token_ids"], name
    expected = hf_inputs(processor, multi_turn_conversation(images[1]))["input_ids"][0].tolist()
    assert runs["multi_turn"]["prompt_token_ids"] == expected


@pytest.mark.slow
def test_vllm_outputs_vary(vllm_results):
    runs = vllm_results["runs"]
    outputs = [tuple(runs[f"image{i}"]["token_ids"]) for i in range(3)]
    for tokens in outputs:
        assert len(tokens) == MAX_TOKENS and min(tokens) >= len(tiny.SPECIAL_TOKENS)
        assert len(set(tokens)) >= 6, tokens
    assert len(set(outputs)) == 3, outputs
    assert all(runs[f"image{i}"]["finish_reason"] == "length" for i in range(3))
    assert all(runs[f"image{i}"]["text"] for i in range(3))


@pytest.mark.slow
def test_vllm_matches_transformers(vllm_results, processor, hf_model):
    """Greedy vLLM (bf16, CPU kernels) vs transformers (bf16, eager) on the same prompts.

    Logits are bf16 in both, so near-ties (gaps of one bf16 ulp, 0.125 at |logit| ~ 20) can
    flip the argmax and the sequences then diverge. We require: the first 4 tokens equal,
    and, teacher-forcing transformers on vLLM's tokens, every vLLM token within 0.5 of
    transformers' best logit and its log-probability within 0.5 of transformers' value.
    """
    images = make_images()
    runs = vllm_results["runs"]
    conversations = {f"image{i}": image_conversation(img) for i, img in enumerate(images)}
    conversations["multi_turn"] = multi_turn_conversation(images[1])
    report = []
    exact = 0
    for name, conversation in conversations.items():
        run = runs[name]
        inputs = hf_inputs(processor, conversation)
        prompt_len = inputs["input_ids"].shape[1]
        with torch.no_grad():
            hf_tokens = hf_model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)[0, prompt_len:]
        hf_tokens = hf_tokens.tolist()
        vllm_tokens = run["token_ids"]
        prefix = next((i for i, (a, b) in enumerate(zip(hf_tokens, vllm_tokens, strict=True)) if a != b), MAX_TOKENS)
        exact += prefix == MAX_TOKENS
        assert prefix >= 4, (name, hf_tokens, vllm_tokens)

        forced = dict(inputs)
        forced["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([vllm_tokens[:-1]])], dim=1)
        forced["attention_mask"] = torch.ones_like(forced["input_ids"])
        with torch.no_grad():
            logits = hf_model(**forced).logits[0, prompt_len - 1 :].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        worst_margin = worst_delta = 0.0
        for step, token in enumerate(vllm_tokens):
            margin = float(logits[step].max() - logits[step, token])
            assert margin <= 0.5, (name, step, token, margin)
            vllm_logprob = run["logprobs"][step][str(token)]
            delta = abs(vllm_logprob - float(logprobs[step, token]))
            assert delta <= 0.5, (name, step, vllm_logprob)
            worst_margin, worst_delta = max(worst_margin, margin), max(worst_delta, delta)
        report.append(
            f"{name}: {prefix}/{MAX_TOKENS} identical, max logit margin {worst_margin:.3f}, "
            f"max |dlogprob| {worst_delta:.3f}, vLLM request {run['seconds']:.2f}s"
        )
    print("\n".join(report))
    assert exact >= 2, report  # most sequences match token for token
