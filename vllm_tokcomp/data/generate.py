"""Write a synthetic VQA data set: ``python -m vllm_tokcomp.data.generate OUT --seed 0 --train N --val N --test N``.

Layout (spec: docs/dataset.md)::

    OUT/spec.json                     # generator version, seed, counts
    OUT/<split>/questions.jsonl       # {"id", "image", "question", "answer", "type"} per line
    OUT/<split>/images/000000.png     # 336 x 336 RGB

``image`` is relative to the split folder, so every split folder is a data set on its own.
N counts images; each image gets ``--questions-per-image`` questions of distinct types.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .spec import SPEC_VERSION
from .synth import make_questions, make_scene, render_scene

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of every other image and of the split sizes."""
    return np.random.default_rng([SPEC_VERSION, seed, SPLIT_IDS.get(split, 3), index])


def generate_split(out: Path, split: str, n: int, *, seed: int, questions_per_image: int) -> int:
    folder = out / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    count = 0
    with open(folder / "questions.jsonl", "w") as handle:
        for index in range(n):
            rng = scene_rng(seed, split, index)
            scene = make_scene(rng)
            rel = f"images/{index:06d}.png"
            render_scene(scene).save(folder / rel, optimize=False, compress_level=6)
            for q_index, qa in enumerate(make_questions(scene, rng, questions_per_image)):
                record = {"id": f"{split}-{index:06d}-{q_index}", "image": rel, **qa}
                handle.write(json.dumps(record) + "\n")
                count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_tokcomp.data.generate", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=0, help="number of training images")
    parser.add_argument("--val", type=int, default=0, help="number of validation images")
    parser.add_argument("--test", type=int, default=0, help="number of test images")
    parser.add_argument("--questions-per-image", type=int, default=2)
    args = parser.parse_args(argv)
    counts = {}
    for split in ("train", "val", "test"):
        n = getattr(args, split)
        if n > 0:
            counts[split] = {
                "images": n,
                "questions": generate_split(
                    args.out, split, n, seed=args.seed, questions_per_image=args.questions_per_image
                ),
            }
    spec = {"spec_version": SPEC_VERSION, "seed": args.seed, "questions_per_image": args.questions_per_image,
            "splits": counts}
    (args.out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    print(json.dumps(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
