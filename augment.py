"""Batched SimCLR data augmentation on tensors (standard library and torch only).

Settings implemented (SimCLR v1, Chen et al. 2020, arXiv 2002.05709, appendix A):
  random resized crop  area fraction U[0.08, 1], aspect ratio log-uniform in [3/4, 4/3], resized
                       bilinearly to the output size (10 tries, then a centre crop, as torchvision's
                       RandomResizedCrop); horizontal flip with p = 0.5;
  color distortion     color jitter with strength s applied with p = 0.8: brightness, contrast and
                       saturation factors U[max(0, 1 - 0.8s), 1 + 0.8s], hue shift U[-0.2s, 0.2s],
                       the four in a random order per image; then grayscale with p = 0.2
                       (SimCLRAugment's `grayscale`);
  Gaussian blur        p = 0.5, sigma U[0.1, 2.0], kernel 10% of the image side made odd
                       (2 * (side // 20) + 1, as the official code rounds it: 23 at 224, 3 at 32).
  s = 1.0 on ImageNet, 0.5 on CIFAR (SimCLRAugment's default is 0.5).

Reading order: SimCLRAugment (one view: the ops composed); the random ops and their parameter
samplers; the deterministic primitives they apply, each giving what
torchvision.transforms.v2.functional's function of the same name gives image by image
(resized_crop as with antialias=False, bilinear); the input checks last.

Images are (B, 3, H, W) tensors on any device: float in [0, 1], or uint8 in [0, 255] (divided by
255 on the way in). float16/bfloat16 are computed in float32 and float64 stays float64; other
dtypes are refused. Every op works on the whole batch at once: per-image random numbers are drawn
in one or two vectorised calls from the given torch.Generator (which must live on the images'
device), so a seed repeats a batch exactly, and nothing waits for the device (no .item(), no
branching on tensor values). Because of that, image values and per-image parameter tensors are
checked for shape and dtype only, never for their values (Python numbers are range-checked).

Written from scratch from the published settings and torchvision's documented behaviour; no code
is taken from torchvision or kornia. The file imports nothing from its project, so it can be
copied alone next to an installed torch.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue", "rgb_to_grayscale",
    "gaussian_blur", "hflip", "resized_crop",
    "sample_resized_crop_boxes", "JitterParams", "sample_color_jitter", "apply_color_jitter",
    "random_resized_crop", "random_hflip", "color_jitter", "random_grayscale", "random_gaussian_blur",
    "blur_kernel_size", "SimCLRAugment",
]

Factor = float | torch.Tensor

# ITU-R BT.601 luma weights, the ones torchvision and PIL use for "L" images.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
SIMCLR_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10

_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------
# The SimCLR view pipeline
# ----------------------------------------------------------------------------------------------

class SimCLRAugment:
    """One SimCLR view per call (SimCLR v1 appendix A), each family of ops switched on or off by
    one argument (Study 1's seven combinations):

      crop   random resized crop to size x size (scale, aspect 3/4-4/3); when off, the image is
             only resized bilinearly to size x size if it differs;
      flip   horizontal flip, p = 0.5;
      color  color jitter of strength `strength` with p = 0.8, then grayscale with p = `grayscale`
             (SimCLR: 0.2);
      blur   Gaussian blur, p = 0.5, sigma U[0.1, 2], kernel blur_kernel_size(size).

    Ops run, and draw from the generator, in that order (the flip flags first), so a view equals
    the random ops called one after the other with the same generator. Crop, resize and flip are
    one grid_sample. Call it twice on a batch for the two views. With every op off and the size
    already right, the (float) input itself is returned.
    """

    JITTER_P = 0.8
    GRAYSCALE_P = 0.2
    FLIP_P = 0.5
    BLUR_P = 0.5
    BLUR_SIGMA = (0.1, 2.0)

    def __init__(self, size: int, crop: bool = True, flip: bool = True, color: bool = True,
                 blur: bool = False, strength: float = 0.5, scale: tuple[float, float] = (0.08, 1.0),
                 grayscale: float = GRAYSCALE_P) -> None:
        self.size = _check_positive_int(size, "size", " (the side of the square output)")
        _check_switches(crop=crop, flip=flip, color=color, blur=blur)
        self.crop, self.flip, self.color, self.blur = crop, flip, color, blur
        self.strength = _check_strength(strength)
        self.scale = _check_range(scale, "scale")
        self.grayscale = _check_probability(grayscale, "grayscale")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: (B, 3, H, W) float in [0, 1] or uint8. Returns (B, 3, size, size) float in [0, 1]."""
        x = _as_images(x)
        _check_generator(generator, x.device)
        batch, _, height, width = x.shape
        flip = _uniform((batch,), generator, x.device) < self.FLIP_P if self.flip else None
        if self.crop:
            boxes = sample_resized_crop_boxes(batch, height, width, self.scale, SIMCLR_RATIO, generator, x.device)
            x = _resample(x, boxes, self.size, self.size, flip)
        elif (height, width) != (self.size, self.size):
            zeros = x.new_zeros(batch)
            whole = torch.stack((zeros, zeros, zeros + height, zeros + width), dim=1)
            x = _resample(x, whole, self.size, self.size, flip)
        elif flip is not None:
            x = hflip(x, flip)
        if self.color:
            x = color_jitter(x, self.strength, self.JITTER_P, generator)
            x = random_grayscale(x, self.grayscale, generator)
        if self.blur:
            x = random_gaussian_blur(x, self.BLUR_P, blur_kernel_size(self.size), self.BLUR_SIGMA, generator)
        return x

    def describe(self) -> str:
        """Short name of the enabled ops, e.g. "crop+flip+color(s=0.5)" ("color(s=0.5,gray=0.5)" when the
        grayscale probability is not SimCLR's 0.2), or "none"."""
        parts = []
        if self.crop:
            parts.append("crop" if self.scale == (0.08, 1.0) else f"crop(scale={self.scale[0]:g}-{self.scale[1]:g})")
        if self.flip:
            parts.append("flip")
        if self.color:
            gray = "" if self.grayscale == self.GRAYSCALE_P else f",gray={self.grayscale:g}"
            parts.append(f"color(s={self.strength:g}{gray})")
        if self.blur:
            parts.append("blur")
        return "+".join(parts) if parts else "none"

    def __repr__(self) -> str:
        return (f"SimCLRAugment(size={self.size}, crop={self.crop}, flip={self.flip}, color={self.color}, "
                f"blur={self.blur}, strength={self.strength:g}, scale={self.scale}, grayscale={self.grayscale:g})")


# ----------------------------------------------------------------------------------------------
# Random ops
# ----------------------------------------------------------------------------------------------

def random_resized_crop(x: torch.Tensor, size: int | Sequence[int], scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = SIMCLR_RATIO,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop (SimCLR v1 appendix A) with a box per image from
    sample_resized_crop_boxes, resized bilinearly to `size` (int or (height, width)).

    x: (B, 3, H, W). Returns (B, 3, height, width) float.
    """
    x = _as_images(x)
    out_height, out_width = _check_size(size)
    _check_generator(generator, x.device)
    boxes = sample_resized_crop_boxes(x.shape[0], x.shape[2], x.shape[3], scale, ratio, generator, x.device)
    return _resample(x, boxes, out_height, out_width, flip=None)


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability p. x: (B, 3, H, W) -> (B, 3, H, W) float."""
    x = _as_images(x)
    p = _check_probability(p)
    _check_generator(generator, x.device)
    return hflip(x, _uniform((x.shape[0],), generator, x.device) < p)


def color_jitter(x: torch.Tensor, strength: float = 1.0, p: float = 0.8,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """SimCLR color jitter of strength s: with probability p, brightness/contrast/saturation
    factors U[max(0, 1 - 0.8 s), 1 + 0.8 s] and a hue shift U[-0.2 s, 0.2 s], applied in a
    random order per image. x: (B, 3, H, W) -> (B, 3, H, W) float.
    """
    x = _as_images(x)
    _check_generator(generator, x.device)
    return apply_color_jitter(x, sample_color_jitter(x.shape[0], strength, p, generator, x.device))


def random_grayscale(x: torch.Tensor, p: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each image by its luma with probability p, keeping 3 channels.
    x: (B, 3, H, W) -> (B, 3, H, W) float."""
    x = _as_images(x)
    p = _check_probability(p)
    _check_generator(generator, x.device)
    chosen = _uniform((x.shape[0],), generator, x.device) < p
    return torch.where(chosen.view(-1, 1, 1, 1), rgb_to_grayscale(x), x)


def random_gaussian_blur(x: torch.Tensor, p: float = 0.5, kernel_size: int | None = None,
                         sigma: tuple[float, float] = (0.1, 2.0),
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Blur each image with probability p with its own sigma ~ U[sigma] (SimCLR v1 appendix A).

    x: (B, 3, H, W). kernel_size: odd int, or None for blur_kernel_size(min(H, W)).
    Returns (B, 3, H, W) float.
    """
    x = _as_images(x)
    p = _check_probability(p)
    sigma_lo, sigma_hi = _check_range(sigma, "sigma")
    _check_generator(generator, x.device)
    if kernel_size is None:
        kernel_size = blur_kernel_size(min(x.shape[2], x.shape[3]))
    u = _uniform((x.shape[0], 2), generator, x.device)
    chosen = u[:, 0] < p
    sigmas = (sigma_lo + (sigma_hi - sigma_lo) * u[:, 1]).to(x.dtype)
    blurred = gaussian_blur(x, kernel_size, sigmas)
    return torch.where(chosen.view(-1, 1, 1, 1), blurred, x)


def blur_kernel_size(side: int) -> int:
    """SimCLR's blur kernel: 10% of the image side, made odd as the official code does
    (radius = side // 10 // 2, size 2 * radius + 1): 23 at 224, 7 at 64, 3 at 32, 1 below 20."""
    side = _check_positive_int(side, "side")
    return 2 * (side // 10 // 2) + 1


# ----------------------------------------------------------------------------------------------
# Parameter samplers (and the batched application of color jitter parameters)
# ----------------------------------------------------------------------------------------------

def sample_resized_crop_boxes(batch: int, height: int, width: int, scale: tuple[float, float] = (0.08, 1.0),
                              ratio: tuple[float, float] = SIMCLR_RATIO,
                              generator: torch.Generator | None = None,
                              device: torch.device | str | None = None) -> torch.Tensor:
    """RandomResizedCrop boxes for `batch` images of height x width pixels.

    As torchvision's RandomResizedCrop: area fraction U[scale], aspect ratio (width / height)
    log-uniform in `ratio`, sides rounded to whole pixels; the first of 10 tries that fits is
    placed uniformly at random, and an image whose 10 tries all fail gets the largest centred
    crop with its ratio clamped into `ratio`. All 10 tries of all images are drawn at once.
    Returns (batch, 4) float32 top, left, height, width (whole numbers) on `device`.
    """
    _check_positive_int(batch, "batch")
    height, width = _check_size((height, width), "(height, width)")
    scale = _check_range(scale, "scale")
    ratio = _check_range(ratio, "ratio")
    device = _sampling_device(device, generator)
    u = _uniform((batch, 2 * CROP_ATTEMPTS + 2), generator, device)
    area = height * width
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[:, :CROP_ATTEMPTS])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, CROP_ATTEMPTS:2 * CROP_ATTEMPTS])
    crop_w = torch.sqrt(target_area * aspect).round_()
    crop_h = torch.sqrt(target_area / aspect).round_()
    fits = (crop_w >= 1) & (crop_w <= width) & (crop_h >= 1) & (crop_h <= height)
    tries = torch.arange(CROP_ATTEMPTS, device=device)
    first_fit = torch.where(fits, tries, CROP_ATTEMPTS).amin(dim=1, keepdim=True)
    found = first_fit.squeeze(1) < CROP_ATTEMPTS
    first_fit = first_fit.clamp_(max=CROP_ATTEMPTS - 1)
    crop_w = crop_w.gather(1, first_fit).squeeze(1)
    crop_h = crop_h.gather(1, first_fit).squeeze(1)

    # The fallback depends only on the image size, so it is plain Python arithmetic.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = int(round(height * ratio[1])), height
    else:
        fallback_w, fallback_h = width, height
    crop_w = torch.where(found, crop_w, float(fallback_w))
    crop_h = torch.where(found, crop_h, float(fallback_h))
    # floor(u * n) is uniform over 0..n-1; the clamp guards u * n rounding up to n in float32.
    top = torch.minimum((u[:, -2] * (height - crop_h + 1)).floor_(), height - crop_h)
    left = torch.minimum((u[:, -1] * (width - crop_w + 1)).floor_(), width - crop_w)
    top = torch.where(found, top, float((height - fallback_h) // 2))
    left = torch.where(found, left, float((width - fallback_w) // 2))
    return torch.stack((top, left, crop_h, crop_w), dim=1)


class JitterParams(NamedTuple):
    """Per-image color jitter parameters, each with batch size B on one device.

    applied (B,) bool: jitter this image at all. brightness, contrast, saturation (B,) factors;
    hue (B,) shift in turns. order (B, 4) int64: order[i, k] is the k-th op applied to image i,
    0 = brightness, 1 = contrast, 2 = saturation, 3 = hue (torchvision's fn_idx convention).
    """
    applied: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor


def sample_color_jitter(batch: int, strength: float = 1.0, p: float = 0.8,
                        generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> JitterParams:
    """Draw SimCLR color jitter parameters for `batch` images (SimCLR v1 appendix A).

    With probability p an image is jittered: brightness, contrast and saturation factors
    U[max(0, 1 - 0.8 s), 1 + 0.8 s], hue shift U[-0.2 s, 0.2 s], in a uniformly random order
    (the argsort of 4 uniforms). Images not jittered get identity factors. One draw of (B, 9).
    """
    _check_positive_int(batch, "batch")
    strength = _check_strength(strength)
    p = _check_probability(p)
    device = _sampling_device(device, generator)
    u = _uniform((batch, 9), generator, device)
    applied = u[:, 0] < p
    spread = 0.8 * strength
    low, high = max(0.0, 1.0 - spread), 1.0 + spread
    factors = torch.where(applied.unsqueeze(1), low + (high - low) * u[:, 1:4], 1.0)
    hue = torch.where(applied, 0.2 * strength * (2.0 * u[:, 4] - 1.0), 0.0)
    order = u[:, 5:9].argsort(dim=1)
    return JitterParams(applied, factors[:, 0], factors[:, 1], factors[:, 2], hue, order)


def apply_color_jitter(x: torch.Tensor, params: JitterParams) -> torch.Tensor:
    """Apply brightness, contrast, saturation and hue to each image in its own order.

    x: (B, 3, H, W). params: a JitterParams for B images. Returns (B, 3, H, W) float: image i
    as adjust_* called in the order params.order[i] with its factors, or unchanged where
    params.applied is False.
    """
    x = _as_images(x)
    batch = x.shape[0]
    _check_jitter_params(params, batch)
    # No loop over images: the three blend ops (brightness, contrast, saturation) are all
    # clip(f * x + (1 - f) * target) with target 0, the mean luma or the pixel luma, so one blend
    # step can run a different one on each image (a factor of 1 is an exact no-op). Hue, the
    # costly op, runs once at the same step for every image: the ops an image applies before
    # its hue fill the three steps just before it, those after it the three steps after.
    device = x.device
    applied = params.applied.to(device=device, dtype=torch.bool)
    order = params.order.to(device=device, dtype=torch.long)
    blend_factors = torch.stack((params.brightness, params.contrast, params.saturation), dim=1)
    blend_factors = blend_factors.to(device=device, dtype=x.dtype)
    hue_position = (order == _HUE).long().argmax(dim=1, keepdim=True)
    # Steps -3, -2, -1 run before the hue pass and 1, 2, 3 after it, relative to each image's
    # hue position; a step outside 0..3 is an identity (factor 1).
    step_offsets = torch.arange(6, device=device) - 3
    step_offsets = step_offsets + (step_offsets >= 0).long()
    step_positions = hue_position + step_offsets
    in_range = (step_positions >= 0) & (step_positions <= 3)
    step_ops = order.gather(1, step_positions.clamp(0, 3))
    step_factors = blend_factors.gather(1, step_ops.clamp(max=_SATURATION))
    step_factors = torch.where(in_range, step_factors, 1.0).view(batch, 6, 1, 1, 1)
    # 0/1 weights pick each image's blend target: brightness blends towards 0 (both weights 0),
    # contrast towards its mean luma, saturation towards its per-pixel luma. One fused
    # multiply-add instead of two per-pixel selects, which are slow on CPU.
    uses_mean = (step_ops == _CONTRAST).to(x.dtype).view(batch, 6, 1, 1, 1)
    uses_luma = (step_ops == _SATURATION).to(x.dtype).view(batch, 6, 1, 1, 1)

    def blend_step(images: torch.Tensor, step: int) -> torch.Tensor:
        gray = rgb_to_grayscale(images)
        mean_gray = gray.mean(dim=(-2, -1), keepdim=True)
        target = torch.addcmul(mean_gray * uses_mean[:, step], gray, uses_luma[:, step])
        return _blend(images, target, step_factors[:, step])

    out = x
    for step in range(3):
        out = blend_step(out, step)
    out = adjust_hue(out, params.hue.to(device=device, dtype=x.dtype))
    for step in range(3, 6):
        out = blend_step(out, step)
    # The HSV round trip is exact only up to rounding: keep untouched images bit-identical.
    return torch.where(applied.view(-1, 1, 1, 1), out, x)


# ----------------------------------------------------------------------------------------------
# Deterministic primitives
# ----------------------------------------------------------------------------------------------

def rgb_to_grayscale(x: torch.Tensor, num_output_channels: int = 1) -> torch.Tensor:
    """Luma 0.2989 R + 0.587 G + 0.114 B of each pixel.

    x: (B, 3, H, W) float in [0, 1] (or uint8). Returns (B, num_output_channels, H, W), float;
    num_output_channels is 1 or 3 (3 repeats the luma, so the result is still an RGB image).
    """
    x = _as_images(x)
    _check_output_channels(num_output_channels)
    red, green, blue = x.unbind(1)
    gray = red.mul(GRAY_WEIGHTS[0]).add_(green, alpha=GRAY_WEIGHTS[1]).add_(blue, alpha=GRAY_WEIGHTS[2])
    gray = gray.unsqueeze(1)
    return gray.expand(-1, 3, -1, -1).contiguous() if num_output_channels == 3 else gray


def adjust_brightness(x: torch.Tensor, factor: Factor) -> torch.Tensor:
    """Scale every pixel by `factor` (0 gives black, 1 the original), clipped to [0, 1].

    x: (B, 3, H, W). factor: a number >= 0 or a (B,) tensor. Returns (B, 3, H, W) float.
    """
    x = _as_images(x)
    return (x * _per_image(factor, x, "factor", minimum=0.0)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: Factor) -> torch.Tensor:
    """Blend each image with the mean of its grayscale version (0 gives a flat gray image),
    clipped to [0, 1].

    x: (B, 3, H, W). factor: a number >= 0 or a (B,) tensor. Returns (B, 3, H, W) float.
    """
    x = _as_images(x)
    factor = _per_image(factor, x, "factor", minimum=0.0)
    mean_gray = rgb_to_grayscale(x).mean(dim=(-2, -1), keepdim=True)
    return _blend(x, mean_gray, factor)


def adjust_saturation(x: torch.Tensor, factor: Factor) -> torch.Tensor:
    """Blend each pixel with its own luma (0 gives the grayscale image, 2 doubles the saturation),
    clipped to [0, 1].

    x: (B, 3, H, W). factor: a number >= 0 or a (B,) tensor. Returns (B, 3, H, W) float.
    """
    x = _as_images(x)
    factor = _per_image(factor, x, "factor", minimum=0.0)
    return _blend(x, rgb_to_grayscale(x), factor)


def _blend(x: torch.Tensor, target: torch.Tensor | float, factor: Factor) -> torch.Tensor:
    """factor * x + (1 - factor) * target, clipped back into [0, 1] as the reference does."""
    if not isinstance(target, torch.Tensor):
        target = torch.full((), target, dtype=x.dtype, device=x.device)
    if not isinstance(factor, torch.Tensor):
        factor = torch.full((), factor, dtype=x.dtype, device=x.device)
    # lerp broadcasts target and factor in one pass; a factor of exactly 1 returns x exactly.
    return torch.lerp(target, x, factor).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, hue_factor: Factor) -> torch.Tensor:
    """Rotate the hue of every pixel by `hue_factor` turns in HSV space, keeping its saturation
    and value (0.5 gives the complementary colour; +1/3 turns pure red into pure green).

    x: (B, 3, H, W) in [0, 1]. hue_factor: a number in [-0.5, 0.5] or a (B,) tensor.
    Returns (B, 3, H, W) float.
    """
    x = _as_images(x)
    shift = _per_image(hue_factor, x, "hue_factor", minimum=-0.5, maximum=0.5)
    if isinstance(shift, torch.Tensor):
        shift = shift.squeeze(1)
    red, green, blue = x.unbind(1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    # A gray pixel (chroma 0) has numerator 0 below and so hue 0; its hue is irrelevant anyway
    # because chroma 0 leaves it unchanged. The clamp only keeps 0 / 0 out.
    safe_chroma = chroma.clamp_min(torch.finfo(x.dtype).tiny)
    # Hue in sixths of a turn, from whichever channel is largest (red first on ties, as PIL).
    hue = torch.where(value == red, green - blue,
                      torch.where(value == green, (blue - red).add_(chroma, alpha=2.0),
                                  (red - green).add_(chroma, alpha=4.0))).div_(safe_chroma)
    hue = (hue + shift * 6.0).unsqueeze(1)
    # Closed form of HSV -> RGB: channel n in (5, 3, 1) for (R, G, B) drops from the value by
    # chroma * clip(min(k, 4 - k), 0, 1) with k = (n + hue) mod 6; value * saturation = chroma.
    offsets = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (offsets + hue).remainder_(6.0)
    drop = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(value.unsqueeze(1), chroma.unsqueeze(1), drop, value=-1.0)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: Factor) -> torch.Tensor:
    """Blur with a kernel_size x kernel_size Gaussian of standard deviation `sigma` pixels
    (taps at integer offsets, normalised to sum 1), reflecting the image at its borders.

    x: (B, 3, H, W). kernel_size: odd int >= 1, with kernel_size // 2 < min(H, W) (reflection
    needs that many pixels). sigma: a number > 0 or a (B,) tensor (one kernel per image).
    Returns (B, 3, H, W) float.
    """
    x = _as_images(x)
    batch, channels, height, width = x.shape
    radius = _check_kernel_size(kernel_size, height, width)
    sigma = _per_image(sigma, x, "sigma", positive=True)
    weights = _gaussian_weights(int(kernel_size), sigma, batch, x)
    # One depthwise convolution per axis, with one group per (image, channel): per-image
    # kernels without a loop. The 2-D Gaussian is the product of the two 1-D ones, and
    # reflecting rows then columns equals reflecting the 2-D border.
    taps = weights.repeat_interleave(channels, dim=0)
    planes = x.reshape(1, batch * channels, height, width)
    with _autocast_off(x.device):
        planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="reflect"),
                          taps.view(-1, 1, 1, kernel_size), groups=batch * channels)
        planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="reflect"),
                          taps.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return planes.view(batch, channels, height, width)


def _gaussian_weights(kernel_size: int, sigma: Factor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """(batch, kernel_size) normalised 1-D Gaussian taps at integer offsets."""
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, device=like.device, dtype=like.dtype)
    sigma = sigma.view(-1, 1) if isinstance(sigma, torch.Tensor) else sigma
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.expand(batch, kernel_size)


def hflip(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror images left-right: all of them, or only those where mask is True.

    x: (B, 3, H, W). mask: None or a (B,) bool tensor. Returns (B, 3, H, W) float.
    """
    x = _as_images(x)
    if mask is None:
        return x.flip(-1)
    return torch.where(_per_image_mask(mask, x), x.flip(-1), x)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Crop box i out of image i, then resize it bilinearly (align_corners=False, no antialias)
    to `size` (int or (height, width)): cropping then F.interpolate, image by image.

    x: (B, 3, H, W). boxes: (B, 4) top, left, height, width in pixels (parts outside the image
    read as 0, as the reference pads; fractional boxes give the continuous extension).
    Returns (B, 3, height, width) float. The one grid_sample's normalised coordinates cost
    about W * 1e-7 pixel in float32, so the 1e-4 agreement holds up to about 1,500 pixels wide.
    """
    x = _as_images(x)
    out_height, out_width = _check_size(size)
    return _resample(x, _check_boxes(boxes, x), out_height, out_width, flip=None)


def _resample(x: torch.Tensor, boxes: torch.Tensor, out_height: int, out_width: int,
              flip: torch.Tensor | None) -> torch.Tensor:
    """Crop-then-resize of every image in one grid_sample, optionally mirrored per image."""
    batch, _, height, width = x.shape
    top, left, box_height, box_width = boxes.to(device=x.device, dtype=x.dtype).unbind(1)
    cols = _crop_sample_positions(left, box_width, out_width)
    rows = _crop_sample_positions(top, box_height, out_height)
    if flip is not None:
        # Mirroring the output is reading its columns in reverse order, so it costs nothing here.
        cols = torch.where(flip.view(-1, 1), cols.flip(-1), cols)
    # grid_sample (align_corners=False) maps pixel p to (2p + 1) / size - 1. Zero padding
    # outside the image matches the reference, which pads crops that overhang with zeros.
    grid_x = (2.0 * cols + 1.0) / width - 1.0
    grid_y = (2.0 * rows + 1.0) / height - 1.0
    grid = torch.stack((grid_x.unsqueeze(1).expand(batch, out_height, out_width),
                        grid_y.unsqueeze(2).expand(batch, out_height, out_width)), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _crop_sample_positions(start: torch.Tensor, extent: torch.Tensor, out_size: int) -> torch.Tensor:
    """(B, out_size) source pixel positions of a bilinear resize (align_corners=False) of the
    crop [start, start + extent) to out_size pixels, in the full image's pixel coordinates."""
    out_index = torch.arange(out_size, device=start.device, dtype=start.dtype)
    scale = (extent / out_size).unsqueeze(1)
    within = ((out_index + 0.5) * scale - 0.5).clamp_(min=0.0)
    # Resizing the cropped tensor never reads past its last row/column: clamp there, so the
    # sampler does not blend in the pixel just outside the crop.
    within = torch.minimum(within, (extent - 1.0).unsqueeze(1))
    return start.unsqueeze(1) + within


# ----------------------------------------------------------------------------------------------
# Shared plumbing
# ----------------------------------------------------------------------------------------------

def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Always float32 so that a seed gives the same parameters whatever the images' dtype.
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    # The training step calls the augmentation under autocast, which would run the blur's
    # convolution in float16/bfloat16 and lose the 1e-4 agreement with the reference.
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


# ----------------------------------------------------------------------------------------------
# Input checks (shapes, dtypes and Python scalars only: none of these waits for the device)
# ----------------------------------------------------------------------------------------------

# -- Images --

def _as_images(x: object, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(x).__name__}")
    if x.ndim == 3 and x.shape[0] == 3:
        raise ValueError(
            f"{name} must be a batch of shape (B, 3, H, W), got a single image of shape {tuple(x.shape)}; "
            f"use {name}.unsqueeze(0) for a batch of one")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        raise ValueError(f"{name} must have 3 (RGB) channels in dimension 1, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name} must hold at least one image of at least 1x1 pixels, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if x.dtype in (torch.float32, torch.float64):
        return x
    if x.dtype in (torch.float16, torch.bfloat16):
        # 8-11 mantissa bits are too few for the HSV round trip and bilinear weights.
        return x.to(torch.float32)
    raise ValueError(
        f"{name} must be uint8 in [0, 255] or floating point in [0, 1], got dtype {x.dtype}")


# -- Python numbers and flags --

def _check_positive_int(value: object, name: str, meaning: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int{meaning}, got {value!r}")
    return int(value)


def _check_probability(p: object, name: str = "p") -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _check_strength(strength: object) -> float:
    # The hue shift 0.2 * strength must stay within half a turn.
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= float(strength) <= 2.5:
        raise ValueError(f"strength must be a number in [0, 2.5] (hue shift 0.2 * strength <= 0.5), got {strength!r}")
    return float(strength)


def _check_range(bounds: object, name: str) -> tuple[float, float]:
    ok = (isinstance(bounds, Sequence) and len(bounds) == 2
          and all(isinstance(b, numbers.Real) and not isinstance(b, bool) and math.isfinite(b) for b in bounds))
    if ok:
        lo, hi = float(bounds[0]), float(bounds[1])
        ok = 0.0 < lo <= hi
    if not ok:
        raise ValueError(f"{name} must be a pair (min, max) of finite numbers with 0 < min <= max, got {bounds!r}")
    return lo, hi


def _check_size(size: object, name: str = "size") -> tuple[int, int]:
    pair = (size, size) if isinstance(size, numbers.Integral) and not isinstance(size, bool) else size
    if (not isinstance(pair, Sequence) or len(pair) != 2
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in pair)):
        raise ValueError(f"{name} must be a positive int or a pair (height, width) of positive ints, got {size!r}")
    return int(pair[0]), int(pair[1])


def _check_kernel_size(kernel_size: object, height: int, width: int) -> int:
    """Returns the blur radius kernel_size // 2."""
    if (isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral)
            or kernel_size < 1 or kernel_size % 2 == 0):
        raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
    radius = int(kernel_size) // 2
    if radius >= min(height, width):
        raise ValueError(f"kernel_size {kernel_size} is too large for {height}x{width} images: reflection "
                         f"padding needs kernel_size // 2 < min(H, W)")
    return radius


def _check_output_channels(num_output_channels: object) -> None:
    if num_output_channels not in (1, 3) or isinstance(num_output_channels, bool):
        raise ValueError(f"num_output_channels must be 1 or 3, got {num_output_channels!r}")


def _check_switches(**switches: object) -> None:
    for name, switch in switches.items():
        if not isinstance(switch, bool):
            raise ValueError(f"{name} must be True or False, got {switch!r}")


# -- Per-image parameter tensors --

def _per_image(value: object, x: torch.Tensor, name: str, minimum: float | None = None,
               maximum: float | None = None, positive: bool = False) -> Factor:
    """A scalar stays a Python float (after its range check); a tensor becomes (B, 1, 1, 1)."""
    batch = x.shape[0]
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must hold real numbers, got dtype {value.dtype}")
        if value.ndim == 0:
            value = value.reshape(1)
        elif value.shape != (batch,):
            raise ValueError(f"{name} must be a number or a tensor of shape ({batch},) (one value per image), "
                             f"got shape {tuple(value.shape)}")
        return value.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number or a tensor of shape ({batch},), got {value!r}")
    value = float(value)
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be in [{minimum}, {'inf' if maximum is None else maximum}], got {value}")
    return value


def _per_image_mask(mask: object, x: torch.Tensor, name: str = "mask") -> torch.Tensor:
    batch = x.shape[0]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (batch,):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor of shape ({batch},) (one flag per image), got {shape}")
    return mask.to(x.device).view(-1, 1, 1, 1)


def _check_boxes(boxes: object, x: torch.Tensor) -> torch.Tensor:
    batch = x.shape[0]
    if not isinstance(boxes, torch.Tensor) or boxes.shape != (batch, 4) or boxes.dtype == torch.bool \
            or boxes.is_complex():
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a real tensor of shape ({batch}, 4) holding top, left, height, "
                         f"width in pixels (one box per image), got {shape}")
    return boxes


def _check_jitter_params(params: object, batch: int) -> None:
    if not isinstance(params, JitterParams):
        raise ValueError(f"params must be a JitterParams (from sample_color_jitter), got {type(params).__name__}")
    for name in ("applied", "brightness", "contrast", "saturation", "hue"):
        value = getattr(params, name)
        if not isinstance(value, torch.Tensor) or value.shape != (batch,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"params.{name} must be a tensor of shape ({batch},), got {shape}")
    if not isinstance(params.order, torch.Tensor) or params.order.shape != (batch, 4) \
            or params.order.is_floating_point():
        raise ValueError(f"params.order must be an integer tensor of shape ({batch}, 4) holding a permutation "
                         f"of 0..3 per image")


# -- Generator and device --

def _check_generator(generator: object, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gen_device = generator.device
    same = gen_device.type == device.type and (
        gen_device.index is None or device.index is None or gen_device.index == device.index)
    if not same:
        raise ValueError(f"generator must be on the images' device {device}, got a generator on {gen_device}; "
                         f"create it with torch.Generator(device=x.device)")


def _sampling_device(device: torch.device | str | None, generator: object) -> torch.device:
    """The samplers' device (CPU by default), checked against the generator's."""
    device = torch.device("cpu") if device is None else torch.device(device)
    _check_generator(generator, device)
    return device
