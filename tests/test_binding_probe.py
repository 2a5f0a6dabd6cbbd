"""benchmarks/binding_probe.py: it runs end to end on a model folder through transformers' loader, its isolated
packing scores the first turn exactly as the multi-turn conversation does (the eager-attention mask is applied), the
attention masses are fractions of one row, and it refuses data the generator did not make."""

import json

import pytest
from PIL import Image

from benchmarks.binding_probe import main
from vllm_tokcomp.data.generate import main as generate


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    generate([str(out), "--seed", "3", "--test", "6"])
    return out / "test"


def test_script_writes_its_report_for_a_model_folder(tmp_path, test_split):
    from vllm_tokcomp.tiny import llava as tiny

    out = tmp_path / "probe"
    model = tiny.ensure_default_model()
    assert main(["--model", str(model), "--data", str(test_split), "--probe-images", "3",
                 "--context-images", "3", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["questions"] == 12 and report["layers"] == len(report["attention"][next(iter(report["attention"]))]
                                                                   ["head0_by_layer"])
    # turn 1 is the same single-turn sample in both packings: any disagreement means the mask was not applied
    assert report["context"]["first_turn_same"] == "3/3"
    assert report["context"]["turns_2_16"]["all"]["n"] > 10
    for row in report["attention"].values():
        assert all(0.0 <= v <= 1.0 + 1e-6 for v in row["head0_by_layer"] + row["heads_mean_by_layer"])
    assert 0.0 <= report["tower"]["object_shape_vote"] <= 1.0
    assert "## Context" in out.with_suffix(".md").read_text()


def test_refuses_images_the_generator_did_not_make(tmp_path, test_split):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(test_split.parent, data)
    first = json.loads((data / "test" / "questions.jsonl").read_text().splitlines()[0])
    path = data / "test" / first["image"]
    with Image.open(path) as image:
        Image.new("RGB", image.size, "white").save(path)
    with pytest.raises(SystemExit, match=first["image"].split("/")[-1]):
        main(["--model", "unused", "--data", str(data / "test"), "--out", str(tmp_path / "x")])
