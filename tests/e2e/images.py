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


def request_image(seed: int, width: int, height: int, noise: float = 0.0) -> Image.Image:
    """``make_image(seed)`` resized to ``width x height``; with ``noise`` > 0, Gaussian pixel noise of that
    standard deviation (seeded), so no two patches are exactly equal, as in photographs."""
    image = make_image(seed, size=336).resize((width, height))
    if noise <= 0:
        return image
    import numpy as np

    pixels = np.asarray(image, dtype=np.float32)
    pixels += np.random.default_rng(seed).normal(0.0, noise, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def request_image_url(seed: int, width: int, height: int) -> str:
    """:func:`request_image` as a PNG data URL, as an OpenAI client sends an image."""
    import base64
    import io

    buffer = io.BytesIO()
    request_image(seed, width, height).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
