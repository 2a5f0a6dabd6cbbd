"""The synthetic VQA generator: determinism and conformance to docs/dataset.md."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

np = pytest.importorskip("numpy")
from PIL import Image  # noqa: E402

from vllm_tokcomp.data import generate  # noqa: E402
from vllm_tokcomp.data.spec import (  # noqa: E402
    ANSWER_VOCAB,
    COLORS,
    IMAGE_SIZE,
    QUESTION_TYPES,
    SHAPES,
    normalize_answer,
)
from vllm_tokcomp.data.synth import make_questions, make_scene, render_scene, scene_caption  # noqa: E402


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqa")
    assert generate.main([str(out), "--seed", "3", "--train", "6", "--val", "4", "--test", "40"]) == 0
    return out


def test_same_seed_same_bytes(dataset: Path, tmp_path: Path) -> None:
    assert generate.main([str(tmp_path), "--seed", "3", "--train", "6", "--val", "4", "--test", "40"]) == 0
    assert _digest(tmp_path) == _digest(dataset)


def test_other_seed_differs(dataset: Path, tmp_path: Path) -> None:
    assert generate.main([str(tmp_path), "--seed", "4", "--test", "5"]) == 0
    ours = (tmp_path / "test" / "images" / "000000.png").read_bytes()
    assert ours != (dataset / "test" / "images" / "000000.png").read_bytes()


def test_images_do_not_depend_on_split_sizes(dataset: Path, tmp_path: Path) -> None:
    assert generate.main([str(tmp_path), "--seed", "3", "--test", "3"]) == 0
    for i in range(3):
        name = f"images/{i:06d}.png"
        assert (tmp_path / "test" / name).read_bytes() == (dataset / "test" / name).read_bytes()
    small = (tmp_path / "test" / "questions.jsonl").read_text().splitlines()
    big = (dataset / "test" / "questions.jsonl").read_text().splitlines()
    assert small == big[: len(small)]


def test_layout_and_records(dataset: Path) -> None:
    spec = json.loads((dataset / "spec.json").read_text())
    assert spec["seed"] == 3 and spec["splits"]["test"]["images"] == 40
    for split in ("train", "val", "test"):
        records = [json.loads(line) for line in (dataset / split / "questions.jsonl").read_text().splitlines()]
        assert len(records) == spec["splits"][split]["questions"]
        ids = [r["id"] for r in records]
        assert len(set(ids)) == len(ids)
        for r in records:
            assert {"image", "question", "answer", "type"} <= set(r)
            assert r["type"] in QUESTION_TYPES
            assert r["answer"] in ANSWER_VOCAB
            assert normalize_answer(r["answer"]) == r["answer"]
            assert r["question"].endswith("?")
            image = Image.open(dataset / split / r["image"])
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
    test_types = {json.loads(line)["type"] for line in (dataset / "test" / "questions.jsonl").read_text().splitlines()}
    assert test_types == set(QUESTION_TYPES)


def test_answers_follow_from_the_scene() -> None:
    for index in range(60):
        rng = np.random.default_rng([99, index])
        scene = make_scene(rng)
        for qa in make_questions(scene, rng, 6):
            q, a, kind = qa["question"], qa["answer"], qa["type"]
            if kind == "color":
                shape = q.split()[-1].rstrip("?")
                assert [o.color for o in scene.objects if o.shape == shape] == [a]
            elif kind == "shape":
                color = q.split()[-2]
                assert [o.shape for o in scene.objects if o.color == color] == [a]
            elif kind == "count":
                word = q.split()[2]
                n = sum(o.shape + "s" == word or o.color == word for o in scene.objects)
                assert a == str(n)
            elif kind == "presence":
                color, shape = q.split()[3], q.split()[4].rstrip("?")
                assert a == ("yes" if any(o.color == color and o.shape == shape for o in scene.objects) else "no")
            elif kind == "digit":
                assert a == str(scene.digit)
            else:
                assert a in ("left", "right", "top", "bottom", *SHAPES)


def test_render_shows_the_objects() -> None:
    rng = np.random.default_rng([5, 0])
    scene = make_scene(rng, digit=True)
    pixels = np.asarray(render_scene(scene))
    for obj in scene.objects:
        assert tuple(pixels[obj.y, obj.x]) == COLORS[obj.color]  # every shape covers its centre
    x, y = scene.digit_xy
    assert tuple(pixels[y + 1, x + 1]) == (255, 255, 255)
    assert "digit" in scene_caption(scene)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(" Red.", "red"), ("The circle", "circle"), ("three", "3"), ("Yes, it is.", "yes"), ("squares", "square"),
     ("grey", "gray"), ("", "")],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected
