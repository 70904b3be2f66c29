"""Input preprocessing and augmentation in numpy (PIL for JPEG), DESIGN.md §3.

Training, as the mu2Net reference: JPEG-quality jitter on uint8 first, then a
random crop (minimum area / aspect), resize to the image size, horizontal
flip, colour jitter (brightness, contrast, saturation, hue), scale to [-1, 1]
and clip. Evaluation only resizes and scales. With every augmentation off,
training preprocessing equals evaluation preprocessing exactly.

Resizing is bilinear (a triangle filter, widened when shrinking so that
downscaling is antialiased, like PIL's), separable and vectorised over the
batch; a random crop and its resize are one resampling.

This is the reference. Training and validation run the same computation on
the device (evolve.data.preprocess_device), tested equal to it; serving, the
probe and exported models use this one.
"""

from __future__ import annotations

import io
import math
from typing import Any, Iterator, Mapping

import numpy as np
from PIL import Image

from evolve.config import AUGMENTATION_OFF
from evolve.data.dataset import ImageSet

# Images per chunk of the resize: bounds the float32 working memory at 224 px+.
_CHUNK = 32
# RGB -> YIQ (NTSC); the hue jitter rotates the I/Q plane.
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
    dtype=np.float64,
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _check_images(images: np.ndarray, image_size: int) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 N x H x W x 3, got {getattr(images, 'shape', type(images))}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")


def _taps(out_size: int, in_size: int, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resampling taps, per image: indices and weights, (N, out_size, K).

    Output pixel i samples the window [start, start + length) of the input at
    c = start + (i + 0.5) * length / out_size - 0.5 (pixel centres) with a
    triangle filter whose radius grows with the shrink factor (antialiasing).
    Taps outside the image get weight 0; weights are normalised per output
    pixel, which clamps at the borders.
    """
    start = np.asarray(start, dtype=np.float64)[:, None, None]
    length = np.asarray(length, dtype=np.float64)[:, None, None]
    scale = length / out_size
    centres = start + (np.arange(out_size, dtype=np.float64)[None, :, None] + 0.5) * scale - 0.5
    radius = np.maximum(scale, 1.0)
    num_taps = int(math.ceil(2.0 * float(radius.max()))) + 1
    indices = np.floor(centres - radius) + 1 + np.arange(num_taps)[None, None, :]
    weights = np.maximum(0.0, 1.0 - np.abs(indices - centres) / radius)
    weights[(indices < 0) | (indices > in_size - 1)] = 0.0
    weights /= np.maximum(weights.sum(axis=-1, keepdims=True), 1e-12)
    return np.clip(indices, 0, in_size - 1).astype(np.intp), weights.astype(np.float32)


def _resample_axis1(images: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Resamples axis 1 of (M, A, B, 3) with per-image taps (M, S, K): (M, S, B, 3)."""
    batch = np.arange(len(images))[:, None]
    out = np.zeros((len(images), indices.shape[1]) + images.shape[2:], dtype=np.float32)
    for k in range(indices.shape[2]):
        out += weights[:, :, k, None, None] * images[batch, indices[:, :, k]]
    return out


def _apply_taps(images: np.ndarray, taps_y: tuple, taps_x: tuple) -> np.ndarray:
    """Separable resampling of uint8 (N, H, W, 3) to float32 (N, S, T, 3)."""
    (iy, wy), (ix, wx) = taps_y, taps_x
    out = np.empty((len(images), iy.shape[1], ix.shape[1], 3), dtype=np.float32)
    for lo in range(0, len(images), _CHUNK):
        hi = lo + _CHUNK
        rows = _resample_axis1(images[lo:hi], iy[lo:hi], wy[lo:hi])  # (m, S, W, 3)
        cols = _resample_axis1(rows.transpose(0, 2, 1, 3), ix[lo:hi], wx[lo:hi])  # (m, T, S, 3)
        out[lo:hi] = cols.transpose(0, 2, 1, 3)
    return out


def _resize_full(images: np.ndarray, image_size: int) -> np.ndarray:
    """Resizes whole images to image_size x image_size; float32 in 0..255."""
    n, h, w, _ = images.shape
    if (h, w) == (image_size, image_size):
        return images.astype(np.float32)
    zeros, ones = np.zeros((n,)), np.ones((n,))
    return _apply_taps(images, _taps(image_size, h, zeros, h * ones), _taps(image_size, w, zeros, w * ones))


def _to_signed_unit(pixels: np.ndarray) -> np.ndarray:
    """0..255 floats to [-1, 1], clipped, float32."""
    out = pixels.astype(np.float32, copy=False) / np.float32(127.5) - np.float32(1.0)
    return np.clip(out, -1.0, 1.0, out=out)


def preprocess_eval(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 N x H x W x 3 -> float32 N x S x S x 3 in [-1, 1] (bilinear resize)."""
    _check_images(images, image_size)
    return _to_signed_unit(_resize_full(images, int(image_size)))


# ---- augmentation ------------------------------------------------------------


def jpeg_jitter(images: np.ndarray, delta: float, rng: np.random.Generator) -> np.ndarray:
    """Re-encodes each image as JPEG with a random quality in [100 (1 - delta), 100]."""
    low = int(min(100, max(1, round(100 * (1.0 - delta)))))
    qualities = rng.integers(low, 101, size=len(images))
    out = np.empty_like(images)
    for i, (image, quality) in enumerate(zip(images, qualities)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return out


def _crop_boxes(
    n: int, h: int, w: int, min_area: float, min_aspect: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random boxes (y0, x0, height, width) covering >= min_area of the image,
    with width/height aspect in [min_aspect, 1 / min_aspect]."""
    area = rng.uniform(min_area, 1.0, size=n) * (h * w)
    aspect_bound = abs(math.log(min(min_aspect, 1.0 / min_aspect))) if min_aspect > 0 else 0.0
    aspect = np.exp(rng.uniform(-aspect_bound, aspect_bound, size=n))
    width = np.clip(np.sqrt(area * aspect), 1.0, w)
    height = np.clip(np.sqrt(area / aspect), 1.0, h)
    y0 = rng.uniform(0.0, 1.0, size=n) * (h - height)
    x0 = rng.uniform(0.0, 1.0, size=n) * (w - width)
    return y0, x0, height, width


def _crop_resize(images: np.ndarray, image_size: int, min_area: float, min_aspect: float, rng) -> np.ndarray:
    """Random crop of each image, resized to image_size; float32 0..255."""
    n, h, w, _ = images.shape
    y0, x0, height, width = _crop_boxes(n, h, w, min_area, min_aspect, rng)
    return _apply_taps(images, _taps(image_size, h, y0, height), _taps(image_size, w, x0, width))


def _flip(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirrors each image left-right with probability 0.5."""
    mask = rng.random(len(pixels)) < 0.5
    pixels[mask] = pixels[mask, :, ::-1]
    return pixels


def _per_image(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32)[:, None, None, None]


def _colour_jitter(pixels: np.ndarray, hp: Mapping[str, float], rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter on 0..255 floats (in place)."""
    n = len(pixels)
    if hp["brightness"] > 0:
        pixels += _per_image(rng.uniform(-hp["brightness"], hp["brightness"], n) * 255.0)
    if hp["contrast"] > 0:
        factor = _per_image(rng.uniform(1 - hp["contrast"], 1 + hp["contrast"], n))
        mean = pixels.mean(axis=(1, 2), keepdims=True)
        pixels[...] = (pixels - mean) * factor + mean
    if hp["saturation"] > 0:
        factor = _per_image(rng.uniform(1 - hp["saturation"], 1 + hp["saturation"], n))
        gray = (pixels @ _LUMA)[..., None]
        pixels[...] = gray + (pixels - gray) * factor
    if hp["hue"] > 0:
        angle = rng.uniform(-hp["hue"], hp["hue"], n) * 2.0 * math.pi
        cos, sin = np.cos(angle), np.sin(angle)
        rotation = np.zeros((n, 3, 3))
        rotation[:, 0, 0] = 1.0
        rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
        rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
        transform = (_YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ).astype(np.float32)  # (n, 3, 3)
        pixels[...] = np.matmul(pixels, np.swapaxes(transform, 1, 2)[:, None])
    return pixels


def _augment_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The data hyperparameters with their off-defaults filled in."""
    return {name: type(off)(hparams.get(name, off)) for name, off in AUGMENTATION_OFF.items()}


def preprocess_train(
    images: np.ndarray, image_size: int, hparams: Mapping[str, Any], rng: np.random.Generator
) -> np.ndarray:
    """Augments and preprocesses a training batch; float32 N x S x S x 3 in [-1, 1].

    Deterministic given `rng`'s state. With every augmentation off this
    equals preprocess_eval(images, image_size).
    """
    _check_images(images, image_size)
    image_size = int(image_size)
    hp = _augment_hparams(hparams)
    if hp["jpeg_quality"] > 0:
        images = jpeg_jitter(images, hp["jpeg_quality"], rng)
    if hp["crop_area"] < 1.0:
        pixels = _crop_resize(images, image_size, max(hp["crop_area"], 1e-3), hp["crop_aspect"], rng)
    else:
        pixels = _resize_full(images, image_size)
    if hp["flip"]:
        pixels = _flip(pixels, rng)
    pixels = _colour_jitter(pixels, hp, rng)
    return _to_signed_unit(pixels)


# ---- batches -----------------------------------------------------------------


def batch_iterator(image_set: ImageSet, batch_size: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (uint8 images, int32 labels) batches of exactly `batch_size`,
    the examples `batch_indices` draws."""
    if len(image_set) == 0:
        raise ValueError("cannot iterate over an empty set")
    return (
        (image_set.images[indices], image_set.labels[indices])
        for indices in batch_indices(len(image_set), batch_size, seed)
    )


def batch_indices(examples: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless batches of exactly `batch_size` example indices.

    Each epoch is a fresh permutation from np.random.default_rng(seed); a
    batch that runs past an epoch's end continues into the next permutation,
    so every batch is full and each epoch visits every example once.
    """
    if examples < 1:
        raise ValueError("cannot iterate over an empty set")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return _indices(int(examples), int(batch_size), np.random.default_rng(seed))


def _indices(examples: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    pending = np.empty((0,), dtype=np.int64)
    while True:
        while len(pending) < batch_size:
            pending = np.concatenate([pending, rng.permutation(examples)])
        indices, pending = pending[:batch_size], pending[batch_size:]
        yield indices
