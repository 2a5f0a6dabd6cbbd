"""``tokcomp show``: the drawn picture matches the method's assignment, pixel by pixel, on painted images."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_tokcomp.methods import VisualTokens, get_method
from vllm_tokcomp.show import DIM, LlavaViewer, draw, token_colour

PATCH = 14


@pytest.fixture(scope="module")
def viewer():
    from vllm_tokcomp.tiny.llava_builder import ensure_default_model

    return LlavaViewer(ensure_default_model())


def _centres(picture: Image.Image, grid=(24, 24)) -> torch.Tensor:
    """``[576, 3]`` the centre pixel of every patch (borders are drawn on patch edges only)."""
    pixels = torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32).copy())
    rows = torch.arange(grid[0]) * PATCH + PATCH // 2
    cols = torch.arange(grid[1]) * PATCH + PATCH // 2
    return pixels[rows][:, cols].reshape(-1, 3)


def test_uniform_keeps_exactly_the_patches_of_its_assignment(viewer):
    """White image: a dropped patch is dimmed to 25 % grey, a kept one tinted by its token's colour."""
    selection = viewer.select(Image.new("RGB", (336, 336), "white"), "uniform", 64, "Is there a square?")
    expected = get_method("uniform")(VisualTokens(torch.zeros(576, 4), (24, 24)), 64).assignment.destination
    assert torch.equal(selection.assignment.destination, expected)
    centres = _centres(draw(selection))
    dropped = (centres - 255 * DIM).abs().max(dim=1).values <= 1
    assert torch.equal(dropped, expected < 0)
    for index in torch.nonzero(expected >= 0).flatten().tolist():
        colour = torch.tensor(token_colour(int(expected[index])), dtype=torch.float32)
        assert torch.allclose(centres[index], 255 * 0.55 + colour * 0.45, atol=1), index


def test_merged_groups_share_one_colour_and_neighbouring_groups_differ(viewer):
    """``pool`` at 144 tokens: every 2 x 2 block of patches is one token, drawn in one colour."""
    image = Image.new("RGB", (336, 336), "white")
    image.paste((200, 30, 30), (0, 0, 168, 336))  # two halves, so the tower sees content
    selection = viewer.select(image, "pool", 144, "What colour is it?")
    destination = selection.assignment.destination.reshape(24, 24)
    assert torch.equal(destination[::2, ::2], destination[1::2, 1::2]) and destination.unique().numel() == 144
    picture = draw(selection)
    original = _centres(selection.image)
    centres = _centres(picture)
    tint = (centres - original * 0.55) / 0.45  # the token colour behind each patch
    by_slot = {}
    for index, slot in enumerate(selection.assignment.destination.tolist()):
        by_slot.setdefault(slot, []).append(tint[index])
    for slot, colours in by_slot.items():
        stacked = torch.stack(colours)
        assert (stacked - stacked[0]).abs().max() <= 3, slot  # one colour per token (rounding aside)
    assert token_colour(0) != token_colour(1) != token_colour(12)


def test_cli_writes_a_panel_per_method_and_refuses_bad_settings(tmp_path):
    image = tmp_path / "in.png"
    Image.new("RGB", (400, 300), "beige").save(image)
    out = tmp_path / "out.png"
    command = [sys.executable, "-m", "vllm_tokcomp.cli", "show", str(image), "--budget", "16", "-o", str(out)]
    done = subprocess.run([*command, "--methods", "tome,cls_topk,mustdrop"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tome@16: 576 patches -> 16 tokens" in done.stdout and "mustdrop@16" in done.stdout
    assert Image.open(out).size == (3 * 336, 336 + 18)
    bad = subprocess.run([*command, "--method", "nope"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "tokcomp_method" in bad.stderr


def test_a_model_other_than_llava_is_refused_pointing_to_the_preview(tmp_path):
    from vllm_tokcomp.show import LlavaViewer
    from vllm_tokcomp.tiny.qwen2_vl_builder import ensure_default_model

    with pytest.raises(ValueError, match="POST /tokcomp/preview"):
        LlavaViewer(ensure_default_model())


@pytest.mark.parametrize("raw", [False, True])
def test_qwen_patches_give_back_the_image(raw):
    """Qwen2-VL's flattened patches (normalised floats, or raw uint8 as vLLM's on-device normalisation hands them
    over) rebuild the processed image exactly, at its own size."""
    from transformers import Qwen2VLImageProcessor

    from vllm_tokcomp.show import qwen_pixels_to_image

    processor = Qwen2VLImageProcessor(do_rescale=not raw, do_normalize=not raw)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 448, 3), dtype=np.uint8))
    out = processor(images=[image], return_tensors="pt")
    patches = out["pixel_values"].round().to(torch.uint8) if raw else out["pixel_values"]
    back = qwen_pixels_to_image(patches, tuple(out["image_grid_thw"][0].tolist()), processor)
    assert back.size == (448, 224)
    assert np.abs(np.asarray(back, dtype=int) - np.asarray(image, dtype=int)).max() == 0
