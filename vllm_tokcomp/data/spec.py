"""The fixed vocabulary of the synthetic VQA task and answer normalisation (see docs/dataset.md)."""

from __future__ import annotations

import re

SPEC_VERSION = 1  # what the generator writes by default (the bundled models were trained on it)
SPEC_VERSIONS = (1, 2)
IMAGE_SIZE = 336

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {  # name -> RGB; saturated and far apart, never used for backgrounds
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
}
SIZES = {"small": 40, "large": 72}  # bounding-box side in pixels
SIDES = {**SIZES, "tiny": 24}  # every size name's side (the harder split also draws tiny objects)
BACKGROUNDS = ("plain", "gradient", "noise", "stripes")
MAX_OBJECTS = 5
DIGIT_BOX = 34  # white box holding one 7-segment digit
DIGIT_GLYPH = (14, 24)  # the digit's width and height in pixels (spec v2 draws exactly this; v1 one pixel more)
DIGIT_STROKE = 3  # segment thickness in pixels (v1: 4, PIL rectangles include their end pixel)

QUESTION_TYPES = ("color", "shape", "count", "position", "presence", "digit")
POSITIONS = ("left", "right", "top", "bottom")
YES_NO = ("yes", "no")
COUNTS = tuple(str(i) for i in range(MAX_OBJECTS + 1))
DIGITS = tuple(str(i) for i in range(10))
ANSWER_VOCAB = tuple(sorted(set(COLORS) | set(SHAPES) | set(POSITIONS) | set(YES_NO) | set(COUNTS) | set(DIGITS)))

_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9",
}
_SYNONYMS = {"grey": "gray", "violet": "purple", "cross": "cross", "plus": "cross", "box": "square"}


def plural(shape: str, spec_version: int = 1) -> str:
    """A shape's plural as the questions write it (v1 wrote ``crosss``, kept so that v1 data stay byte-identical)."""
    return f"{shape}es" if spec_version >= 2 and shape.endswith("s") else f"{shape}s"


def article(word: str, spec_version: int = 1) -> str:
    """``a`` or, from spec v2, ``an`` before a vowel (``an orange circle``)."""
    return "an" if spec_version >= 2 and word[:1] in "aeiou" else "a"


def normalize_answer(text: str) -> str:
    """Lower-case, keep the first word, strip punctuation, map number words to digits and a few synonyms."""
    text = text.strip().lower()
    text = re.sub(r"[^a-z0-9 ]+", " ", text)
    words = [w for w in text.split() if w not in ("a", "an", "the", "it", "is")]
    if not words:
        return ""
    word = words[0]
    if word.endswith("s") and word[:-1] in SHAPES:
        word = word[:-1]
    elif word.endswith("es") and word[:-2] in SHAPES:  # crosses
        word = word[:-2]
    word = _NUMBER_WORDS.get(word, word)
    return _SYNONYMS.get(word, word)
