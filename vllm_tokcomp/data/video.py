"""Moving-shape clips and their questions: the video variant of the synthetic VQA task (docs/dataset.md, "Videos").

A clip is a scene of :mod:`.synth` (no digit box) in which one or two objects travel in a straight line, at constant
speed, from the first frame to the last; the others stay where they are. Questions ask which way an object moves,
whether it moves at all, and the still-image questions whose answer does not change over the clip (colour, shape,
count, presence). Everything follows from the ``numpy.random.Generator`` given, as for images.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from .spec import IMAGE_SIZE, SIZES
from .synth import ASKERS, Scene, _describe, _free, make_scene, render_scene

FRAMES = 8  # even: Qwen2-VL's temporal patch is 2 frames
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TRAVEL = (96, 145)  # pixels from the first frame to the last, drawn in [low, high)
EDGE = 4  # a moving object stays this far inside the frame, like a placed one
STILL_TYPES = ("color", "shape", "count", "presence")  # image questions whose answer holds over the whole clip
VIDEO_QUESTION_TYPES = ("motion", "moving", *STILL_TYPES)
VIDEO_ANSWERS = tuple(MOTIONS)


@dataclass(frozen=True)
class Clip:
    scene: Scene  # the objects at their first-frame positions
    moves: tuple[tuple[int, int], ...]  # per object: (dx, dy) from the first frame to the last, (0, 0) if still
    frames: int = FRAMES

    def direction(self, index: int) -> str | None:
        dx, dy = self.moves[index]
        if (dx, dy) == (0, 0):
            return None
        return next(name for name, (ux, uy) in MOTIONS.items() if (np.sign(dx), np.sign(dy)) == (ux, uy))


def _feasible(x: int, y: int, radius: float, travel: int) -> list[str]:
    low, high = radius + EDGE, IMAGE_SIZE - radius - EDGE
    return [name for name, (ux, uy) in MOTIONS.items()
            if low <= x + ux * travel <= high and low <= y + uy * travel <= high]


def make_clip(rng: np.random.Generator, frames: int = FRAMES) -> Clip:
    """A random clip: a scene, then one object (two with probability 0.4, when there are two) set in motion in a
    direction that keeps it inside the frame and ends clear of every other object, so that it is visible in the
    last frame (it may pass over or under others on the way); an object with no such direction stays still."""
    if frames < 2 or frames % 2:
        raise ValueError(f"frames must be an even number >= 2, got {frames}")
    scene = make_scene(rng, digit=False)
    n = len(scene.objects)
    movers = rng.permutation(n)[: min(n, 1 + int(rng.random() < 0.4))]
    moves = [(0, 0)] * n
    ends = [(o.x, o.y, SIZES[o.size] / 2) for o in scene.objects]  # where each object is in the last frame
    for index in sorted(int(i) for i in movers):
        obj = scene.objects[index]
        radius = SIZES[obj.size] / 2
        travel = int(rng.integers(*TRAVEL))
        others = ends[:index] + ends[index + 1:]
        options = [name for name in _feasible(obj.x, obj.y, radius, travel)
                   if _free(others, obj.x + MOTIONS[name][0] * travel, obj.y + MOTIONS[name][1] * travel, radius)]
        if options:
            ux, uy = MOTIONS[options[int(rng.integers(len(options)))]]
            moves[index] = (ux * travel, uy * travel)
            ends[index] = (obj.x + ux * travel, obj.y + uy * travel, radius)
    return Clip(scene, tuple(moves), frames)


def scene_at(clip: Clip, frame: int) -> Scene:
    """The clip's scene in ``frame`` (0 .. frames - 1): every object ``frame / (frames - 1)`` of its way along."""
    t = frame / (clip.frames - 1)
    objects = [replace(o, x=o.x + round(t * dx), y=o.y + round(t * dy))
               for o, (dx, dy) in zip(clip.scene.objects, clip.moves, strict=True)]
    return replace(clip.scene, objects=objects)


def render_clip(clip: Clip) -> list[Image.Image]:
    """The clip's frames, 336 x 336 RGB each."""
    return [render_scene(scene_at(clip, k)) for k in range(clip.frames)]


def _ask_motion(clip: Clip, rng: np.random.Generator) -> tuple[str, str] | None:
    forms = [(f"Which way does the {desc} move?", clip.direction(i))
             for i, obj in enumerate(clip.scene.objects)
             if clip.direction(i) is not None and (desc := _describe(clip.scene, obj)) is not None]
    return forms[int(rng.integers(len(forms)))] if forms else None


def _ask_moving(clip: Clip, rng: np.random.Generator) -> tuple[str, str] | None:
    described = [(i, desc) for i, obj in enumerate(clip.scene.objects)
                 if (desc := _describe(clip.scene, obj)) is not None]
    moving = [(i, d) for i, d in described if clip.direction(i) is not None]
    still = [(i, d) for i, d in described if clip.direction(i) is None]
    pool = moving if moving and (not still or rng.random() < 0.5) else still
    if not pool:
        return None
    index, desc = pool[int(rng.integers(len(pool)))]
    return f"Does the {desc} move?", "yes" if clip.direction(index) is not None else "no"


def make_video_questions(clip: Clip, rng: np.random.Generator, k: int) -> list[dict]:
    """Up to ``k`` questions of distinct types (``{"question", "answer", "type"}``): a motion question first when
    the clip has a describable mover, then the other types in random order."""
    askers = {"motion": lambda r: _ask_motion(clip, r), "moving": lambda r: _ask_moving(clip, r),
              **{t: (lambda r, ask=ASKERS[t]: ask(clip.scene, r)) for t in STILL_TYPES}}
    rest = [t for t in VIDEO_QUESTION_TYPES if t != "motion"]
    order = ["motion", *(rest[i] for i in rng.permutation(len(rest)))]
    out: list[dict] = []
    for qtype in order:
        if len(out) >= k:
            break
        qa = askers[qtype](rng)
        if qa is not None:
            out.append({"question": qa[0], "answer": qa[1], "type": qtype})
    return out
