"""Spec v2's rendering variation, measured on the rendered pixels: digit strokes of every width in the tolerance,
object boxes scaled as the rendering says, colour offsets applied and bounded, both plurals; the same scenes,
questions and answers under every rendering range; objects still apart at the largest scale; bad ranges refused."""

import json

import numpy as np
import pytest

from vllm_tokcomp.data.generate import generate_split, main, rendering_rng, scene_rng
from vllm_tokcomp.data.spec import COLORS, DIGIT_BOX, DIGIT_GLYPH, SIZES
from vllm_tokcomp.data.synth import (
    COLOR_TOLERANCE,
    SIZE_TOLERANCE,
    STROKE_TOLERANCE,
    Obj,
    Rendering,
    RenderingRange,
    Scene,
    label_map,
    make_questions,
    make_scene,
    render_scene,
)

GREY = {"c1": (128, 128, 128), "c2": (128, 128, 128), "dir": 0, "period": 6, "noise_seed": 0}
WIDE = RenderingRange(strokes=STROKE_TOLERANCE, size_jitter=SIZE_TOLERANCE[1] - 1, color_jitter=COLOR_TOLERANCE,
                      both_spellings=True)


def _scene(objects, rendering=Rendering(), digit=None, digit_xy=None):  # noqa: B008 - frozen
    return Scene("plain", objects, digit, digit_xy, dict(GREY), 2, rendering)


def _bbox(mask):
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


@pytest.mark.parametrize("stroke", STROKE_TOLERANCE)
def test_digit_strokes_are_the_renderings_width(stroke):
    xy = (100, 120)
    image = np.asarray(render_scene(_scene([], Rendering(stroke=stroke), 8, xy)))
    black = (image[xy[1]:xy[1] + DIGIT_BOX, xy[0]:xy[0] + DIGIT_BOX] == 0).all(-1)
    w, h = DIGIT_GLYPH
    top, left = (DIGIT_BOX - h) // 2, (DIGIT_BOX - w) // 2
    assert _bbox(black) == (top, top + h, left, left + w)  # the glyph box does not change
    assert black[:, left + w // 2].sum() == 3 * stroke  # bars a, g, d: each a stroke high
    assert black[top + stroke + 1, :].sum() == 2 * stroke  # bars f and b: each a stroke wide


@pytest.mark.parametrize("scale", [SIZE_TOLERANCE[0], 0.97, 1.0, 1.05, SIZE_TOLERANCE[1]])
@pytest.mark.parametrize("size", list(SIZES))
def test_object_boxes_scale_with_the_rendering(scale, size):
    x, y = 150, 181
    side = round(SIZES[size] * scale)
    scene = _scene([Obj("square", "red", size, x, y)], Rendering(size_scale=scale))
    mask = (np.asarray(render_scene(scene)) == np.array(COLORS["red"], np.uint8)).all(-1)
    top, left = y - side // 2, x - side // 2
    assert _bbox(mask) == (top, top + side, left, left + side)
    assert mask.sum() == side * side
    assert np.array_equal(label_map(scene) == 1, mask)  # the dense labels follow the same geometry


def test_colour_offsets_are_applied_per_object_and_clipped():
    objects = [Obj("square", "red", "large", 80, 80), Obj("square", "yellow", "large", 240, 240)]
    rendering = Rendering(color_offsets=((16, -16, 5), (16, 16, -16)))
    image = np.asarray(render_scene(_scene(objects, rendering)))
    assert tuple(image[80, 80]) == (236, 24, 45)  # red (220, 40, 40) + offsets
    assert tuple(image[240, 240]) == (251, 226, 24)  # yellow (235, 210, 40) + offsets
    with pytest.raises(ValueError, match="colour offsets"):
        Rendering(color_offsets=((COLOR_TOLERANCE + 1, 0, 0),))


def test_every_range_draws_the_same_scenes_questions_and_answers():
    spellings, strokes = set(), set()
    for index in range(200):
        plain = make_scene(scene_rng(0, "train", index), spec_version=2)
        varied = make_scene(scene_rng(0, "train", index), spec_version=2)
        varied.rendering = WIDE.draw(rendering_rng(0, "train", index), len(varied.objects))
        assert (plain.objects, plain.digit, plain.digit_xy) == (varied.objects, varied.digit, varied.digit_xy)
        q_plain = make_questions(plain, scene_rng(3, "train", index), 6)
        q_varied = make_questions(varied, scene_rng(3, "train", index), 6)
        assert [(q["type"], q["answer"]) for q in q_plain] == [(q["type"], q["answer"]) for q in q_varied]
        for a, b in zip(q_plain, q_varied, strict=True):
            assert b["question"] == a["question"].replace("crosses", varied.rendering.cross_plural)
            if "How many cross" in b["question"]:
                spellings.add(varied.rendering.cross_plural)
        strokes.add(varied.rendering.stroke)
        assert len(varied.rendering.color_offsets) == len(varied.objects)
        assert SIZE_TOLERANCE[0] <= varied.rendering.size_scale <= SIZE_TOLERANCE[1]
    assert spellings == {"crosses", "crosss"} and strokes == set(STROKE_TOLERANCE)


def test_objects_stay_apart_at_the_largest_scale():
    """Placement keeps boxes more than 6 px apart at the nominal size; scaled by up to 1.08 they still never touch:
    each object drawn alone covers exactly the pixels it has in the scene's label map."""
    for index in range(150):
        scene = make_scene(scene_rng(0, "val", index), spec_version=2)
        scene.rendering = Rendering(size_scale=SIZE_TOLERANCE[1])
        labels = label_map(scene)
        for i, obj in enumerate(scene.objects):
            alone = label_map(Scene("plain", [obj], None, None, dict(GREY), 2, scene.rendering)) == 1
            assert np.array_equal(labels == i + 1, alone), (index, i)


@pytest.mark.parametrize(("kwargs", "field"), [({"strokes": (1,)}, "strokes"), ({"strokes": ()}, "strokes"),
                                               ({"size_jitter": 0.2}, "size_jitter"),
                                               ({"color_jitter": 40}, "color_jitter")])
def test_ranges_outside_the_tolerance_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RenderingRange(**kwargs)


def test_generated_split_records_each_images_rendering(tmp_path):
    plain = generate_split(tmp_path / "plain", "test", 12, seed=0, questions_per_image=2, spec_version=2)
    varied = generate_split(tmp_path / "varied", "test", 12, seed=0, questions_per_image=2, spec_version=2,
                            renderings=RenderingRange(strokes=(2, 5)))
    assert plain == varied
    records = [json.loads(line) for line in (tmp_path / "varied" / "test" / "questions.jsonl").read_text().splitlines()]
    assert all(r["rendering"]["stroke"] in (2, 5) for r in records)
    originals = (tmp_path / "plain" / "test" / "questions.jsonl").read_text().splitlines()
    assert [{k: v for k, v in r.items() if k != "rendering"} for r in records] == [json.loads(x) for x in originals]
    with pytest.raises(ValueError, match="spec version 2"):
        generate_split(tmp_path / "v1", "test", 2, seed=0, questions_per_image=2, spec_version=1,
                       renderings=RenderingRange(strokes=(2,)))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "cli"), "--test", "2", "--strokes", "2"])  # v1 is the default version
