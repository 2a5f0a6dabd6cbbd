"""The pixel-level redundancy estimate behind ``tokcomp_budget: "auto"``."""

import torch

from vllm_tokcomp.auto_budget import adaptive_budget, redundant_window_savings


def _noise(seed=0):
    return torch.randn(3, 336, 336, generator=torch.Generator().manual_seed(seed))


def test_noise_has_no_redundancy_and_a_flat_image_collapses_every_window():
    assert adaptive_budget(_noise(), 576) == 576
    assert adaptive_budget(torch.zeros(3, 336, 336), 576) == 64  # 64 windows of 3x3 patches


def test_exactly_the_painted_windows_are_redundant():
    pixels = _noise(1)
    windows = [(0, 0), (3, 9), (21, 21)]  # top-left patch of 3x3-patch windows
    for row, col in windows:
        pixels[:, row * 14 : (row + 3) * 14, col * 14 : (col + 3) * 14] = torch.tensor([0.5, -0.2, 1.0])[:, None, None]
    assert redundant_window_savings(pixels) == 8 * len(windows)


def test_a_window_split_between_two_flat_colours_is_not_redundant():
    pixels = _noise(2)
    pixels[:, 0:42, 0:21] = 1.0
    pixels[:, 0:42, 21:42] = -1.0
    pixels[:, 42:56, 0:42] = 1.0
    assert redundant_window_savings(pixels) == 0


def test_texture_estimator_merges_noise_of_one_colour_but_not_edges():
    from vllm_tokcomp.auto_budget import texture_window_savings

    noisy = 0.3 + 0.3 * _noise(3)  # one colour with pixel noise: every window looks alike by texture
    assert texture_window_savings(noisy) == 64 * 8
    assert adaptive_budget(noisy, 576) == 576  # the cosine estimator sees no redundancy in noise
    assert adaptive_budget(noisy, 576, estimator="texture") == 64
    split = noisy.clone()
    split[:, :, 0:21] -= 1.5  # a colour edge through the middle of the first column of windows
    assert texture_window_savings(split) == 64 * 8 - 8 * 8


def test_unknown_estimator_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="estimator"):
        adaptive_budget(_noise(), 576, estimator="psychic")
