"""The tiny LLaVA's rotary base (the trainer's ``--rope-theta``; its training side is tested in
lab/tests/test_rope_theta_training.py): it is not visible in the weights, so it travels in the safetensors header
to the built model folder's config.json, which transformers and vLLM read. Default models keep the header they
always had."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from vllm_tokcomp.tiny import llava_builder as tiny  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
WIDE = 1_000_000.0


def _inverse_frequencies(theta: float) -> torch.Tensor:
    """RoPE's per-pair angular speeds as the RoFormer paper writes them: theta^(-2i/d), i < d/2."""
    dim = tiny.TEXT_HEAD_DIM
    return torch.tensor([theta ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)


def _weights_with_theta(path: Path, theta: float | None) -> Path:
    metadata = {"format": "pt"} if theta is None else {"format": "pt", tiny.ROPE_THETA_KEY: repr(theta)}
    save_file(tiny.random_state_dict(0), str(path), metadata=metadata)
    return path


def test_a_default_model_keeps_its_old_header_and_config(tmp_path):
    out = tiny.build_tiny_llava(tmp_path / "model", weights=_weights_with_theta(tmp_path / "w.safetensors", None))
    assert tiny.weights_metadata(out) == {"format": "pt"}  # the served file's digest does not move
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["rope_parameters"]["rope_theta"] == 10000.0
    assert tiny.Geometry.of(tiny.load_external_weights(out), tiny.weights_metadata(out)) == tiny.Geometry()


def test_a_recorded_base_reaches_the_config_and_transformers(tmp_path):
    from transformers import LlavaForConditionalGeneration

    out = tiny.build_tiny_llava(tmp_path / "model", weights=_weights_with_theta(tmp_path / "w.safetensors", WIDE))
    assert tiny.weights_metadata(out)[tiny.ROPE_THETA_KEY] == repr(WIDE)  # a rebuild from the folder keeps it
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["rope_parameters"] == {"rope_type": "default", "rope_theta": WIDE}
    model = LlavaForConditionalGeneration.from_pretrained(out)
    inv_freq = model.model.language_model.rotary_emb.inv_freq.double()
    torch.testing.assert_close(inv_freq, _inverse_frequencies(WIDE), rtol=1e-6, atol=0)
    assert not torch.allclose(inv_freq, _inverse_frequencies(10000.0), rtol=1e-3, atol=0)


@pytest.mark.parametrize(("text", "problem"), [("wide", "not a number"), ("0.5", "above 1"), ("inf", "finite")])
def test_a_bad_recorded_base_is_refused_before_anything_is_written(tmp_path, text, problem):
    weights = tmp_path / "w.safetensors"
    save_file(tiny.random_state_dict(0), str(weights), metadata={"format": "pt", tiny.ROPE_THETA_KEY: text})
    with pytest.raises(ValueError, match=problem):
        tiny.build_tiny_llava(tmp_path / "model", weights=weights)
    assert not (tmp_path / "model").exists()


VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
job = json.loads(sys.argv[1])
llm = LLM(model=job["model"], max_model_len=1024, enforce_eager=True, seed=0, limit_mm_per_prompt={"image": 0})
out = llm.generate([{"prompt_token_ids": job["ids"]}], SamplingParams(max_tokens=1, temperature=0.0, logprobs=5),
                   use_tqdm=False)[0].outputs[0].logprobs[0]
print("RESULT " + json.dumps({str(k): v.logprob for k, v in out.items()}), flush=True)
"""


@pytest.mark.slow
def test_vllm_serves_the_recorded_base(tmp_path):
    """vLLM's next-token log-probabilities after a 700-token prompt match transformers' for the model folder's own
    base, and not for the default one (measured: 0.03 from its own, 0.64 from the default's, top-5 log-probabilities;
    vLLM computes in bf16, the references in fp32)."""
    from transformers import LlavaForConditionalGeneration

    weights = tmp_path / "w.safetensors"  # the bundled trained weights (moderate logits), told a wider base
    save_file(tiny.load_external_weights(tiny.TRAINED_WEIGHTS), str(weights),
              metadata={"format": "pt", tiny.ROPE_THETA_KEY: repr(WIDE)})
    out = tiny.build_tiny_llava(tmp_path / "model", weights=weights)
    text = torch.randint(10, 1500, (700,), generator=torch.Generator().manual_seed(0))
    ids = [tiny.BOS_TOKEN_ID, *text.tolist()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, json.dumps({"model": str(out), "ids": ids})],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stderr[-4000:]
    served = {int(k): v for k, v in json.loads(lines[0][len("RESULT "):]).items()}

    def reference(theta: float) -> torch.Tensor:
        model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
        rotary = model.model.language_model.rotary_emb
        rotary.inv_freq = _inverse_frequencies(theta).float()  # the base under test, written independently
        rotary.original_inv_freq = rotary.inv_freq
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)

    own, default = reference(WIDE), reference(10000.0)
    gap_own = max(abs(logprob - own[token].item()) for token, logprob in served.items())
    gap_default = max(abs(logprob - default[token].item()) for token, logprob in served.items())
    assert gap_own < 0.1, (gap_own, gap_default)
    assert gap_default > 3 * gap_own, (gap_own, gap_default)
