"""Preprocessing and augmentation on the device, in jax (DESIGN.md §4).

Images reach the device as uint8 (a quarter of float32's bytes) and one
jitted function per generation makes the model's inputs there: random crop
and its resize (one resampling), horizontal flip, colour jitter (brightness,
contrast, saturation, hue), scaling to [-1, 1] and clipping. It computes
what `evolve.data.preprocess` (the host reference) computes, with the same
formulas: the equivalence tests compare both on the same crop boxes, flip
masks and jitter factors. JPEG-quality jitter needs a JPEG codec and stays on
the host (uint8 in, uint8 out, in the prefetch thread).

Resampling is written as matrices: a resize along one axis is a weight
matrix (output pixels x input pixels) of the same antialiased triangle
filter the host uses, applied with two einsums at full float32 precision
(TF32 would cost accuracy on GPUs; the matmuls are a rounding error of a
ViT step). Evaluation resizes build their matrices at trace time with
numpy, so train with every augmentation off calls the very function eval
calls, and both are bit-identical.

Which augmentations run is static (`Augmentation`), their magnitudes are
a traced float32 vector, so a new generation's values never recompile.
Compiled programs live in the bounded training cache (evolve.train.steps).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from evolve.config import AUGMENTATION_OFF
from evolve.types import HyperValue

_HIGHEST = jax.lax.Precision.HIGHEST
# RGB -> YIQ (NTSC); the hue jitter rotates the I/Q plane (as the host reference).
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
    dtype=np.float64,
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Order of the magnitudes in the traced vector.
MAGNITUDES = ("crop_area", "crop_aspect", "brightness", "contrast", "saturation", "hue")


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Which augmentations a generation runs (static: part of the program)."""

    crop: bool = False
    flip: bool = False
    brightness: bool = False
    contrast: bool = False
    saturation: bool = False
    hue: bool = False

    @classmethod
    def of(cls, hparams: Mapping[str, HyperValue]) -> Augmentation:
        value = {name: hparams.get(name, AUGMENTATION_OFF[name]) for name in AUGMENTATION_OFF}
        return cls(
            crop=float(value["crop_area"]) < 1.0,
            flip=bool(value["flip"]),
            brightness=float(value["brightness"]) > 0,
            contrast=float(value["contrast"]) > 0,
            saturation=float(value["saturation"]) > 0,
            hue=float(value["hue"]) > 0,
        )

    @property
    def off(self) -> bool:
        return not any(dataclasses.astuple(self))


def magnitudes(hparams: Mapping[str, HyperValue]) -> np.ndarray:
    """The generation's augmentation magnitudes, float32 in MAGNITUDES order."""
    values = [float(hparams.get(name, AUGMENTATION_OFF[name])) for name in MAGNITUDES]
    values[0] = max(values[0], 1e-3)  # a crop keeps at least 0.1% of the image, as the host
    return np.asarray(values, dtype=np.float32)


# ---- resampling ----------------------------------------------------------------


def _triangle_weights(xp, out_size: int, in_size: int, start, length):
    """(N, out_size, in_size) weights of the host's antialiased bilinear filter:
    output pixel i samples input [start, start + length) at its centre, with a
    triangle of radius max(1, shrink factor); weights are normalised per output
    pixel (which clamps at the borders). `xp` is numpy or jax.numpy."""
    start = start[:, None, None]
    length = length[:, None, None]
    scale = length / out_size
    centres = start + (xp.arange(out_size)[None, :, None] + 0.5) * scale - 0.5
    radius = xp.maximum(scale, 1.0)
    weights = xp.maximum(0.0, 1.0 - xp.abs(xp.arange(in_size)[None, None, :] - centres) / radius)
    return weights / xp.maximum(weights.sum(axis=-1, keepdims=True), 1e-12)


def _static_weights(out_size: int, in_size: int) -> np.ndarray:
    """The full-image resize matrix (out_size, in_size), in float64 then float32
    as the host reference computes its taps."""
    ones = np.ones((1,), np.float64)
    return _triangle_weights(np, out_size, in_size, 0.0 * ones, in_size * ones)[0].astype(np.float32)


def resize(images: jax.Array, image_size: int) -> jax.Array:
    """uint8 (N, H, W, 3) -> float32 (N, S, S, 3) in 0..255: the whole image
    resized (none when it already has the size)."""
    _, h, w, _ = images.shape
    pixels = images.astype(jnp.float32)
    if (h, w) == (image_size, image_size):
        return pixels
    rows = jnp.einsum("sh,nhwc->nswc", _static_weights(image_size, h), pixels, precision=_HIGHEST)
    return jnp.einsum("tw,nswc->nstc", _static_weights(image_size, w), rows, precision=_HIGHEST)


def crop_resize(images: jax.Array, boxes: jax.Array, image_size: int) -> jax.Array:
    """Each image's box (y0, x0, height, width), float32 (N, 4), resampled to
    S x S: float32 0..255."""
    _, h, w, _ = images.shape
    weights_y = _triangle_weights(jnp, image_size, h, boxes[:, 0], boxes[:, 2])
    weights_x = _triangle_weights(jnp, image_size, w, boxes[:, 1], boxes[:, 3])
    rows = jnp.einsum("nsh,nhwc->nswc", weights_y, images.astype(jnp.float32), precision=_HIGHEST)
    return jnp.einsum("ntw,nswc->nstc", weights_x, rows, precision=_HIGHEST)


def crop_boxes(key: jax.Array, n: int, h: int, w: int, min_area: jax.Array, min_aspect: jax.Array) -> jax.Array:
    """Random boxes (y0, x0, height, width), (N, 4), covering >= min_area of the
    image with width / height in [min_aspect, 1 / min_aspect] (the host's law)."""
    area_key, aspect_key, y_key, x_key = jax.random.split(key, 4)
    area = jax.random.uniform(area_key, (n,), minval=min_area, maxval=1.0) * (h * w)
    bound = jnp.where(min_aspect > 0, jnp.abs(jnp.log(jnp.minimum(min_aspect, 1.0 / min_aspect))), 0.0)
    aspect = jnp.exp(jax.random.uniform(aspect_key, (n,), minval=-bound, maxval=bound))
    width = jnp.clip(jnp.sqrt(area * aspect), 1.0, w)
    height = jnp.clip(jnp.sqrt(area / aspect), 1.0, h)
    y0 = jax.random.uniform(y_key, (n,)) * (h - height)
    x0 = jax.random.uniform(x_key, (n,)) * (w - width)
    return jnp.stack([y0, x0, height, width], axis=1)


# ---- flip and colour -----------------------------------------------------------


def flip(pixels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mirrors left-right the images where mask (N,) is true."""
    return jnp.where(mask[:, None, None, None], pixels[:, :, ::-1], pixels)


@dataclasses.dataclass(frozen=True)
class Jitter:
    """Per-image colour factors, (N,) each; None where that jitter is off."""

    brightness: jax.Array | None = None  # added, in units of 255
    contrast: jax.Array | None = None
    saturation: jax.Array | None = None
    hue: jax.Array | None = None  # rotation angle, radians


def sample_jitter(key: jax.Array, n: int, augmentation: Augmentation, values: jax.Array) -> Jitter:
    """Draws the colour factors the host reference draws, from `key`."""
    keys = jax.random.split(key, 4)
    _, _, brightness, contrast, saturation, hue = (values[i] for i in range(len(MAGNITUDES)))

    def symmetric(k: jax.Array, delta: jax.Array) -> jax.Array:
        return jax.random.uniform(k, (n,), minval=-delta, maxval=delta)

    return Jitter(
        brightness=symmetric(keys[0], brightness) if augmentation.brightness else None,
        contrast=1.0 + symmetric(keys[1], contrast) if augmentation.contrast else None,
        saturation=1.0 + symmetric(keys[2], saturation) if augmentation.saturation else None,
        hue=symmetric(keys[3], hue) * (2.0 * math.pi) if augmentation.hue else None,
    )


def colour_jitter(pixels: jax.Array, jitter: Jitter) -> jax.Array:
    """Brightness, contrast, saturation, hue on float32 0..255, in the host's order."""

    def per_image(values: jax.Array) -> jax.Array:
        return values.astype(jnp.float32)[:, None, None, None]

    if jitter.brightness is not None:
        pixels = pixels + per_image(jitter.brightness * 255.0)
    if jitter.contrast is not None:
        mean = pixels.mean(axis=(1, 2), keepdims=True)
        pixels = (pixels - mean) * per_image(jitter.contrast) + mean
    if jitter.saturation is not None:
        gray = jnp.einsum("nhwc,c->nhw", pixels, _LUMA, precision=_HIGHEST)[..., None]
        pixels = gray + (pixels - gray) * per_image(jitter.saturation)
    if jitter.hue is not None:
        cos, sin = jnp.cos(jitter.hue), jnp.sin(jitter.hue)
        zero, one = jnp.zeros_like(cos), jnp.ones_like(cos)
        rotation = jnp.stack([jnp.stack([one, zero, zero], -1), jnp.stack([zero, cos, -sin], -1),
                              jnp.stack([zero, sin, cos], -1)], -2)  # (N, 3, 3)
        transform = jnp.einsum("ij,njk,kl->nil", _YIQ_TO_RGB.astype(np.float32), rotation,
                               _RGB_TO_YIQ.astype(np.float32), precision=_HIGHEST)
        pixels = jnp.einsum("nhwc,ndc->nhwd", pixels, transform, precision=_HIGHEST)
    return pixels


def to_signed_unit(pixels: jax.Array) -> jax.Array:
    """0..255 floats to [-1, 1], clipped."""
    return jnp.clip(pixels / jnp.float32(127.5) - jnp.float32(1.0), -1.0, 1.0)


# ---- the entry points --------------------------------------------------------------


def eval_inputs(images: jax.Array, image_size: int) -> jax.Array:
    """uint8 (N, H, W, 3) -> the model's float32 inputs (N, S, S, 3) in [-1, 1]."""
    return to_signed_unit(resize(images, image_size))


def train_inputs(images: jax.Array, key_data: jax.Array, values: jax.Array, *, image_size: int,
                 augmentation: Augmentation) -> jax.Array:
    """A training batch's inputs: the augmentations of `augmentation` with the
    magnitudes `values` (MAGNITUDES order) and randomness from `key_data`
    (uint32 (2,), the raw data of a threefry key). With every augmentation off
    this is `eval_inputs`, bit for bit."""
    if augmentation.off:
        return eval_inputs(images, image_size)
    n, h, w, _ = images.shape
    crop_key, flip_key, jitter_key = jax.random.split(jax.random.wrap_key_data(key_data, impl="threefry2x32"), 3)
    if augmentation.crop:
        pixels = crop_resize(images, crop_boxes(crop_key, n, h, w, values[0], values[1]), image_size)
    else:
        pixels = resize(images, image_size)
    if augmentation.flip:
        pixels = flip(pixels, jax.random.uniform(flip_key, (n,)) < 0.5)
    pixels = colour_jitter(pixels, sample_jitter(jitter_key, n, augmentation, values))
    return to_signed_unit(pixels)
