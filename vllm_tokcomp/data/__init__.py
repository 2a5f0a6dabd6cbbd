"""Synthetic visual question answering data (spec: docs/dataset.md)."""

from .spec import ANSWER_VOCAB, QUESTION_TYPES, normalize_answer
from .synth import Scene, make_questions, make_scene, render_scene, scene_caption

__all__ = [
    "ANSWER_VOCAB",
    "QUESTION_TYPES",
    "Scene",
    "make_questions",
    "make_scene",
    "normalize_answer",
    "render_scene",
    "scene_caption",
]
