"""The harder split: dense scenes of small objects, multi-digit numbers drawn as specified (measured on pixels),
questions whose answers follow from the scene (checked against it here), deterministic generation."""

import json

import numpy as np
import pytest

from vllm_tokcomp.data.generate import main as generate
from vllm_tokcomp.data.generate import scene_rng
from vllm_tokcomp.data.hard import (
    FAR_APART,
    MAX_COUNT,
    MAX_OBJECTS,
    MIN_OBJECTS,
    HardScene,
    make_hard_questions,
    make_hard_scene,
    number_box,
    render_hard_scene,
)
from vllm_tokcomp.data.spec import DIGIT_GLYPH, DIGIT_STROKE, SIDES

GREY = {"c1": (128, 128, 128), "c2": (128, 128, 128), "dir": 0, "period": 6, "noise_seed": 0}


def _scenes(n=300):
    for index in range(n):
        rng = scene_rng(0, "hard", index)
        scene = make_hard_scene(rng)
        yield scene, make_hard_questions(scene, rng, 6)


def test_scenes_are_dense_small_and_half_carry_a_number():
    numbers = 0
    for scene, _ in _scenes():
        assert MIN_OBJECTS - 2 <= len(scene.objects) <= MAX_OBJECTS  # a crowded scene may fail to place one or two
        assert {o.size for o in scene.objects} <= {"tiny", "small"}
        if scene.number is not None:
            numbers += 1
            assert len(scene.number) in (3, 4) and scene.number.isdigit()
    assert 0.4 < numbers / 300 < 0.6


def test_answers_follow_from_the_scene():
    seen = set()
    for scene, questions in _scenes():
        by_shape = {o.shape: o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1}
        for q in questions:
            seen.add(q["type"])
            assert q["difficulty"] in ("easy", "hard")
            text, answer = q["question"], q["answer"]
            if q["type"] == "count":
                noun = text.removeprefix("How many ").removesuffix(" are there?")
                if noun.endswith(" objects"):
                    expected = sum(o.color == noun.split()[0] for o in scene.objects)
                else:
                    expected = sum(o.shape + ("es" if o.shape == "cross" else "s") == noun for o in scene.objects)
                assert answer == str(expected) and expected <= MAX_COUNT
                assert q["difficulty"] == ("easy" if expected <= 3 else "hard")
            elif q["type"] == "number":
                assert answer == scene.number
            elif q["type"] == "same_color":
                a, b = (by_shape[w] for w in text.removeprefix("Do the ").split(" have")[0].split(" and the "))
                assert np.hypot(a.x - b.x, a.y - b.y) >= FAR_APART
                assert answer == ("yes" if a.color == b.color else "no")
            elif q["type"] == "presence":
                color, shape = text.removesuffix("?").split()[-2:]
                assert answer == ("yes" if any((o.color, o.shape) == (color, shape) for o in scene.objects) else "no")
    assert seen == {"count", "number", "presence", "same_color", "same_shape", "position"}


@pytest.mark.parametrize("number", ["888", "1111", "4721"])
def test_number_glyphs_are_drawn_as_specified(number):
    xy = (60, 200)
    scene = HardScene("plain", [], None, None, dict(GREY), 2, number=number, number_xy=xy)
    image = np.asarray(render_hard_scene(scene))
    width, height = number_box(len(number))
    box = image[xy[1]:xy[1] + height, xy[0]:xy[0] + width]
    black = (box == 0).all(-1)
    assert ((box == 255).all(-1) | black).all()  # a white box holding only the digits
    rows, cols = np.nonzero(black)
    w, h = DIGIT_GLYPH
    assert rows.max() + 1 - rows.min() == h
    if number[0] != "1" and number[-1] != "1":
        assert cols.max() + 1 - cols.min() == len(number) * w + (len(number) - 1) * 4
    if number == "1111":
        assert black.any(0).sum() == 4 * DIGIT_STROKE  # four glyphs, one stroke wide each


def test_tiny_objects_fill_their_box():
    from vllm_tokcomp.data.synth import Obj

    scene = HardScene("plain", [Obj("square", "red", "tiny", 100, 100)], None, None, dict(GREY), 2)
    red = (np.asarray(render_hard_scene(scene)) == (220, 40, 40)).all(-1)
    assert red.sum() == SIDES["tiny"] ** 2


def test_generation_is_deterministic(tmp_path):
    for name in ("a", "b"):
        generate([str(tmp_path / name), "--hard", "12", "--seed", "3"])
    assert (tmp_path / "a/hard/questions.jsonl").read_text() == (tmp_path / "b/hard/questions.jsonl").read_text()
    for index in range(12):
        image = f"hard/images/{index:06d}.png"
        assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()
    spec = json.loads((tmp_path / "a/spec.json").read_text())
    assert spec["splits"]["hard"] == {"images": 12, "spec_version": 2, "questions": 24}
