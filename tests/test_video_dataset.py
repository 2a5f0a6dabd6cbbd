"""The video variant of the synthetic VQA generator (``generate --videos``): determinism, layout, and answers that
the pixels bear out (which way an object moves is read back from its colour's centroid in the first and last
frames, not from the generator's own bookkeeping)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
from PIL import Image  # noqa: E402

from vllm_tokcomp.data import generate  # noqa: E402
from vllm_tokcomp.data.spec import ANSWER_VOCAB, COLORS, IMAGE_SIZE  # noqa: E402
from vllm_tokcomp.data.synth import _describe  # noqa: E402
from vllm_tokcomp.data.video import MOTIONS, TRAVEL, VIDEO_ANSWERS, VIDEO_QUESTION_TYPES, make_clip  # noqa: E402

CLIPS = 24


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("videos")
    assert generate.main([str(out), "--videos", "--test", str(CLIPS), "--questions-per-image", "3"]) == 0
    return out


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "test" / "questions.jsonl").read_text().splitlines()]


def test_same_seed_same_bytes_other_seed_other_clips(clips: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate.main([str(again), "--videos", "--test", str(CLIPS), "--questions-per-image", "3"])
    assert _digest(again) == _digest(clips)
    other = tmp_path / "other"
    generate.main([str(other), "--videos", "--seed", "1", "--test", "2", "--questions-per-image", "3"])
    assert _digest(other)["test/videos/000000/00.png"] != _digest(clips)["test/videos/000000/00.png"]


def test_layout_and_vocabulary(clips: Path) -> None:
    spec = json.loads((clips / "spec.json").read_text())
    assert spec["kind"] == "video" and spec["frames"] == 8 and spec["splits"]["test"]["videos"] == CLIPS
    records = _records(clips)
    assert len({r["video"] for r in records}) == CLIPS
    for record in records:
        frames = sorted((clips / "test" / record["video"]).glob("*.png"))
        assert len(frames) == record["frames"] == 8
        assert Image.open(frames[0]).size == (IMAGE_SIZE, IMAGE_SIZE)
        assert record["type"] in VIDEO_QUESTION_TYPES
        assert record["answer"] in set(ANSWER_VOCAB) | set(VIDEO_ANSWERS)
    assert {r["type"] for r in records} >= {"motion", "moving"}
    with pytest.raises(SystemExit):
        generate.main([str(clips / "bad"), "--videos", "--frames", "3", "--test", "1"])


def _centroid(frame: Path, color: str) -> np.ndarray | None:
    pixels = np.asarray(Image.open(frame).convert("RGB")).astype(int)
    ys, xs = np.nonzero((pixels == np.array(COLORS[color])).all(axis=-1))
    return None if len(xs) == 0 else np.array([xs.mean(), ys.mean()])


def test_motion_answers_agree_with_the_pixels(clips: Path) -> None:
    checked = {"motion": 0, "moving": 0}
    for record in _records(clips):
        if record["type"] not in checked:
            continue
        index = int(record["video"].split("/")[-1])
        scene = make_clip(generate.clip_rng(0, "test", index)).scene  # only to name the described object's colour
        desc = record["question"].split("the ", 1)[1].rsplit(" move", 1)[0]
        (obj,) = [o for o in scene.objects if _describe(scene, o) == desc]
        if sum(o.color == obj.color for o in scene.objects) != 1:
            continue  # its colour alone must identify it in the pixels
        folder = clips / "test" / record["video"]
        first, last = _centroid(folder / "00.png", obj.color), _centroid(folder / "07.png", obj.color)
        assert first is not None and last is not None, record
        shift = last - first
        if record["type"] == "moving":
            assert (np.abs(shift).max() > TRAVEL[0] / 2) == (record["answer"] == "yes"), (record, shift)
        else:
            ux, uy = MOTIONS[record["answer"]]
            along = shift @ np.array([ux, uy])
            assert along > TRAVEL[0] / 2 and abs(shift @ np.array([uy, ux])) < along / 4, (record, shift)
        checked[record["type"]] += 1
    assert checked["motion"] >= 8 and checked["moving"] >= 3, checked
