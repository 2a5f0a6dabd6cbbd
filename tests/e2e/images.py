"""Deterministic test images: coloured shapes on a background, different per seed."""

import random

from PIL import Image, ImageDraw

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black"]


def make_image(seed: int, size: int = 336) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), rng.choice(["white", "lightgray", "beige"]))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 5)):
        x, y = rng.randint(0, size - 80), rng.randint(0, size - 80)
        w, h = rng.randint(30, 120), rng.randint(30, 120)
        shape = rng.choice([draw.ellipse, draw.rectangle])
        shape((x, y, x + w, y + h), fill=rng.choice(COLOURS))
    return image
