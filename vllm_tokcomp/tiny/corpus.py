"""A small, deterministic English corpus for training the tiny model's tokenizer.

The text is generated from fixed word lists and sentence templates with a private
linear congruential generator, so it is byte-identical on every Python version and
platform (no ``random`` module, no hashing, no locale).
"""

from __future__ import annotations

from collections.abc import Iterator

# fmt: off
COLOURS = (
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white",
    "gray", "grey", "cyan", "magenta", "teal", "navy", "olive", "maroon", "gold", "silver",
    "beige", "violet", "indigo", "turquoise", "lime", "crimson", "dark", "light", "pale", "bright",
)
SHAPES = (
    "circle", "square", "triangle", "rectangle", "star", "hexagon", "pentagon", "octagon", "oval",
    "diamond", "heart", "cross", "arrow", "line", "dot", "ring", "cube", "sphere", "cone", "cylinder",
    "pyramid", "spiral", "crescent", "trapezoid", "rhombus", "ellipse", "stripe", "grid", "wave", "blob",
)
OBJECTS = (
    "cat", "dog", "bird", "fish", "horse", "cow", "sheep", "duck", "rabbit", "mouse", "lion", "tiger",
    "bear", "elephant", "giraffe", "zebra", "monkey", "snake", "frog", "turtle", "car", "bus", "truck",
    "bicycle", "boat", "train", "plane", "house", "tree", "flower", "table", "chair", "cup", "bottle",
    "book", "phone", "laptop", "clock", "lamp", "window", "door", "ball", "box", "bag", "hat", "shoe",
    "apple", "banana", "orange", "pizza", "cake", "sandwich", "person", "man", "woman", "child", "boy",
    "girl", "road", "street", "sign", "bridge", "river", "mountain", "beach", "cloud", "sun", "moon",
    "kite", "umbrella", "bench", "sofa", "bed", "television", "keyboard", "computer", "camera", "guitar",
    "piano", "key", "pen", "pencil", "paper", "plate", "bowl", "fork", "knife", "spoon", "glass", "vase",
    "wall", "floor", "roof", "garden", "field", "forest", "lake", "sky", "grass", "sand", "rock", "stone",
)
MATERIALS = (
    "wooden", "metal", "plastic", "glass", "paper", "stone", "fabric", "leather", "rubber", "ceramic",
)
SIZES = ("small", "large", "tiny", "huge", "big", "little", "medium", "tall", "short", "wide", "narrow", "thin")
TEXTURES = (
    "striped", "dotted", "plain", "shiny", "matte", "smooth", "rough", "checkered", "blurry", "sharp",
    "faded", "noisy", "clean", "dirty", "soft", "hard", "empty", "full", "broken", "new", "old",
)
POSITIONS = (
    "top left", "top right", "bottom left", "bottom right", "center", "middle", "left side",
    "right side", "top edge", "bottom edge", "upper half", "lower half", "corner", "background",
    "foreground", "top", "bottom",
)
RELATIONS = (
    "above", "below", "next to", "to the left of", "to the right of", "behind", "in front of", "inside",
    "on top of", "under", "near", "far from", "between", "around", "beside", "across from", "over",
)
VERBS = (
    "is", "are", "was", "were", "sits", "stands", "lies", "rests", "moves", "runs", "walks", "jumps",
    "flies", "swims", "holds", "carries", "touches", "covers", "faces", "points", "looks", "appears",
    "seems", "shows", "contains", "includes", "has", "fills", "crosses", "overlaps", "surrounds",
    "follows", "leads", "opens", "closes", "turns", "falls", "grows", "shines", "waits",
)
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
    "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand",
)
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "last")
QUESTIONS = (
    "What is in the image?",
    "Describe the image.",
    "Describe the image in detail.",
    "What do you see?",
    "What colour is the {obj}?",
    "What shape is in the {pos}?",
    "How many {shape}s are there?",
    "How many {obj}s can you see?",
    "Where is the {col} {shape}?",
    "Is there a {obj} in the picture?",
    "Which object is {rel} the {obj}?",
    "Can you count the {shape}s?",
    "What is the {ord} object from the left?",
    "Is the {shape} {col} or {col2}?",
    "What number is written on the {obj}?",
    "Please answer with a single word.",
    "Answer the question using a short phrase.",
    "What is happening in this picture?",
    "Give a short caption for the photo.",
    "What text appears in the image?",
)
ANSWER_TEMPLATES = (
    "The image shows a {size} {col} {shape} in the {pos}.",
    "There are {n} {shape}s in the image.",
    "There is {nw} {obj} {rel} the {col} {shape}.",
    "I can see a {mat} {obj} and a {size} {col} {shape}.",
    "The {col} {shape} {verb} {rel} the {obj}.",
    "A {tex} {col} {obj} {verb} in the {pos} of the picture.",
    "In the {pos}, a {size} {obj} {verb} {rel} a {col2} {shape}.",
    "The {ord} {shape} is {col} and the next one is {col2}.",
    "Yes, there is a {col} {obj} near the {pos}.",
    "No, I do not see any {obj} in this image.",
    "The number {n} is written in {col} on the {obj}.",
    "It looks like {nw} {size} {shape}s arranged in a {shape2} pattern.",
    "The {obj} is {col}, {tex} and {size}.",
    "Count: {n}. Colour: {col}. Shape: {shape}. Position: {pos}.",
    "Sure! The picture contains {n} objects: a {obj}, a {col} {shape} and a {mat} {obj2}.",
    "The answer is {nw}.",
    "{col_cap} {shape}, {size} {obj}, {pos}.",
    "Coordinates of the {shape}: x = {n}, y = {n2}, width {n3} and height {n4} pixels.",
    "The {obj} {verb} {rel} the {obj2} while the {shape} {verb2} {rel2} it.",
    "{n} + {n2} = {sum}, and {n3} is {cmp} than {n4}.",
)
CHAT_LINES = (
    "Hello! How can I help you today?",
    "Hi, I am a helpful assistant that describes images.",
    "Thank you for the question.",
    "Sure, here is a short description.",
    "I am not sure, but it might be a {obj}.",
    "Let me look at the picture again.",
    "Sorry, I cannot tell from this image.",
    "Of course. Please send another image.",
    "Is there anything else you would like to know?",
    "Good morning! Good afternoon! Good evening! Goodbye!",
    "Please, could you tell me more about the {obj}?",
    "Okay, thanks! That was very helpful.",
    "Yes. No. Maybe. Probably. Certainly. Definitely not.",
    "You are a helpful assistant. Answer briefly and accurately.",
    "The user asks a question and the assistant gives a helpful, detailed, and polite answer.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "Why? Because the {shape} is {col}. When? Now. Who? The {obj}. Which? The {ord} one.",
    "I think that this would be a good example of a {tex} {obj}.",
    "We should check whether they have any more {obj}s here.",
    "It was said that it could have been there, so we will see what they do.",
)
EXTRA_WORDS = (
    "the a an and or but if then else because so also very more most less least much many few "
    "some any all each every no not only just still even again already always never often sometimes "
    "usually here there where when what who whom whose which why how this that these those it its "
    "I me my mine you your yours he him his she her hers we us our they them their what's it's "
    "don't can't isn't aren't I'm you're they're let's with without within from into onto upon about "
    "after before during until while since for of on at by to up down out off through again against "
    "image picture photo scene view frame pixel pixels colour color shape object objects size position "
    "count number numbers answer question caption text word words letter letters digit digits left right "
    "upper lower front back side edge corner centre center inside outside near far close distant "
    "first second next previous same different similar other another both either neither each one "
    "good bad great nice beautiful ugly happy sad quick slow fast early late hot cold warm cool "
    "day night morning evening today tomorrow yesterday week year time hour minute second moment "
    "water fire air earth light shadow colourful colorful transparent visible hidden clear unclear "
    "assistant user system human model help helpful please thanks thank sorry yes no okay ok sure "
    "describe explain tell show see look find count identify compare list name read write say think "
    "know understand believe guess notice recognize detect locate measure estimate calculate "
    "red-and-white black-and-white left-hand right-hand well-known up-to-date "
    "USER ASSISTANT SYSTEM Human Assistant User System Question Answer Image Picture Photo Caption"
)
# fmt: on


class _Lcg:
    """64-bit linear congruential generator (Knuth's MMIX constants); portable and stable."""

    def __init__(self, seed: int) -> None:
        self.state = (seed * 6364136223846793005 + 1442695040888963407) % (1 << 64)

    def below(self, n: int) -> int:
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        return (self.state >> 33) % n

    def pick(self, seq):  # noqa: ANN001, ANN201 - tiny helper
        return seq[self.below(len(seq))]


def _fill(template: str, rng: _Lcg) -> str:
    n, n2, n3, n4 = (rng.below(1000) if rng.below(3) == 0 else rng.below(21) for _ in range(4))
    col = rng.pick(COLOURS)
    values = {
        "obj": rng.pick(OBJECTS),
        "obj2": rng.pick(OBJECTS),
        "shape": rng.pick(SHAPES),
        "shape2": rng.pick(SHAPES),
        "col": col,
        "col_cap": col.capitalize(),
        "col2": rng.pick(COLOURS),
        "pos": rng.pick(POSITIONS),
        "rel": rng.pick(RELATIONS),
        "rel2": rng.pick(RELATIONS),
        "size": rng.pick(SIZES),
        "tex": rng.pick(TEXTURES),
        "mat": rng.pick(MATERIALS),
        "verb": rng.pick(VERBS),
        "verb2": rng.pick(VERBS),
        "ord": rng.pick(ORDINALS),
        "nw": rng.pick(NUMBER_WORDS),
        "n": n,
        "n2": n2,
        "n3": n3,
        "n4": n4,
        "sum": n + n2,
        "cmp": "larger" if n3 > n4 else "smaller",
    }
    return template.format(**values)


def iter_corpus(num_dialogues: int = 6000, seed: int = 20240611) -> Iterator[str]:
    """Yield the corpus as lines: word lists, then templated chat turns in LLaVA-1.5 format."""
    word_lists = (
        COLOURS,
        SHAPES,
        OBJECTS,
        MATERIALS,
        SIZES,
        TEXTURES,
        POSITIONS,
        RELATIONS,
        VERBS,
        NUMBER_WORDS,
        ORDINALS,
        tuple(EXTRA_WORDS.split()),
    )
    for words in word_lists:
        yield " ".join(words)
        yield " ".join(w.capitalize() for w in words)
        yield ", ".join(f"{w}s" for w in words) + "."
    yield " ".join(str(i) for i in range(1000))
    yield "0 1 2 3 4 5 6 7 8 9 . , ; : ! ? ' \" ( ) [ ] { } < > / \\ | - _ + = * & % $ # @ ~ ` ^"
    rng = _Lcg(seed)
    for _ in range(num_dialogues):
        kind = rng.below(4)
        question = _fill(rng.pick(QUESTIONS), rng)
        answer = _fill(rng.pick(ANSWER_TEMPLATES), rng)
        if kind == 0:
            yield f"USER: <image>\n{question} ASSISTANT: {answer}</s>"
        elif kind == 1:
            yield f"{_fill(rng.pick(CHAT_LINES), rng)} USER: {question}\n{answer} ASSISTANT: {answer}"
        elif kind == 2:
            yield f"{answer} {_fill(rng.pick(ANSWER_TEMPLATES), rng)}"
        else:
            yield f"{_fill(rng.pick(CHAT_LINES), rng)} {question} {answer}"
