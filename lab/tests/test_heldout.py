"""lab/benchmarks/heldout.py: its packed single-turn scoring agrees with asking each question alone (an unpacked,
unmasked forward per question: the independent reference), a model folder and its bare weights file score the same,
and bad arguments stop it with the reason."""

import json

import pytest
import torch

from lab.benchmarks.binding_probe import answers_right
from lab.benchmarks.heldout import FIRST_SCENE, load, main, packed_logits, score_scene
from tokcomp_lab.train.llava import pixels
from vllm_tokcomp.data.generate import scene_rng
from vllm_tokcomp.data.synth import make_questions, make_scene, render_scene
from vllm_tokcomp.tiny import llava_builder as tiny


@pytest.fixture(scope="module")
def bundled():
    return tiny.ensure_default_model()


def test_packed_logits_equal_each_question_asked_alone(bundled):
    model, enc = load(bundled, None, "cpu")
    asked = 0
    for index in range(FIRST_SCENE, FIRST_SCENE + 3):
        rng = scene_rng(0, "val", index)
        scene = make_scene(rng)
        qas = make_questions(scene, rng, 6)
        packed, _, starts = packed_logits(model, enc, scene, qas, "cpu")
        alone_right = []
        for qa, packed_start in zip(qas, starts, strict=True):
            ids, labels, (start,) = enc.conversation_with_answer_starts([qa])
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([ids]), pixel_values=pixels(render_scene(scene))[None]).logits[0]
            length = sum(label != -100 for label in labels)  # the answer's tokens and its </s>
            torch.testing.assert_close(packed[packed_start:packed_start + length], alone[start:start + length],
                                       atol=2e-3, rtol=1e-3)
            (right,) = answers_right(alone.argmax(-1), labels, enc.eos)
            alone_right.append(right)
        assert score_scene(model, enc, scene, qas, "cpu") == alone_right
        asked += len(qas)
    assert asked >= 9


def test_folder_and_weights_file_score_the_same(tmp_path, bundled):
    out = tmp_path / "h"
    assert main([f"folder={bundled}", f"file={bundled / 'model.safetensors'}", "--scenes", "4", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    folder, file = report["models"]["folder"], report["models"]["file"]
    assert folder["n"] >= 8 and 0.0 <= folder["accuracy"] <= 1.0
    for key in ("accuracy", "n", "per_type", "per_objects", "per_type_and_objects"):
        assert folder[key] == file[key]
    assert sum(v["n"] for v in folder["per_type"].values()) == folder["n"]
    assert sum(v["n"] for v in folder["per_objects"].values()) == folder["n"]
    assert "## By objects in the scene" in out.with_suffix(".md").read_text()


def test_bad_arguments_stop_with_the_reason(tmp_path, bundled, capsys):
    with pytest.raises(SystemExit, match="no such model folder or weights file: .*missing.safetensors"):
        main([str(tmp_path / "missing.safetensors")])
    with pytest.raises(SystemExit):
        main([f"a={bundled}", f"a={bundled / 'model.safetensors'}", "--out", str(tmp_path / "x")])
    assert "two models share a name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--scenes", "0"])
    assert "--scenes must be at least 1" in capsys.readouterr().err
