"""Scenes, rendering, questions and captions of the synthetic VQA task (spec: docs/dataset.md).

Everything is driven by a ``numpy.random.Generator``: the same generator state gives the same
scene, pixels and questions on every machine (no fonts, no system randomness).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .spec import (
    BACKGROUNDS,
    COLORS,
    DIGIT_BOX,
    DIGIT_GLYPH,
    DIGIT_STROKE,
    IMAGE_SIZE,
    MAX_OBJECTS,
    SHAPES,
    SIDES,
    SIZES,
    SPEC_VERSIONS,
    article,
    plural,
)

# Spec v2's rendering tolerances (docs/dataset.md, "Rendering variation"): what a renderer may vary and the spec
# still holds. Object sizes stay within these so that placement's 6 px gaps keep objects apart.
STROKE_TOLERANCE = (2, 3, 4, 5)
SIZE_TOLERANCE = (0.92, 1.08)
COLOR_TOLERANCE = 16
CROSS_PLURALS = ("crosses", "crosss")

CENTER = IMAGE_SIZE / 2
POSITION_MARGIN = 40  # left/right, top/bottom questions need the object this far from the centre line
RELATION_MARGIN = 30  # "which is further left" needs this horizontal gap


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    x: int  # centre
    y: int


@dataclass(frozen=True)
class Rendering:
    """How a spec-v2 scene is drawn and worded within the spec's tolerances (docs/dataset.md, "Rendering
    variation"); the default is the spec's exact drawing and wording."""

    stroke: int = DIGIT_STROKE  # the digit glyph's segment thickness in pixels
    size_scale: float = 1.0  # each object's box side is round(side * size_scale)
    color_offsets: tuple[tuple[int, int, int], ...] = ()  # per object (scene order): added to its colour, clipped
    cross_plural: str = "crosses"  # or v1's "crosss": both spellings occur in the wild

    def __post_init__(self) -> None:
        if self.stroke not in STROKE_TOLERANCE:
            raise ValueError(f"stroke must be one of {STROKE_TOLERANCE}, got {self.stroke!r}")
        if not SIZE_TOLERANCE[0] <= self.size_scale <= SIZE_TOLERANCE[1]:
            raise ValueError(f"size_scale must be in {SIZE_TOLERANCE}, got {self.size_scale!r}")
        if any(abs(c) > COLOR_TOLERANCE for offset in self.color_offsets for c in offset):
            raise ValueError(f"colour offsets must be within +-{COLOR_TOLERANCE}")
        if self.cross_plural not in CROSS_PLURALS:
            raise ValueError(f"cross_plural must be one of {CROSS_PLURALS}, got {self.cross_plural!r}")

    def to_dict(self) -> dict:
        return {"stroke": self.stroke, "size_scale": self.size_scale,
                "color_offsets": [list(o) for o in self.color_offsets], "cross_plural": self.cross_plural}


@dataclass(frozen=True)
class RenderingRange:
    """The renderings a split draws from, one per scene: digit strokes (uniform among ``strokes``), object size
    scale (uniform in ``1 +- size_jitter``), colour offsets (uniform integers in ``+-color_jitter`` per channel),
    and, with ``both_spellings``, ``crosses`` or ``crosss`` (one half each)."""

    strokes: tuple[int, ...] = (DIGIT_STROKE,)
    size_jitter: float = 0.0
    color_jitter: int = 0
    both_spellings: bool = False

    def __post_init__(self) -> None:
        if not self.strokes or any(t not in STROKE_TOLERANCE for t in self.strokes):
            raise ValueError(f"strokes must be within {STROKE_TOLERANCE}, got {self.strokes!r}")
        if not 0 <= self.size_jitter <= SIZE_TOLERANCE[1] - 1:
            raise ValueError(f"size_jitter must be in [0, {SIZE_TOLERANCE[1] - 1:.2f}], got {self.size_jitter!r}")
        if not 0 <= self.color_jitter <= COLOR_TOLERANCE:
            raise ValueError(f"color_jitter must be in [0, {COLOR_TOLERANCE}], got {self.color_jitter!r}")

    @property
    def varies(self) -> bool:
        return self != RenderingRange()

    def draw(self, rng: np.random.Generator, objects: int) -> Rendering:
        """One scene's rendering (``rng``: that scene's own rendering generator, apart from its scene generator so
        that every rendering range draws the same scenes and questions)."""
        stroke = self.strokes[int(rng.integers(len(self.strokes)))]
        scale = round(float(rng.uniform(1 - self.size_jitter, 1 + self.size_jitter)), 4) if self.size_jitter else 1.0
        offsets = tuple(tuple(int(v) for v in rng.integers(-self.color_jitter, self.color_jitter + 1, size=3))
                        for _ in range(objects)) if self.color_jitter else ()
        spelling = CROSS_PLURALS[int(rng.integers(2))] if self.both_spellings else CROSS_PLURALS[0]
        return Rendering(stroke, scale, offsets, spelling)


@dataclass
class Scene:
    background: str
    objects: list[Obj]
    digit: int | None = None
    digit_xy: tuple[int, int] | None = None  # top-left corner of the digit box
    bg_params: dict = field(default_factory=dict)
    spec_version: int = 1  # how it is drawn and worded (docs/dataset.md); the sampling is the same in every version
    rendering: Rendering = field(default_factory=Rendering)  # spec v2 only: variation within the tolerances

    def plural(self, shape: str) -> str:
        """A shape's plural as this scene's questions write it."""
        if self.spec_version >= 2 and shape == "cross":
            return self.rendering.cross_plural
        return plural(shape, self.spec_version)


# ----------------------------------------------------------------------------- scenes
def _muted_color(rng: np.random.Generator) -> tuple[int, int, int]:
    level = int(rng.integers(70, 200))
    return tuple(int(np.clip(level + rng.integers(-18, 19), 0, 255)) for _ in range(3))


def _free(boxes: list[tuple[float, float, float]], x: float, y: float, r: float) -> bool:
    return all(max(abs(x - bx), abs(y - by)) > r + br + 6 for bx, by, br in boxes)


def make_scene(rng: np.random.Generator, *, digit: bool | None = None, spec_version: int = 1) -> Scene:
    """A random scene; ``digit`` forces (True) or forbids (False) the fine-detail digit box. Every spec version
    draws the same scene from the same generator state; ``spec_version`` decides how it is rendered and worded."""
    if spec_version not in SPEC_VERSIONS:
        raise ValueError(f"spec_version must be one of {SPEC_VERSIONS}, got {spec_version!r}")
    if digit is None:
        digit = bool(rng.random() < 0.25)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    bg = {"c1": _muted_color(rng), "c2": _muted_color(rng), "dir": int(rng.integers(4)),
          "period": int(rng.integers(6, 16)), "noise_seed": int(rng.integers(2**31))}
    boxes: list[tuple[float, float, float]] = []
    digit_value, digit_xy = None, None
    if digit:
        half = DIGIT_BOX / 2
        x, y = rng.uniform(half + 4, IMAGE_SIZE - half - 4, size=2)
        boxes.append((x, y, half))
        digit_value, digit_xy = int(rng.integers(10)), (int(x - half), int(y - half))
    n = int(rng.integers(1, (3 if digit else MAX_OBJECTS) + 1))
    objects: list[Obj] = []
    for _ in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        r = SIZES[size] / 2
        for _attempt in range(50):
            x, y = rng.uniform(r + 4, IMAGE_SIZE - r - 4, size=2)
            if _free(boxes, x, y, r):
                boxes.append((x, y, r))
                objects.append(Obj(shape, color, size, int(x), int(y)))
                break
    return Scene(background, objects, digit_value, digit_xy, bg, spec_version)


# ----------------------------------------------------------------------------- rendering
_SEGMENTS = {  # 7-segment layout: a b c d e f g
    0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc",
    5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}


def _fill_box(draw: ImageDraw.ImageDraw, x0: int, y0: int, x1: int, y1: int, fill) -> None:  # noqa: ANN001
    """The half-open pixel box ``[x0, x1) x [y0, y1)`` (PIL's rectangle includes its end pixel)."""
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)


def draw_glyph_v2(draw: ImageDraw.ImageDraw, left: int, top: int, value: int, stroke: int = DIGIT_STROKE) -> None:
    """Spec v2: a ``DIGIT_GLYPH`` (14 x 24 px) seven-segment glyph of ``stroke`` px strokes (the spec's 3 unless a
    rendering varies it) with its top-left corner at ``(left, top)``; segments are half-open boxes, the middle one
    centred on the middle row."""
    (w, h), t = DIGIT_GLYPH, stroke
    mid = top + h // 2
    seg = {
        "a": (left, top, left + w, top + t), "g": (left, mid - t // 2, left + w, mid - t // 2 + t),
        "d": (left, top + h - t, left + w, top + h), "f": (left, top, left + t, mid),
        "b": (left + w - t, top, left + w, mid), "e": (left, mid, left + t, top + h),
        "c": (left + w - t, mid, left + w, top + h),
    }
    for name in _SEGMENTS[value]:
        _fill_box(draw, *seg[name], (0, 0, 0))


def _draw_digit_v2(draw: ImageDraw.ImageDraw, x0: int, y0: int, value: int, stroke: int = DIGIT_STROKE) -> None:
    """Spec v2: the white box with one :func:`draw_glyph_v2` glyph centred in it."""
    _fill_box(draw, x0, y0, x0 + DIGIT_BOX, y0 + DIGIT_BOX, (255, 255, 255))
    w, h = DIGIT_GLYPH
    draw_glyph_v2(draw, x0 + (DIGIT_BOX - w) // 2, y0 + (DIGIT_BOX - h) // 2, value, stroke)


def _draw_digit(draw: ImageDraw.ImageDraw, x0: int, y0: int, value: int) -> None:
    draw.rectangle([x0, y0, x0 + DIGIT_BOX - 1, y0 + DIGIT_BOX - 1], fill=(255, 255, 255))
    w, h, t = 14, 24, 3
    left, top = x0 + (DIGIT_BOX - w) // 2, y0 + (DIGIT_BOX - h) // 2
    mid = top + h // 2
    seg = {
        "a": (left, top, left + w, top + t), "g": (left, mid - t // 2, left + w, mid - t // 2 + t),
        "d": (left, top + h - t, left + w, top + h), "f": (left, top, left + t, mid),
        "b": (left + w - t, top, left + w, mid), "e": (left, mid, left + t, top + h),
        "c": (left + w - t, mid, left + w, top + h),
    }
    for name in _SEGMENTS[value]:
        draw.rectangle(seg[name], fill=(0, 0, 0))


def _background(scene: Scene) -> np.ndarray:
    p = scene.bg_params
    c1, c2 = np.array(p["c1"], np.float32), np.array(p["c2"], np.float32)
    if scene.background == "plain":
        return np.broadcast_to(c1, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    coord = (xs, ys, (xs + ys) / 2, (xs - ys) / 2 + CENTER)[p["dir"]]
    if scene.background == "gradient":
        t = (coord / IMAGE_SIZE)[..., None]
        return c1 * (1 - t) + c2 * t
    if scene.background == "stripes":
        on = ((coord // p["period"]) % 2 == 0)[..., None]
        return np.where(on, c1, c2)
    noise = np.random.default_rng(p["noise_seed"]).normal(0, 28, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return c1 + noise.astype(np.float32)


def _draw_object_v2(draw: ImageDraw.ImageDraw, obj: Obj, fill: tuple[int, int, int] | int,
                    size_scale: float = 1.0) -> None:
    """Spec v2: every shape fills the half-open box ``[x - s//2, x - s//2 + s)`` (same for y) of its size ``s``
    (``round(side * size_scale)``): the inscribed circle, the whole square, an upright triangle (apex at the top
    centre, base the bottom row), an upright plus whose arms are ``round(s / 3)`` px wide and offset
    ``(s - width) // 2`` from the box's edge."""
    size = SIDES[obj.size] if size_scale == 1.0 else round(SIDES[obj.size] * size_scale)
    x0, y0 = obj.x - size // 2, obj.y - size // 2
    x1, y1 = x0 + size, y0 + size
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif obj.shape == "square":
        _fill_box(draw, x0, y0, x1, y1, fill)
    elif obj.shape == "triangle":
        draw.polygon([(x0 + (size - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    else:  # cross
        arm = round(size / 3)
        offset = (size - arm) // 2
        _fill_box(draw, x0, y0 + offset, x1, y0 + offset + arm, fill)
        _fill_box(draw, x0 + offset, y0, x0 + offset + arm, y1, fill)


def _draw_object(draw: ImageDraw.ImageDraw, obj: Obj, fill: tuple[int, int, int] | int, spec_version: int = 1,
                 size_scale: float = 1.0) -> None:
    if spec_version >= 2:
        _draw_object_v2(draw, obj, fill, size_scale)
        return
    r = SIZES[obj.size] // 2
    x, y = obj.x, obj.y
    if obj.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif obj.shape == "square":
        s = int(r * 0.85)
        draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    else:  # cross
        t = max(r // 3, 4)
        draw.rectangle([x - r, y - t, x + r, y + t], fill=fill)
        draw.rectangle([x - t, y - r, x + t, y + r], fill=fill)


def render_scene(scene: Scene) -> Image.Image:
    """Pixels of a scene: 336 x 336 RGB."""
    pixels = np.clip(_background(scene), 0, 255).round().astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    rendering = scene.rendering
    for index, obj in enumerate(scene.objects):
        _draw_object(draw, obj, object_color(scene, index), scene.spec_version, rendering.size_scale)
    if scene.digit is not None:
        if scene.spec_version >= 2:
            _draw_digit_v2(draw, *scene.digit_xy, scene.digit, rendering.stroke)
        else:
            _draw_digit(draw, *scene.digit_xy, scene.digit)
    return image


def object_color(scene: Scene, index: int) -> tuple[int, int, int]:
    """The RGB an object is drawn in: its colour's, plus the rendering's offset for it (clipped)."""
    base = COLORS[scene.objects[index].color]
    offsets = scene.rendering.color_offsets
    if index >= len(offsets):
        return base
    return tuple(int(min(255, max(0, c + o))) for c, o in zip(base, offsets[index], strict=True))


DIGIT_LABEL = 255


def label_map(scene: Scene) -> np.ndarray:
    """Which object covers each pixel (uint8, 336 x 336): 0 background, ``i + 1`` for
    ``scene.objects[i]``, :data:`DIGIT_LABEL` for the digit box. Same geometry as :func:`render_scene`;
    used as dense supervision when pre-training the vision tower."""
    image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(image)
    for i, obj in enumerate(scene.objects):
        _draw_object(draw, obj, i + 1, scene.spec_version, scene.rendering.size_scale)
    if scene.digit is not None:
        x0, y0 = scene.digit_xy
        draw.rectangle([x0, y0, x0 + DIGIT_BOX - 1, y0 + DIGIT_BOX - 1], fill=DIGIT_LABEL)
    return np.asarray(image)


# ----------------------------------------------------------------------------- questions
def _unique(objects: list[Obj], key) -> list[Obj]:  # noqa: ANN001
    values = [key(o) for o in objects]
    return [o for o, v in zip(objects, values, strict=True) if values.count(v) == 1]


def _describe(scene: Scene, obj: Obj) -> str | None:
    """Shortest unique description of an object: 'circle', 'red object' or 'red circle'."""
    if obj in _unique(scene.objects, lambda o: o.shape):
        return obj.shape
    if obj in _unique(scene.objects, lambda o: o.color):
        return f"{obj.color} object"
    if obj in _unique(scene.objects, lambda o: (o.color, o.shape)):
        return f"{obj.color} {obj.shape}"
    return None


def _ask_color(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    cands = _unique(scene.objects, lambda o: o.shape)
    if not cands:
        return None
    obj = cands[int(rng.integers(len(cands)))]
    return f"What color is the {obj.shape}?", obj.color


def _ask_shape(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    cands = _unique(scene.objects, lambda o: o.color)
    if not cands:
        return None
    obj = cands[int(rng.integers(len(cands)))]
    return f"What shape is the {obj.color} object?", obj.shape


def _ask_count(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    # Mostly about a kind that occurs (answers 1..5), sometimes about any kind (often 0).
    present = rng.random() < 0.8
    if rng.random() < 0.5:
        shapes = sorted({o.shape for o in scene.objects}) if present and scene.objects else list(SHAPES)
        shape = shapes[int(rng.integers(len(shapes)))]
        count = sum(o.shape == shape for o in scene.objects)
        return f"How many {scene.plural(shape)} are there?", str(count)
    colors = sorted({o.color for o in scene.objects}) if present and scene.objects else list(COLORS)
    color = colors[int(rng.integers(len(colors)))]
    return f"How many {color} objects are there?", str(sum(o.color == color for o in scene.objects))


def _ask_position(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    forms = []
    for obj in scene.objects:
        desc = _describe(scene, obj)
        if desc is None:
            continue
        if abs(obj.x - CENTER) >= POSITION_MARGIN:
            forms.append((f"Is the {desc} on the left or the right?", "left" if obj.x < CENTER else "right"))
        if abs(obj.y - CENTER) >= POSITION_MARGIN:
            forms.append((f"Is the {desc} at the top or the bottom?", "top" if obj.y < CENTER else "bottom"))
    uniq = _unique(scene.objects, lambda o: o.shape)
    for i, a in enumerate(uniq):
        for b in uniq[i + 1:]:
            if abs(a.x - b.x) >= RELATION_MARGIN:
                first, second = (a, b) if rng.random() < 0.5 else (b, a)
                answer = a.shape if a.x < b.x else b.shape
                forms.append((f"Which is further left, the {first.shape} or the {second.shape}?", answer))
    if not forms:
        return None
    return forms[int(rng.integers(len(forms)))]


def _ask_presence(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5 and present:
        color, shape = sorted(present)[int(rng.integers(len(present)))]
        return f"Is there {article(color, scene.spec_version)} {color} {shape}?", "yes"
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    # POPE-style negatives: half adversarial (colour or shape occurs in the scene), half random.
    adversarial = [(c, s) for c, s in absent if any(o.color == c or o.shape == s for o in scene.objects)]
    pool = adversarial if adversarial and rng.random() < 0.5 else absent
    color, shape = pool[int(rng.integers(len(pool)))]
    return f"Is there {article(color, scene.spec_version)} {color} {shape}?", "no"


def _ask_digit(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    if scene.digit is None:
        return None
    return "What digit is written in the white box?", str(scene.digit)


ASKERS = {
    "color": _ask_color, "shape": _ask_shape, "count": _ask_count,
    "position": _ask_position, "presence": _ask_presence, "digit": _ask_digit,
}


def make_questions(scene: Scene, rng: np.random.Generator, k: int) -> list[dict]:
    """Up to ``k`` questions of distinct types: ``{"question", "answer", "type"}``.

    A scene with a digit box always gets the digit question first; the other types are drawn
    uniformly among those the scene can answer unambiguously.
    """
    out: list[dict] = []
    types = [t for t in ASKERS if t != "digit"]
    order = [types[i] for i in rng.permutation(len(types))]
    if scene.digit is not None:
        order.insert(0, "digit")
    for qtype in order:
        if len(out) >= k:
            break
        qa = ASKERS[qtype](scene, rng)
        if qa is not None:
            out.append({"question": qa[0], "answer": qa[1], "type": qtype})
    return out


# ----------------------------------------------------------------------------- captions
def _third(v: float, words: tuple[str, str, str]) -> str:
    return words[0] if v < IMAGE_SIZE / 3 else words[2] if v >= 2 * IMAGE_SIZE / 3 else words[1]


def scene_caption(scene: Scene) -> str:
    """A full description used for the contrastive pre-training of the vision tower."""
    parts = [f"{scene.background} background"]
    if scene.digit is not None:
        parts.append(f"digit {scene.digit}")
    for o in sorted(scene.objects, key=lambda o: (o.x, o.y)):
        where = f"{_third(o.y, ('top', 'middle', 'bottom'))} {_third(o.x, ('left', 'center', 'right'))}"
        parts.append(f"{o.size} {o.color} {o.shape} {where}")
    return " . ".join(parts)
