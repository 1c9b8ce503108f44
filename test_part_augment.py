"""Tests of augment.py: hand-computed values always, torchvision's functional ops when importable.

Run the torchvision comparisons with a Python that has torchvision (they skip otherwise).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import augment as A

ATOL = 1e-4  # the agreement the interface promises with torchvision on float images


def _images(batch: int = 6, height: int = 13, width: int = 17, seed: int = 0) -> torch.Tensor:
    """Random images; from 3 images on, the first three are the awkward cases: all gray, pure
    primaries, ties between channels with exact 0s and 1s."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, height, width, generator=g)
    if batch < 3:
        return x
    x[0] = x[0, :1]  # an all-gray image
    x[1, :, :3] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    x[1, :, 3:5] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)
    x[2] = (x[2] * 4).round() / 4  # many ties between channels, many 0s and 1s
    return x


def _pixel(*rgb: float) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)


def _tvf():
    pytest.importorskip("torchvision")
    import torchvision.transforms.v2.functional as tvf
    return tvf


# ----------------------------------------------------------------------------------------------
# Hand-computed values
# ----------------------------------------------------------------------------------------------

def test_grayscale_weights_by_hand():
    x = torch.cat([_pixel(1, 0, 0), _pixel(0, 1, 0), _pixel(0, 0, 1), _pixel(0.5, 0.5, 0.5)])
    gray = A.rgb_to_grayscale(x)
    assert gray.shape == (4, 1, 1, 1)
    expected = torch.tensor([0.2989, 0.587, 0.114, 0.5 * (0.2989 + 0.587 + 0.114)])
    torch.testing.assert_close(gray.flatten(), expected, rtol=0, atol=1e-7)
    gray3 = A.rgb_to_grayscale(x, num_output_channels=3)
    assert gray3.shape == (4, 3, 1, 1)
    torch.testing.assert_close(gray3, gray.expand(-1, 3, -1, -1), rtol=0, atol=0)


def test_brightness_by_hand_scales_and_clips():
    x = torch.cat([_pixel(0.2, 0.5, 0.8), _pixel(0.2, 0.5, 0.8)])
    out = A.adjust_brightness(x, torch.tensor([1.5, 0.5]))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.3, 0.75, 1.0, 0.1, 0.25, 0.4]), rtol=0, atol=1e-6)
    torch.testing.assert_close(A.adjust_brightness(x, 0.0), torch.zeros_like(x), rtol=0, atol=0)


def test_contrast_by_hand_blends_with_mean_luma():
    # Two gray pixels, 0.2 and 0.6: luma = value * (sum of weights), mean luma = 0.4 * that sum.
    x = torch.cat([torch.full((1, 3, 1, 1), 0.2), torch.full((1, 3, 1, 1), 0.6)], dim=3)
    mean = 0.4 * (0.2989 + 0.587 + 0.114)
    half = A.adjust_contrast(x, 0.5)
    torch.testing.assert_close(half[0, :, 0, 0], torch.full((3,), 0.5 * 0.2 + 0.5 * mean), rtol=0, atol=1e-6)
    torch.testing.assert_close(half[0, :, 0, 1], torch.full((3,), 0.5 * 0.6 + 0.5 * mean), rtol=0, atol=1e-6)
    flat = A.adjust_contrast(x, 0.0)
    torch.testing.assert_close(flat, torch.full_like(x, mean), rtol=0, atol=1e-6)
    # factor 3: 3 * 0.6 - 2 * mean > 1 is clipped; 3 * 0.2 - 2 * mean < 0 is clipped.
    strong = A.adjust_contrast(x, 3.0)
    assert torch.equal(strong[0, :, 0, 0], torch.zeros(3)) and torch.equal(strong[0, :, 0, 1], torch.ones(3))


def test_saturation_by_hand():
    x = _pixel(0.6, 0.4, 0.2)
    luma = 0.2989 * 0.6 + 0.587 * 0.4 + 0.114 * 0.2
    torch.testing.assert_close(A.adjust_saturation(x, 0.0).flatten(), torch.full((3,), luma), rtol=0, atol=1e-6)
    doubled = A.adjust_saturation(x, 2.0).flatten()
    expected = torch.tensor([2 * 0.6 - luma, 2 * 0.4 - luma, 0.0])  # the blue channel clips at 0
    torch.testing.assert_close(doubled, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rgb, shift, expected", [
    ((1.0, 0.0, 0.0), 1 / 3, (0.0, 1.0, 0.0)),   # red turns green
    ((1.0, 0.0, 0.0), -1 / 3, (0.0, 0.0, 1.0)),  # red turns blue
    ((1.0, 0.0, 0.0), 0.5, (0.0, 1.0, 1.0)),     # complement: cyan
    ((0.0, 1.0, 0.0), 1 / 3, (0.0, 0.0, 1.0)),
    # hue 20 deg (max R, (G - B) / chroma = 1/3 of a sextant) + 60 deg = 80 deg:
    # value 0.8, min 0.2 kept, the middle channel is min + chroma * (2 - 4/3) = 0.6.
    ((0.8, 0.4, 0.2), 1 / 6, (0.6, 0.8, 0.2)),
    ((0.5, 0.5, 0.5), 0.25, (0.5, 0.5, 0.5)),    # gray has no hue
    ((0.0, 0.0, 0.0), -0.4, (0.0, 0.0, 0.0)),
])
def test_hue_by_hand(rgb, shift, expected):
    out = A.adjust_hue(_pixel(*rgb), shift).flatten()
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=1e-6)


def test_hue_per_image_equals_scalar_calls():
    x = _images()
    shifts = torch.linspace(-0.5, 0.5, x.shape[0])
    out = A.adjust_hue(x, shifts)
    for i in range(x.shape[0]):
        torch.testing.assert_close(out[i:i + 1], A.adjust_hue(x[i:i + 1], shifts[i].item()), rtol=0, atol=1e-6)


def test_hflip_by_hand_and_mask():
    x = torch.arange(12.0).view(2, 1, 1, 6).expand(2, 3, 1, 6) / 12
    flipped = A.hflip(x)
    torch.testing.assert_close(flipped[0, 0, 0], torch.arange(5.0, -1.0, -1.0) / 12, rtol=0, atol=0)
    masked = A.hflip(x, torch.tensor([False, True]))
    assert torch.equal(masked[0], x[0]) and torch.equal(masked[1], x[1].flip(-1))


def test_resized_crop_identity_and_plain_crop():
    x = _images(2, 9, 11)
    full = torch.tensor([[0, 0, 9, 11], [0, 0, 9, 11]])
    torch.testing.assert_close(A.resized_crop(x, full, (9, 11)), x, rtol=0, atol=1e-6)
    boxes = torch.tensor([[1, 2, 4, 5], [5, 6, 4, 5]])
    out = A.resized_crop(x, boxes, (4, 5))
    torch.testing.assert_close(out[0], x[0, :, 1:5, 2:7], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], x[1, :, 5:9, 6:11], rtol=0, atol=1e-6)


def test_resized_crop_2x_up_and_down_by_hand():
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    # Upsampling the top-left 2x2 by 2: output centres fall at -0.25 (clamped to 0), 0.25, 0.75
    # and 1.25 (clamped to the crop's last pixel, never reading column 2 outside the crop).
    up = A.resized_crop(x, torch.tensor([[0, 0, 2, 2]]), 4)
    a, b = x[0, :, 0, 0], x[0, :, 0, 1]
    expected_row = torch.stack([a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b], dim=-1)
    torch.testing.assert_close(up[0, :, 0], expected_row, rtol=0, atol=1e-6)
    # Downsampling the whole 4x4 by 2: centres at 0.5 and 2.5, the mean of each 2x2 block.
    down = A.resized_crop(x, torch.tensor([[0, 0, 4, 4]]), 2)
    blocks = x[0].unfold(1, 2, 2).unfold(2, 2, 2).mean(dim=(-1, -2))
    torch.testing.assert_close(down[0], blocks, rtol=0, atol=1e-6)


def test_resized_crop_overhanging_box_reads_zeros():
    x = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    out = A.resized_crop(x, torch.tensor([[-1, -1, 3, 3]]), 3)
    expected = torch.zeros(1, 3, 3, 3)
    expected[:, :, 1:, 1:] = x
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_blur_constant_stays_constant_and_delta_gives_kernel():
    constant = torch.full((2, 3, 6, 7), 0.3)
    torch.testing.assert_close(A.gaussian_blur(constant, 5, torch.tensor([0.5, 3.0])), constant,
                               rtol=0, atol=1e-6)
    delta = torch.zeros(2, 3, 7, 7)
    delta[:, :, 3, 3] = 1.0
    sigmas = torch.tensor([1.0, 0.5])
    out = A.gaussian_blur(delta, 3, sigmas)
    for i, sigma in enumerate(sigmas.tolist()):
        side = math.exp(-0.5 / sigma ** 2)
        taps = torch.tensor([side, 1.0, side]) / (1.0 + 2.0 * side)
        expected = torch.zeros(7, 7)
        expected[2:5, 2:5] = taps[:, None] * taps[None, :]
        torch.testing.assert_close(out[i], expected.expand(3, 7, 7), rtol=0, atol=1e-6)


def test_blur_reflects_at_the_border():
    # Reflection (not zero or edge padding): pixel -1 is pixel 1, so a delta at (1, 1) reaches
    # the corner (0, 0) from both sides in each axis: weight (2 * side tap) ** 2.
    delta = torch.zeros(1, 3, 5, 5)
    delta[:, :, 1, 1] = 1.0
    side = math.exp(-0.5)
    side_tap = side / (1.0 + 2.0 * side)
    out = A.gaussian_blur(delta, 3, 1.0)
    torch.testing.assert_close(out[0, :, 0, 0], torch.full((3,), (2 * side_tap) ** 2), rtol=0, atol=1e-6)


def test_blur_kernel_size_follows_simclr():
    assert [A.blur_kernel_size(s) for s in (224, 96, 64, 32, 19)] == [23, 9, 7, 3, 1]


# ----------------------------------------------------------------------------------------------
# Against torchvision (skipped without it)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, factors", [
    ("adjust_brightness", [0.0, 0.3, 0.9, 1.0, 1.5, 2.0]),
    ("adjust_contrast", [0.0, 0.3, 0.9, 1.0, 1.5, 2.0]),
    ("adjust_saturation", [0.0, 0.3, 0.9, 1.0, 1.5, 2.0]),
    ("adjust_hue", [-0.5, -0.3, 0.0, 0.1, 1 / 3, 0.5]),
])
def test_color_primitives_match_torchvision(name, factors):
    tvf = _tvf()
    x = _images()
    ours = getattr(A, name)(x, torch.tensor(factors))
    for i, factor in enumerate(factors):
        reference = getattr(tvf, name)(x[i], factor)
        torch.testing.assert_close(ours[i], reference, rtol=0, atol=ATOL)
        torch.testing.assert_close(getattr(A, name)(x[i:i + 1], factor)[0], reference, rtol=0, atol=ATOL)


def test_grayscale_hflip_match_torchvision():
    tvf = _tvf()
    x = _images()
    for channels in (1, 3):
        torch.testing.assert_close(A.rgb_to_grayscale(x, channels), tvf.rgb_to_grayscale(x, channels),
                                   rtol=0, atol=ATOL)
    torch.testing.assert_close(A.hflip(x), tvf.horizontal_flip(x), rtol=0, atol=0)


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 9, 23])
def test_gaussian_blur_matches_torchvision(kernel_size):
    tvf = _tvf()
    x = _images(height=13, width=29)
    if kernel_size // 2 >= 13:
        x = _images(height=30, width=29)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0, 7.0])
    ours = A.gaussian_blur(x, kernel_size, sigmas)
    for i, sigma in enumerate(sigmas.tolist()):
        reference = tvf.gaussian_blur(x[i], [kernel_size, kernel_size], [sigma, sigma])
        torch.testing.assert_close(ours[i], reference, rtol=0, atol=ATOL)


@pytest.mark.parametrize("size", [(13, 17), (8, 8), (31, 11), (1, 1), (40, 40)])
def test_resized_crop_matches_torchvision(size):
    tvf = _tvf()
    x = _images()
    # Whole image, inside boxes of several shapes, a 1x1 box, and boxes overhanging the border.
    boxes = torch.tensor([[0, 0, 13, 17], [2, 3, 10, 5], [5, 1, 8, 16], [12, 16, 1, 1],
                          [-3, -2, 8, 30], [6, 9, 10, 12]])
    ours = A.resized_crop(x, boxes, size)
    for i in range(x.shape[0]):
        reference = tvf.resized_crop(x[i], *boxes[i].tolist(), size=list(size), antialias=False)
        torch.testing.assert_close(ours[i], reference, rtol=0, atol=ATOL)


def test_random_resized_crop_matches_torchvision_on_its_boxes():
    tvf = _tvf()
    x = _images(8, 40, 30)
    boxes = A.sample_resized_crop_boxes(8, 40, 30, generator=torch.Generator().manual_seed(3))
    ours = A.random_resized_crop(x, 24, generator=torch.Generator().manual_seed(3))
    for i in range(8):
        top, left, height, width = (int(v) for v in boxes[i].tolist())
        reference = tvf.resized_crop(x[i], top, left, height, width, size=[24, 24], antialias=False)
        torch.testing.assert_close(ours[i], reference, rtol=0, atol=ATOL)


def test_color_jitter_matches_torchvision_in_each_images_order():
    tvf = _tvf()
    x = _images(24, 9, 10)
    params = A.sample_color_jitter(24, strength=1.0, p=0.8, generator=torch.Generator().manual_seed(4))
    ours = A.apply_color_jitter(x, params)
    ops = [tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation, tvf.adjust_hue]
    factors = [params.brightness, params.contrast, params.saturation, params.hue]
    for i in range(24):
        reference = x[i]
        if params.applied[i]:
            for op in params.order[i].tolist():
                reference = ops[op](reference, factors[op][i].item())
        torch.testing.assert_close(ours[i], reference, rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# Random ops: sampling, determinism, independence, probabilities
# ----------------------------------------------------------------------------------------------

def test_jitter_equals_primitives_in_each_images_order():
    x = _images(24, 9, 10)
    params = A.sample_color_jitter(24, strength=1.0, p=0.8, generator=torch.Generator().manual_seed(5))
    ours = A.apply_color_jitter(x, params)
    ops = [A.adjust_brightness, A.adjust_contrast, A.adjust_saturation, A.adjust_hue]
    factors = [params.brightness, params.contrast, params.saturation, params.hue]
    for i in range(24):
        expected = x[i:i + 1]
        if params.applied[i]:
            for op in params.order[i].tolist():
                expected = ops[op](expected, factors[op][i].item())
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=0, atol=1e-6)


def test_jitter_order_is_random_and_matters():
    params = A.sample_color_jitter(4800, generator=torch.Generator().manual_seed(6))
    orders, counts = params.order.unique(dim=0, return_counts=True)
    assert orders.shape[0] == 24  # every permutation of the four ops occurs
    assert torch.equal(orders.sort(dim=1).values, torch.arange(4).expand(24, 4))
    assert counts.min() > 4800 / 24 * 0.7 and counts.max() < 4800 / 24 * 1.3
    # The same factors in two orders give two different images.
    x = _images(1).expand(2, -1, -1, -1)
    ones = torch.ones(2)
    swapped = A.JitterParams(torch.ones(2, dtype=torch.bool), torch.full((2,), 1.8), torch.full((2,), 0.2), ones,
                             torch.zeros(2), torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]]))
    out = A.apply_color_jitter(x, swapped)
    assert (out[0] - out[1]).abs().max() > 0.05


def test_jitter_factor_ranges_follow_strength():
    for strength in (0.5, 1.0, 1.5):
        params = A.sample_color_jitter(3000, strength=strength, p=1.0, generator=torch.Generator().manual_seed(7))
        low, high = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
        for factor in (params.brightness, params.contrast, params.saturation):
            assert factor.min() >= low and factor.max() <= high
            assert factor.min() < low + 0.05 * (high - low) and factor.max() > high - 0.05 * (high - low)
        assert params.hue.abs().max() <= 0.2 * strength and params.hue.abs().max() > 0.19 * strength


def test_crop_boxes_stay_inside_and_follow_scale_and_ratio():
    height, width = 224, 224
    boxes = A.sample_resized_crop_boxes(4000, height, width, generator=torch.Generator().manual_seed(8))
    top, left, h, w = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # Rounding each side to a whole pixel moves area and ratio by at most half a pixel per side.
    area = height * width
    assert ((w + 0.5) * (h + 0.5) >= 0.08 * area).all() and ((w - 0.5) * (h - 0.5) <= area).all()
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    fraction, ratio = w * h / area, w / h
    assert fraction.min() < 0.1 and fraction.max() > 0.9
    assert ratio.min() < 0.77 and ratio.max() > 1.3
    assert abs(ratio.log().mean().item()) < 0.02  # log-uniform ratio is symmetric around 1
    # Placement is uniform: small crops reach every border.
    small = h < 100
    assert top[small].min() == 0 and (top + h)[small].max() == height
    assert left[small].min() == 0 and (left + w)[small].max() == width


def test_crop_fallback_is_the_centre_crop():
    # An area 2-3x the image never fits in 10 tries: the fallback clamps the ratio into
    # [3/4, 4/3] and centres the box. 20 x 50 is wider than 4/3: height 20, width round(80/3).
    boxes = A.sample_resized_crop_boxes(5, 20, 50, scale=(2.0, 3.0), generator=torch.Generator().manual_seed(9))
    assert torch.equal(boxes, torch.tensor([[0.0, 11.0, 20.0, 27.0]]).expand(5, 4))
    tall = A.sample_resized_crop_boxes(3, 50, 20, scale=(2.0, 3.0), generator=torch.Generator().manual_seed(9))
    assert torch.equal(tall, torch.tensor([[(50 - 27) // 2, 0.0, 27.0, 20.0]]).expand(3, 4))
    square = A.sample_resized_crop_boxes(3, 16, 16, scale=(2.0, 3.0), generator=torch.Generator().manual_seed(9))
    assert torch.equal(square, torch.tensor([[0.0, 0.0, 16.0, 16.0]]).expand(3, 4))


def test_pipeline_is_the_random_ops_in_order():
    # SimCLRAugment folds flip into the crop's sampling grid; it must equal the separate ops,
    # drawing from the generator in the documented order (flip, crop, jitter, grayscale, blur).
    x = _images(12, 40, 36)
    out = A.SimCLRAugment(32, blur=True, strength=1.0)(x, torch.Generator().manual_seed(10))
    g = torch.Generator().manual_seed(10)
    flip = torch.rand(12, generator=g) < 0.5
    expected = A.hflip(A.random_resized_crop(x, 32, generator=g), flip)
    expected = A.color_jitter(expected, 1.0, 0.8, generator=g)
    expected = A.random_grayscale(expected, 0.2, generator=g)
    expected = A.random_gaussian_blur(expected, 0.5, 3, (0.1, 2.0), generator=g)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert 0 < flip.sum() < 12


def test_pipeline_without_crop_only_resizes_and_flips():
    x = _images(6, 20, 28)
    out = A.SimCLRAugment(16, crop=False, flip=True, color=False)(x, torch.Generator().manual_seed(11))
    flip = torch.rand(6, generator=torch.Generator().manual_seed(11)) < 0.5
    whole = torch.tensor([[0, 0, 20, 28]]).expand(6, 4)
    torch.testing.assert_close(out, A.hflip(A.resized_crop(x, whole, 16), flip), rtol=0, atol=1e-6)
    same_size = A.SimCLRAugment(20, crop=False, flip=False, color=False)
    assert torch.equal(same_size(x[:, :, :, :20]), x[:, :, :, :20])


@pytest.mark.parametrize("crop, flip, color, blur", list(itertools.product([False, True], repeat=4)))
def test_pipeline_shapes_range_dtype(crop, flip, color, blur):
    x = (_images(5, 24, 30) * 255).round().to(torch.uint8)
    out = A.SimCLRAugment(16, crop=crop, flip=flip, color=color, blur=blur)(x, torch.Generator().manual_seed(12))
    assert out.shape == (5, 3, 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_pipeline_is_deterministic_per_seed_and_differs_across_seeds():
    x = _images(8, 24, 24)
    aug = A.SimCLRAugment(16, blur=True, strength=1.0)
    first = aug(x, torch.Generator().manual_seed(13))
    assert torch.equal(first, aug(x, torch.Generator().manual_seed(13)))
    assert not torch.allclose(first, aug(x, torch.Generator().manual_seed(14)))
    g = torch.Generator().manual_seed(13)
    assert not torch.allclose(aug(x, g), aug(x, g))  # two views of one batch differ


def test_images_of_a_batch_get_different_parameters():
    x = _images(1, 24, 24).expand(16, -1, -1, -1)
    out = A.SimCLRAugment(16, blur=True, strength=1.0)(x, torch.Generator().manual_seed(15))
    flat = out.flatten(1)
    distances = torch.cdist(flat, flat)
    assert (distances + torch.eye(16) * 1e9).min() > 1e-3


def test_result_of_an_image_does_not_depend_on_the_rest_of_the_batch():
    x = _images(6, 15, 15)
    factors = torch.tensor([0.2, 0.6, 1.0, 1.3, 1.7, 2.0])
    boxes = torch.tensor([[0, 0, 15, 15], [2, 3, 8, 9], [1, 1, 5, 5], [0, 4, 11, 11], [7, 7, 8, 8], [3, 0, 12, 6]])
    params = A.sample_color_jitter(6, generator=torch.Generator().manual_seed(16))
    whole = {
        "brightness": A.adjust_brightness(x, factors), "contrast": A.adjust_contrast(x, factors),
        "saturation": A.adjust_saturation(x, factors), "hue": A.adjust_hue(x, factors / 4 - 0.25),
        "blur": A.gaussian_blur(x, 5, factors), "crop": A.resized_crop(x, boxes, 7),
        "jitter": A.apply_color_jitter(x, params),
    }
    for i in range(6):
        one = slice(i, i + 1)
        alone = {
            "brightness": A.adjust_brightness(x[one], factors[one]), "contrast": A.adjust_contrast(x[one], factors[one]),
            "saturation": A.adjust_saturation(x[one], factors[one]),
            "hue": A.adjust_hue(x[one], factors[one] / 4 - 0.25), "blur": A.gaussian_blur(x[one], 5, factors[one]),
            "crop": A.resized_crop(x[one], boxes[one], 7),
            "jitter": A.apply_color_jitter(x[one], A.JitterParams(*(field[one] for field in params))),
        }
        for name in whole:
            torch.testing.assert_close(whole[name][one], alone[name], rtol=0, atol=1e-6, msg=name)


def test_probability_zero_and_one():
    x = _images(16, 12, 12)
    g = torch.Generator().manual_seed(17)
    for op in (A.color_jitter, A.random_grayscale, A.random_gaussian_blur, A.random_hflip):
        assert torch.equal(op(x, p=0.0, generator=g), x), op.__name__
    assert torch.equal(A.random_hflip(x, p=1.0, generator=g), x.flip(-1))
    gray = A.random_grayscale(x, p=1.0, generator=g)
    assert torch.equal(gray, A.rgb_to_grayscale(x, 3))
    assert torch.equal(A.random_gaussian_blur(x, p=1.0, kernel_size=5, sigma=(1.0, 1.0), generator=g),
                       A.gaussian_blur(x, 5, 1.0))
    jittered = A.color_jitter(x, strength=1.0, p=1.0, generator=g)
    assert ((jittered - x).flatten(1).abs().amax(1) > 1e-3).all()


def test_probability_half_applies_to_about_half():
    x = _images(1, 8, 8).expand(2000, -1, -1, -1)
    g = torch.Generator().manual_seed(18)
    changed = {
        "flip": A.random_hflip(x, 0.5, g), "gray": A.random_grayscale(x, 0.2, g),
        "blur": A.random_gaussian_blur(x, 0.5, 3, generator=g), "jitter": A.color_jitter(x, 1.0, 0.8, g),
    }
    rates = {name: (out != x).flatten(1).any(1).float().mean().item() for name, out in changed.items()}
    expected = {"flip": 0.5, "gray": 0.2, "blur": 0.5, "jitter": 0.8}
    for name, rate in rates.items():
        assert abs(rate - expected[name]) < 0.05, (name, rate)


def test_blur_sigma_is_drawn_per_image():
    x = torch.zeros(400, 3, 9, 9)
    x[:, :, 4, 4] = 1.0
    out = A.random_gaussian_blur(x, p=1.0, kernel_size=5, sigma=(0.1, 2.0), generator=torch.Generator().manual_seed(19))
    centre = out[:, 0, 4, 4]
    offsets = torch.arange(-2.0, 3.0)

    def centre_weight(sigma: float) -> float:  # the 2-D kernel's middle tap, falling with sigma
        return (1.0 / torch.exp(-0.5 * (offsets / sigma) ** 2).sum().item()) ** 2

    assert centre.min() >= centre_weight(2.0) - 1e-6 and centre.max() <= 1.0
    assert centre.min() < centre_weight(1.9) and centre.max() > centre_weight(0.2)
    # sigma ~ U[0.1, 2]: half of the images have sigma above the midpoint 1.05 (400 draws: sd 0.025).
    assert abs((centre < centre_weight(1.05)).float().mean().item() - 0.5) < 0.08


def test_uint8_input_equals_float_input():
    x8 = (_images(4, 10, 10) * 255).round().to(torch.uint8)
    xf = x8.float() / 255
    assert torch.equal(A.adjust_contrast(x8, 1.3), A.adjust_contrast(xf, 1.3))
    assert torch.equal(A.resized_crop(x8, torch.tensor([[1, 1, 5, 5]]).expand(4, 4), 8),
                       A.resized_crop(xf, torch.tensor([[1, 1, 5, 5]]).expand(4, 4), 8))
    aug = A.SimCLRAugment(8, blur=True)
    assert torch.equal(aug(x8, torch.Generator().manual_seed(20)), aug(xf, torch.Generator().manual_seed(20)))


def test_dtypes_float64_kept_half_computed_in_float32():
    x = _images(2, 8, 8)
    assert A.adjust_hue(x.double(), 0.2).dtype == torch.float64
    torch.testing.assert_close(A.adjust_hue(x.double(), 0.2).float(), A.adjust_hue(x, 0.2), rtol=0, atol=1e-6)
    assert A.gaussian_blur(x.half(), 3, 1.0).dtype == torch.float32


def test_blur_and_pipeline_ignore_autocast():
    x = _images(2, 16, 16)
    plain = A.gaussian_blur(x, 5, 1.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = A.gaussian_blur(x, 5, 1.5)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=0, atol=1e-6)
    aug = A.SimCLRAugment(12, blur=True, strength=1.0)
    plain = aug(x, torch.Generator().manual_seed(21))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = aug(x, torch.Generator().manual_seed(21))
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=0, atol=1e-6)


def test_pipeline_never_reads_tensor_values_on_the_host():
    # Meta tensors have shapes but no data: .item(), bool(tensor) or a host copy would raise, so
    # this shows the pipeline queues its work without waiting for the device (and keeps every
    # tensor on the images' device).
    x = torch.empty(4, 3, 40, 36, dtype=torch.uint8, device="meta")
    for crop, blur in itertools.product([False, True], repeat=2):
        out = A.SimCLRAugment(32, crop=crop, blur=blur, strength=1.0)(x)
        assert out.device.type == "meta" and out.shape == (4, 3, 32, 32)


def test_describe():
    assert A.SimCLRAugment(32).describe() == "crop+flip+color(s=0.5)"
    assert A.SimCLRAugment(32, crop=False, color=False).describe() == "flip"
    assert A.SimCLRAugment(224, blur=True, strength=1.0).describe() == "crop+flip+color(s=1)+blur"
    assert A.SimCLRAugment(32, crop=False, flip=False, color=False).describe() == "none"
    assert A.SimCLRAugment(32, scale=(0.2, 1.0)).describe() == "crop(scale=0.2-1)+flip+color(s=0.5)"


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

_X = torch.rand(2, 3, 8, 8)


@pytest.mark.parametrize("call, message", [
    (lambda: A.adjust_brightness(torch.rand(3, 8, 8), 1.0), "single image"),
    (lambda: A.adjust_brightness(torch.rand(2, 8, 8, 3, 1), 1.0), r"\(B, 3, H, W\)"),
    (lambda: A.adjust_brightness(torch.rand(2, 4, 8, 8), 1.0), "3 \\(RGB\\) channels"),
    (lambda: A.adjust_brightness(torch.rand(2, 1, 8, 8), 1.0), "3 \\(RGB\\) channels"),
    (lambda: A.adjust_brightness(torch.ones(2, 3, 8, 8, dtype=torch.int64), 1.0), "uint8"),
    (lambda: A.adjust_brightness(torch.ones(2, 3, 8, 8, dtype=torch.bool), 1.0), "uint8"),
    (lambda: A.adjust_brightness(torch.rand(0, 3, 8, 8), 1.0), "at least one image"),
    (lambda: A.adjust_brightness([[1.0]], 1.0), "torch.Tensor"),
    (lambda: A.adjust_brightness(_X, torch.ones(3)), r"shape \(2,\)"),
    (lambda: A.adjust_brightness(_X, -0.5), "factor must be in"),
    (lambda: A.adjust_contrast(_X, torch.ones(2, 1)), r"shape \(2,\)"),
    (lambda: A.adjust_hue(_X, 0.7), r"\[-0.5, 0.5\]"),
    (lambda: A.adjust_hue(_X, float("nan")), "finite"),
    (lambda: A.rgb_to_grayscale(_X, 2), "1 or 3"),
    (lambda: A.gaussian_blur(_X, 4, 1.0), "odd positive"),
    (lambda: A.gaussian_blur(_X, 0, 1.0), "odd positive"),
    (lambda: A.gaussian_blur(_X, -3, 1.0), "odd positive"),
    (lambda: A.gaussian_blur(_X, 17, 1.0), "too large"),
    (lambda: A.gaussian_blur(_X, 3, 0.0), "sigma must be positive"),
    (lambda: A.gaussian_blur(_X, 3, -1.0), "sigma must be positive"),
    (lambda: A.gaussian_blur(_X, 3, torch.ones(5)), r"shape \(2,\)"),
    (lambda: A.hflip(_X, torch.tensor([1, 0])), "bool tensor"),
    (lambda: A.hflip(_X, torch.tensor([True])), "bool tensor"),
    (lambda: A.resized_crop(_X, torch.zeros(2, 3), 4), r"shape \(2, 4\)"),
    (lambda: A.resized_crop(_X, torch.zeros(3, 4), 4), r"shape \(2, 4\)"),
    (lambda: A.resized_crop(_X, torch.zeros(2, 4), 0), "positive int"),
    (lambda: A.resized_crop(_X, torch.zeros(2, 4), (4, -1)), "positive int"),
    (lambda: A.random_resized_crop(_X, 4, scale=(0.5, 0.1)), "scale"),
    (lambda: A.random_resized_crop(_X, 4, ratio=(0.0, 1.0)), "ratio"),
    (lambda: A.random_hflip(_X, p=1.5), "probability"),
    (lambda: A.color_jitter(_X, strength=3.0), "strength"),
    (lambda: A.color_jitter(_X, strength=-1.0), "strength"),
    (lambda: A.random_grayscale(_X, p=-0.1), "probability"),
    (lambda: A.random_gaussian_blur(_X, sigma=(0.0, 2.0)), "sigma"),
    (lambda: A.random_gaussian_blur(_X, generator=object()), "torch.Generator"),
    (lambda: A.SimCLRAugment(0), "size must be a positive int"),
    (lambda: A.SimCLRAugment(32.0), "size must be a positive int"),
    (lambda: A.SimCLRAugment(32, crop="yes"), "crop must be True or False"),
    (lambda: A.SimCLRAugment(32)(torch.rand(3, 32, 32)), "single image"),
    (lambda: A.apply_color_jitter(_X, A.sample_color_jitter(3)), r"shape \(2,\)"),
])
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
