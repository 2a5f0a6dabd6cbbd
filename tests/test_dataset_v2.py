"""Spec v2 of the synthetic VQA images, measured on the rendered pixels: what docs/dataset.md says is what is drawn
(object boxes, square fill, plus-arm widths, triangle base and apex, digit glyph box and stroke widths), the same
scenes as v1, and the fixed wording (``crosses``, ``an orange``). v1 stays as it was (its measured digit glyph too)."""

import math

import numpy as np
import pytest

from vllm_tokcomp.data.generate import scene_rng
from vllm_tokcomp.data.spec import COLORS, DIGIT_BOX, DIGIT_GLYPH, DIGIT_STROKE, SHAPES, SIZES, normalize_answer
from vllm_tokcomp.data.synth import Obj, Scene, label_map, make_questions, make_scene, render_scene

GREY = {"c1": (128, 128, 128), "c2": (128, 128, 128), "dir": 0, "period": 6, "noise_seed": 0}


def _scene(objects, spec_version=2, digit=None, digit_xy=None):
    return Scene("plain", objects, digit, digit_xy, dict(GREY), spec_version)


def _mask(image, rgb):
    return (np.asarray(image) == np.array(rgb, np.uint8)).all(-1)


def _bbox(mask):
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_fills_exactly_its_size_box(shape, size):
    side, x, y = SIZES[size], 150, 181
    mask = _mask(render_scene(_scene([Obj(shape, "red", size, x, y)])), COLORS["red"])
    top, left = y - side // 2, x - side // 2
    assert _bbox(mask) == (top, top + side, left, left + side)
    labels = label_map(_scene([Obj(shape, "red", size, x, y)])) == 1
    assert np.array_equal(labels, mask)  # the dense labels follow the same geometry


@pytest.mark.parametrize("size", list(SIZES))
def test_shape_details(size):
    side = SIZES[size]
    square = _mask(render_scene(_scene([Obj("square", "red", size, 168, 168)])), COLORS["red"])
    assert square.sum() == side * side
    circle = _mask(render_scene(_scene([Obj("circle", "red", size, 168, 168)])), COLORS["red"])
    assert abs(circle.sum() / (math.pi * side * side / 4) - 1) < 0.05
    cross = _mask(render_scene(_scene([Obj("cross", "red", size, 168, 168)])), COLORS["red"])
    top, bottom, left, right = _bbox(cross)
    arm = round(side / 3)
    assert cross[top].sum() == arm and cross[:, left].sum() == arm  # the arms' ends, measured
    offset = (side - arm) // 2
    assert cross[top, left + offset:left + offset + arm].all()
    triangle = _mask(render_scene(_scene([Obj("triangle", "red", size, 168, 168)])), COLORS["red"])
    top, bottom, left, right = _bbox(triangle)
    assert triangle[bottom - 1].sum() == side  # the base is the box's bottom row
    apex = np.nonzero(triangle[top])[0]
    assert apex.size <= 2 and abs(apex.mean() - (left + (side - 1) / 2)) <= 0.5  # the apex at the top centre


def _digit_pixels(value, spec_version, xy=(100, 120)):
    image = np.asarray(render_scene(_scene([], spec_version, value, xy)))
    box = image[xy[1]:xy[1] + DIGIT_BOX, xy[0]:xy[0] + DIGIT_BOX]
    return box, (box == 0).all(-1)


def test_digit_box_glyph_and_strokes_are_the_spec():
    box, black = _digit_pixels(8, 2)
    assert ((box == 255).all(-1) | black).all()  # a white box holding only the glyph
    w, h = DIGIT_GLYPH
    top, left = (DIGIT_BOX - h) // 2, (DIGIT_BOX - w) // 2
    assert _bbox(black) == (top, top + h, left, left + w)
    centre_column = black[:, left + w // 2]
    assert centre_column.sum() == 3 * DIGIT_STROKE  # segments a, g and d, each a stroke high
    assert black[top + 2 * DIGIT_STROKE, :].sum() == 2 * DIGIT_STROKE  # segments f and b, each a stroke wide
    _, one = _digit_pixels(1, 2)
    assert (one.any(0)).sum() == DIGIT_STROKE and one.sum() == DIGIT_STROKE * h


def test_v1_digits_stay_as_they_were():
    """v1 drew rectangles with their end pixel: a 15 x 25 glyph of 4 px strokes, kept so that v1 data stay
    byte-identical."""
    _, black = _digit_pixels(8, 1)
    top, bottom, left, right = _bbox(black)
    assert (bottom - top, right - left) == (25, 15)
    _, one = _digit_pixels(1, 1)
    assert one.any(0).sum() == 4


def test_v2_draws_the_same_scenes_and_fixes_the_wording():
    crosses = orange = 0
    for index in range(300):
        v1, v2 = (make_scene(scene_rng(0, "test", index), spec_version=v) for v in (1, 2))
        assert (v1.objects, v1.digit, v1.digit_xy, v1.background) == (v2.objects, v2.digit, v2.digit_xy, v2.background)
        q1 = make_questions(v1, scene_rng(5, "test", index), 6)
        q2 = make_questions(v2, scene_rng(5, "test", index), 6)
        assert [(q["type"], q["answer"]) for q in q1] == [(q["type"], q["answer"]) for q in q2]
        for a, b in zip(q1, q2, strict=True):
            assert b["question"] == a["question"].replace("crosss", "crosses").replace("a orange", "an orange")
            crosses += "crosses" in b["question"]
            orange += "an orange" in b["question"]
    assert crosses and orange


def test_answers_in_either_plural_normalise():
    assert normalize_answer("Crosses.") == normalize_answer("crosss") == "cross"
    assert normalize_answer("circles") == "circle"


def test_make_scene_refuses_an_unknown_version():
    with pytest.raises(ValueError, match="spec_version"):
        make_scene(scene_rng(0, "test", 0), spec_version=3)
