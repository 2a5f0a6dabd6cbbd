"""The harder split of the synthetic VQA task (spec v2 drawing; docs/dataset.md): dense scenes, small objects,
multi-digit scene text and questions that need two distant regions, so that methods separate at 64 / 32 / 16 tokens.

Same format and scorer as the other splits; every question carries ``"difficulty"``: ``"easy"`` (one object or one
count of at most 3) or ``"hard"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import ImageDraw

from .spec import BACKGROUNDS, COLORS, DIGIT_GLYPH, IMAGE_SIZE, SHAPES, SIDES, article, plural
from .synth import Obj, Scene, _describe, _fill_box, _free, _muted_color, draw_glyph_v2, render_scene

MIN_OBJECTS, MAX_OBJECTS = 8, 16
HARD_SIZES = ("tiny", "small")  # 24 and 40 px: the dense scenes use smaller objects
MAX_COUNT = 9  # count questions whose answer would be larger are not asked
NUMBER_DIGITS = (3, 4)
GLYPH_GAP = 4  # px between digits
NUMBER_PAD = 6  # px of white around the digits
FAR_APART = 150  # two-region questions: centres at least this far apart (Euclidean, px)


@dataclass
class HardScene(Scene):
    number: str | None = None  # the digits written in the white box
    number_xy: tuple[int, int] | None = None  # its top-left corner


def number_box(digits: int) -> tuple[int, int]:
    """The white box of a ``digits``-digit number: width and height in pixels."""
    width, height = DIGIT_GLYPH
    return 2 * NUMBER_PAD + digits * width + (digits - 1) * GLYPH_GAP, 2 * NUMBER_PAD + height


def make_hard_scene(rng: np.random.Generator) -> HardScene:
    """8–16 objects of 24 or 40 px and, in half the scenes, a 3- or 4-digit number in a white box."""
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    bg = {"c1": _muted_color(rng), "c2": _muted_color(rng), "dir": int(rng.integers(4)),
          "period": int(rng.integers(6, 16)), "noise_seed": int(rng.integers(2**31))}
    boxes: list[tuple[float, float, float]] = []
    number, number_xy = None, None
    if rng.random() < 0.5:
        digits = NUMBER_DIGITS[int(rng.integers(len(NUMBER_DIGITS)))]
        width, height = number_box(digits)
        x0 = int(rng.integers(4, IMAGE_SIZE - width - 4))
        y0 = int(rng.integers(4, IMAGE_SIZE - height - 4))
        number = "".join(str(int(d)) for d in rng.integers(0, 10, digits))
        number_xy = (x0, y0)
        boxes.append((x0 + width / 2, y0 + height / 2, max(width, height) / 2))
    objects: list[Obj] = []
    for _ in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        size = HARD_SIZES[int(rng.integers(len(HARD_SIZES)))]
        r = SIDES[size] / 2
        for _attempt in range(50):
            x, y = rng.uniform(r + 4, IMAGE_SIZE - r - 4, size=2)
            if _free(boxes, x, y, r):
                boxes.append((x, y, r))
                objects.append(Obj(shape, color, size, int(x), int(y)))
                break
    return HardScene(background, objects, None, None, bg, 2, number=number, number_xy=number_xy)


def _draw_number(draw: ImageDraw.ImageDraw, scene: HardScene) -> None:
    x0, y0 = scene.number_xy
    width, height = number_box(len(scene.number))
    _fill_box(draw, x0, y0, x0 + width, y0 + height, (255, 255, 255))
    w = DIGIT_GLYPH[0]
    for k, char in enumerate(scene.number):
        draw_glyph_v2(draw, x0 + NUMBER_PAD + k * (w + GLYPH_GAP), y0 + NUMBER_PAD, int(char))


def render_hard_scene(scene: HardScene):  # noqa: ANN201 - a PIL image
    """Pixels of a hard scene: the objects as spec v2 draws them, then the number box."""
    image = render_scene(scene)
    if scene.number is not None:
        _draw_number(ImageDraw.Draw(image), scene)
    return image


def _count(scene: HardScene, rng: np.random.Generator) -> tuple[str, str, str] | None:
    kinds = [("shape", s) for s in sorted({o.shape for o in scene.objects})]
    kinds += [("color", c) for c in sorted({o.color for o in scene.objects})]
    kinds = [(k, v) for k, v in kinds if sum(getattr(o, k) == v for o in scene.objects) <= MAX_COUNT]
    if not kinds:
        return None
    kind, value = kinds[int(rng.integers(len(kinds)))]
    count = sum(getattr(o, kind) == value for o in scene.objects)
    noun = plural(value, 2) if kind == "shape" else f"{value} objects"
    return f"How many {noun} are there?", str(count), "easy" if count <= 3 else "hard"


def _number(scene: HardScene, rng: np.random.Generator) -> tuple[str, str, str] | None:
    if scene.number is None:
        return None
    return "What number is written in the white box?", scene.number, "hard"


def _presence(scene: HardScene, rng: np.random.Generator) -> tuple[str, str, str] | None:
    present = sorted({(o.color, o.shape) for o in scene.objects})
    if rng.random() < 0.5:
        color, shape = present[int(rng.integers(len(present)))]
        answer = "yes"
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        if not absent:
            return None
        color, shape = absent[int(rng.integers(len(absent)))]
        answer = "no"
    return f"Is there {article(color, 2)} {color} {shape}?", answer, "easy"


def _far_pairs(scene: HardScene) -> list[tuple[Obj, Obj, str, str]]:
    pairs = []
    named = [(o, d) for o in scene.objects if (d := _describe(scene, o)) is not None]
    for i, (a, da) in enumerate(named):
        for b, db in named[i + 1:]:
            if np.hypot(a.x - b.x, a.y - b.y) >= FAR_APART:
                pairs.append((a, b, da, db))
    return pairs


def _same_color(scene: HardScene, rng: np.random.Generator) -> tuple[str, str, str] | None:
    """Two distant objects named by their (unique) shapes: are their colours the same?"""
    pairs = [(a, b) for a, b, da, db in _far_pairs(scene) if da == a.shape and db == b.shape]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    return (f"Do the {a.shape} and the {b.shape} have the same color?", "yes" if a.color == b.color else "no",
            "hard")


def _same_shape(scene: HardScene, rng: np.random.Generator) -> tuple[str, str, str] | None:
    """Two distant objects named by their (unique) colours: are their shapes the same?"""
    pairs = [(a, b) for a, b, da, db in _far_pairs(scene) if da == f"{a.color} object" and db == f"{b.color} object"]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    return (f"Do the {a.color} object and the {b.color} object have the same shape?",
            "yes" if a.shape == b.shape else "no", "hard")


def _left_of(scene: HardScene, rng: np.random.Generator) -> tuple[str, str, str] | None:
    """Two distant objects, each by its shortest unique description, at least 30 px apart horizontally."""
    pairs = [(a, b, da, db) for a, b, da, db in _far_pairs(scene) if abs(a.x - b.x) >= 30]
    if not pairs:
        return None
    a, b, da, db = pairs[int(rng.integers(len(pairs)))]
    if rng.random() < 0.5:
        a, b, da, db = b, a, db, da
    return f"Is the {da} to the left of the {db}?", "yes" if a.x < b.x else "no", "hard"


HARD_ASKERS = {"count": _count, "number": _number, "presence": _presence, "same_color": _same_color,
               "same_shape": _same_shape, "position": _left_of}


def make_hard_questions(scene: HardScene, rng: np.random.Generator, k: int) -> list[dict]:
    """Up to ``k`` questions of distinct types, in random order among those the scene answers:
    ``{"question", "answer", "type", "difficulty"}``."""
    out = []
    types = list(HARD_ASKERS)
    for index in rng.permutation(len(types)):
        if len(out) >= k:
            break
        qa = HARD_ASKERS[types[index]](scene, rng)
        if qa is not None:
            out.append({"question": qa[0], "answer": qa[1], "type": types[index], "difficulty": qa[2]})
    return out


__all__ = ["HARD_ASKERS", "HardScene", "make_hard_questions", "make_hard_scene", "number_box", "render_hard_scene"]
