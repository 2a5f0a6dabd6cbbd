"""The training side of the tiny LLaVA's rotary base (``tokcomp_lab.train.llava --rope-theta``): a run records it in
the exported safetensors header, a resumed run keeps it, and the Qwen transplant refuses a LLaVA of another base.
How the header reaches the model folder and vLLM is tested in tests/test_rope_theta.py."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from vllm_tokcomp.tiny import llava_builder as tiny  # noqa: E402

WIDE = 1_000_000.0


def _weights_with_theta(path: Path, theta: float | None) -> Path:
    metadata = {"format": "pt"} if theta is None else {"format": "pt", tiny.ROPE_THETA_KEY: repr(theta)}
    save_file(tiny.random_state_dict(0), str(path), metadata=metadata)
    return path


def _train(run: Path, *extra: str) -> int:
    from tokcomp_lab.train.llava import main

    tokenizer = tiny.ensure_default_model() / "tokenizer.json"
    return main([str(run), "--clip-steps", "0", "--qa-batch", "1", "--questions-per-image", "2", "--eval-images",
                 "0", "--save-every", "1", "--tokenizer-json", str(tokenizer), *extra])


def test_training_records_the_base_and_a_resumed_run_keeps_it(tmp_path, capsys):
    from tokcomp_lab.train.llava import read_init

    init = _weights_with_theta(tmp_path / "init.safetensors", None)
    run = tmp_path / "run"
    assert _train(run, "--init", str(init), "--qa-steps", "1", "--rope-theta", "1e6") == 0
    assert "rotary base 10000 -> 1e+06" in capsys.readouterr().out
    assert tiny.weights_metadata(run / "model.safetensors")[tiny.ROPE_THETA_KEY] == repr(WIDE)
    for saved in ("ckpt.pt", "weights_and_heads.pt", "model.safetensors"):
        assert read_init(run / saved)[2].rope_theta == WIDE, saved

    with pytest.raises(SystemExit) as exit_info:  # another base cannot continue this run's positions
        _train(run, "--qa-steps", "2", "--rope-theta", "1e5")
    assert exit_info.value.code == 2
    assert "--rope-theta" in capsys.readouterr().err
    assert _train(run, "--qa-steps", "2") == 0  # no flag: the run goes on with its own base
    assert torch.load(run / "ckpt.pt", weights_only=False)["step"] == 2
    assert tiny.weights_metadata(run / "model.safetensors")[tiny.ROPE_THETA_KEY] == repr(WIDE)

    second = tmp_path / "second"  # a run started from those weights inherits their base
    assert _train(second, "--init", str(run / "model.safetensors"), "--qa-steps", "1") == 0
    assert tiny.weights_metadata(second / "model.safetensors")[tiny.ROPE_THETA_KEY] == repr(WIDE)


def test_checkpoints_from_before_the_field_read_as_the_default(tmp_path):
    from tokcomp_lab.train.llava import build_model, read_init

    old = tmp_path / "old.pt"
    torch.save({"model": build_model(tiny.Geometry()).state_dict(), "heads": None}, old)
    assert read_init(old)[2] == tiny.Geometry()


def test_bad_rope_theta_flag_is_refused_at_startup(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _train(tmp_path / "run", "--qa-steps", "1", "--rope-theta", "1")
    assert exit_info.value.code == 2
    assert "--rope-theta" in capsys.readouterr().err


def test_the_qwen_transplant_refuses_a_llava_of_another_base(tmp_path, capsys):
    from tokcomp_lab.train.qwen2_vl import main

    weights = _weights_with_theta(tmp_path / "w.safetensors", WIDE)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "run"), "--llava", str(weights)])
    assert exit_info.value.code == 2
    assert "--llava" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

