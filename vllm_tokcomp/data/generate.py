"""Write a synthetic VQA data set: ``python -m vllm_tokcomp.data.generate OUT --seed 0 --train N --val N --test N``.

Layout (spec: docs/dataset.md)::

    OUT/spec.json                     # generator version, seed, counts
    OUT/<split>/questions.jsonl       # {"id", "image", "question", "answer", "type"} per line
    OUT/<split>/images/000000.png     # 336 x 336 RGB

``image`` is relative to the split folder, so every split folder is a data set on its own.
N counts images; each image gets ``--questions-per-image`` questions of distinct types.

With ``--spec-version 2``, ``--strokes``, ``--size-jitter``, ``--color-jitter`` and ``--both-spellings`` vary how each
scene is drawn and worded within the spec's tolerances (docs/dataset.md, "Rendering variation"); the scenes,
questions and answers stay those of the same split without variation, and each record carries its ``rendering``.

``--videos`` writes moving-shape clips instead (:mod:`.video`): ``OUT/<split>/videos/000000/00.png`` ... (one
336 x 336 frame per file, ``--frames`` of them) and records ``{"id", "video", "frames", "question", "answer",
"type"}`` with ``video`` the clip's folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from .hard import make_hard_questions, make_hard_scene, render_hard_scene
from .spec import SPEC_VERSION, SPEC_VERSIONS
from .synth import RenderingRange, make_questions, make_scene, render_scene
from .video import FRAMES, make_clip, make_video_questions, render_clip

# "hard_train": the stream the trainers draw harder-split training scenes from; "v1_train": the stream that decides
# which spec-v2 training images are drawn by spec v1 instead (neither is written as a split)
SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "hard": 5, "hard_train": 6, "v1_train": 7}


STREAM = 1  # the generator streams' first key; every spec version draws the same scenes (v2 renders them anew)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of every other image and of the split sizes."""
    return np.random.default_rng([STREAM, seed, SPLIT_IDS.get(split, 3), index])


def rendering_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image's rendering variation, apart from its scene's (:func:`scene_rng`): every
    rendering range draws the same scenes and questions."""
    return np.random.default_rng([STREAM, seed, SPLIT_IDS.get(split, 3), index, 2])


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one clip, independent of every image's (:func:`scene_rng`) and of every other clip's."""
    return np.random.default_rng([STREAM, seed, SPLIT_IDS.get(split, 3), index, 1])


def generate_video_split(out: Path, split: str, n: int, *, seed: int, questions_per_clip: int,
                         frames: int = FRAMES) -> int:
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(folder / "questions.jsonl", "w") as handle:
        for index in range(n):
            rng = clip_rng(seed, split, index)
            clip = make_clip(rng, frames)
            rel = f"videos/{index:06d}"
            (folder / rel).mkdir(parents=True, exist_ok=True)
            for k, frame in enumerate(render_clip(clip)):
                frame.save(folder / rel / f"{k:02d}.png", optimize=False, compress_level=6)
            for q_index, qa in enumerate(make_video_questions(clip, rng, questions_per_clip)):
                record = {"id": f"{split}-v{index:06d}-{q_index}", "video": rel, "frames": frames, **qa}
                handle.write(json.dumps(record) + "\n")
                count += 1
    return count


def generate_split(out: Path, split: str, n: int, *, seed: int, questions_per_image: int,
                   spec_version: int = SPEC_VERSION, renderings: RenderingRange | None = None) -> int:
    if renderings is not None and renderings.varies and spec_version < 2:
        raise ValueError("rendering variation is defined for spec version 2")
    folder = out / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    count = 0
    with open(folder / "questions.jsonl", "w") as handle:
        for index in range(n):
            rng = scene_rng(seed, split, index)
            scene = make_scene(rng, spec_version=spec_version)
            extra = {}
            if renderings is not None and renderings.varies:
                scene.rendering = renderings.draw(rendering_rng(seed, split, index), len(scene.objects))
                extra["rendering"] = scene.rendering.to_dict()
            rel = f"images/{index:06d}.png"
            render_scene(scene).save(folder / rel, optimize=False, compress_level=6)
            for q_index, qa in enumerate(make_questions(scene, rng, questions_per_image)):
                record = {"id": f"{split}-{index:06d}-{q_index}", "image": rel, **qa, **extra}
                handle.write(json.dumps(record) + "\n")
                count += 1
    return count


def generate_hard_split(out: Path, n: int, *, seed: int, questions_per_image: int) -> int:
    """The harder split (``data/hard.py``, spec v2 drawing): ``OUT/hard/``, questions with a ``difficulty``."""
    folder = out / "hard"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    count = 0
    with open(folder / "questions.jsonl", "w") as handle:
        for index in range(n):
            rng = scene_rng(seed, "hard", index)
            scene = make_hard_scene(rng)
            rel = f"images/{index:06d}.png"
            render_hard_scene(scene).save(folder / rel, optimize=False, compress_level=6)
            for q_index, qa in enumerate(make_hard_questions(scene, rng, questions_per_image)):
                handle.write(json.dumps({"id": f"hard-{index:06d}-{q_index}", "image": rel, **qa}) + "\n")
                count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_tokcomp.data.generate", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=0, help="number of training images (clips with --videos)")
    parser.add_argument("--val", type=int, default=0, help="number of validation images (clips)")
    parser.add_argument("--test", type=int, default=0, help="number of test images (clips)")
    parser.add_argument("--hard", type=int, default=0,
                        help="number of images of the harder split (dense scenes, multi-digit numbers; spec v2)")
    parser.add_argument("--questions-per-image", type=int, default=2, help="(per clip with --videos)")
    parser.add_argument("--videos", action="store_true", help="moving-shape clips instead of images")
    parser.add_argument("--frames", type=int, default=FRAMES, help="frames per clip (even)")
    parser.add_argument("--spec-version", type=int, choices=SPEC_VERSIONS, default=SPEC_VERSION,
                        help="images: how scenes are drawn and worded (the same scenes in every version; "
                             "docs/dataset.md); clips are spec v1")
    parser.add_argument("--strokes", default=None,
                        help="spec v2: digit stroke widths drawn per image, a comma list within 2-5 (default 3)")
    parser.add_argument("--size-jitter", type=float, default=0.0,
                        help="spec v2: object box sides scaled by a factor uniform in 1 +- this (at most 0.08)")
    parser.add_argument("--color-jitter", type=int, default=0,
                        help="spec v2: per-object colour offsets, uniform integers in +- this per channel (<= 16)")
    parser.add_argument("--both-spellings", action="store_true",
                        help="spec v2: count questions write 'crosses' or 'crosss' (half each)")
    args = parser.parse_args(argv)
    if args.videos and (args.frames < 2 or args.frames % 2):
        parser.error("--frames must be an even number >= 2")
    try:
        strokes = tuple(int(t) for t in args.strokes.split(",")) if args.strokes else RenderingRange().strokes
        renderings = RenderingRange(strokes, args.size_jitter, args.color_jitter, args.both_spellings)
    except ValueError as error:
        parser.error(f"rendering variation: {error}")
    if renderings.varies and (args.spec_version < 2 or args.videos):
        parser.error("--strokes, --size-jitter, --color-jitter and --both-spellings need --spec-version 2 images")
    counts = {}
    for split in ("train", "val", "test"):
        n = getattr(args, split)
        if n > 0 and args.videos:
            counts[split] = {"videos": n, "questions": generate_video_split(
                args.out, split, n, seed=args.seed, questions_per_clip=args.questions_per_image, frames=args.frames)}
        elif n > 0:
            counts[split] = {
                "images": n,
                "questions": generate_split(
                    args.out, split, n, seed=args.seed, questions_per_image=args.questions_per_image,
                    spec_version=args.spec_version, renderings=renderings,
                ),
            }
    if args.hard > 0 and not args.videos:
        counts["hard"] = {"images": args.hard, "spec_version": 2, "questions": generate_hard_split(
            args.out, args.hard, seed=args.seed, questions_per_image=args.questions_per_image)}
    spec = {"spec_version": 1 if args.videos else args.spec_version, "seed": args.seed,
            "questions_per_image": args.questions_per_image,
            "splits": counts}
    if args.videos:
        spec.update(kind="video", frames=args.frames)
    if renderings.varies:
        spec["renderings"] = dataclasses.asdict(renderings)
    (args.out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    print(json.dumps(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
