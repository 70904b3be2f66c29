"""Device preprocessing against the host reference (evolve.data.preprocess).

Each augmentation is compared on the same random draws: the host's crop
boxes, flip masks and jitter factors are fed to the device functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evolve.data import preprocess, preprocess_device
from evolve.data.preprocess_device import Augmentation, Jitter

# Float32 resampling in a different summation order: well under 1/255 of a level.
ATOL = 2e-4


def _images(n: int = 6, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _key_data(seed: int) -> jax.Array:
    return jax.device_put(np.random.default_rng(seed).integers(0, 2**32, (2,), dtype=np.uint32))


@pytest.mark.parametrize("size, source", [(16, (8, 8)), (8, (32, 20)), (13, (13, 13)), (16, (16, 16)), (7, (9, 31))])
def test_eval_inputs_equal_the_host_reference(size, source):
    images = _images(5, *source)
    device = np.asarray(jax.jit(preprocess_device.eval_inputs, static_argnums=1)(images, size))
    np.testing.assert_allclose(device, preprocess.preprocess_eval(images, size), atol=ATOL, rtol=0)
    assert device.dtype == np.float32 and device.shape == (5, size, size, 3)


def test_a_same_size_image_is_only_scaled():
    images = _images(3, 8, 8)
    out = np.asarray(preprocess_device.eval_inputs(jnp.asarray(images), 8))
    # XLA may scale by the reciprocal: one float32 ulp at most.
    np.testing.assert_allclose(out, preprocess.preprocess_eval(images, 8), atol=2.5e-7, rtol=0)


def test_crop_resize_equals_the_host_on_the_same_boxes():
    images = _images(8, 20, 12)
    y0, x0, height, width = preprocess._crop_boxes(8, 20, 12, 0.3, 0.75, np.random.default_rng(1))
    host = preprocess._apply_taps(images, preprocess._taps(10, 20, y0, height), preprocess._taps(10, 12, x0, width))
    boxes = np.stack([y0, x0, height, width], axis=1).astype(np.float32)
    device = np.asarray(preprocess_device.crop_resize(jnp.asarray(images), jnp.asarray(boxes), 10))
    np.testing.assert_allclose(device, host, atol=ATOL * 255, rtol=0)


def test_crop_boxes_follow_the_area_and_aspect_law():
    boxes = np.asarray(preprocess_device.crop_boxes(jax.random.key(0), 2000, 40, 30, jnp.float32(0.3),
                                                    jnp.float32(0.75)))
    y0, x0, height, width = boxes.T
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + height <= 40 + 1e-3).all() and (x0 + width <= 30 + 1e-3).all()
    area = height * width / (40 * 30)
    assert area.max() <= 1.0 + 1e-5 and area.min() >= 0.3 * 0.9  # clipping to the image only shrinks a box
    unclipped = (height < 40) & (width < 30)
    aspect = (width / height)[unclipped]
    assert aspect.min() >= 0.75 - 1e-4 and aspect.max() <= 1 / 0.75 + 1e-4
    assert np.std(area) > 0.1 and np.std(y0) > 1.0  # random, not a constant box


def test_flip_equals_the_host_on_the_same_mask():
    pixels = preprocess._resize_full(_images(8), 8)
    mask = np.random.default_rng(2).random(8) < 0.5
    host = pixels.copy()
    host[mask] = host[mask, :, ::-1]
    np.testing.assert_array_equal(np.asarray(preprocess_device.flip(jnp.asarray(pixels), jnp.asarray(mask))), host)


def test_colour_jitter_equals_the_host_on_the_same_factors():
    hp = dict(brightness=0.2, contrast=0.3, saturation=0.4, hue=0.1)
    pixels = preprocess._resize_full(_images(6, 8, 8), 8)
    rng = np.random.default_rng(3)
    host = preprocess._colour_jitter(pixels.copy(), preprocess._augment_hparams(hp), rng)
    # The host draws brightness, contrast, saturation, hue in that order, one value per image each.
    rng = np.random.default_rng(3)
    brightness = rng.uniform(-0.2, 0.2, 6)
    contrast = rng.uniform(1 - 0.3, 1 + 0.3, 6)
    saturation = rng.uniform(1 - 0.4, 1 + 0.4, 6)
    hue = rng.uniform(-0.1, 0.1, 6) * 2.0 * math.pi
    jitter = Jitter(*(jnp.asarray(v, jnp.float32) for v in (brightness, contrast, saturation, hue)))
    device = np.asarray(preprocess_device.colour_jitter(jnp.asarray(pixels), jitter))
    np.testing.assert_allclose(device, host, atol=ATOL * 255, rtol=0)


def test_train_inputs_with_augmentation_off_are_the_eval_inputs_bit_for_bit():
    images = jnp.asarray(_images(4, 12, 9))
    off = Augmentation.of({})
    assert off.off
    train = jax.jit(preprocess_device.train_inputs, static_argnames=("image_size", "augmentation"))
    evaluate = jax.jit(preprocess_device.eval_inputs, static_argnums=1)
    values = jnp.asarray(preprocess_device.magnitudes({}))
    np.testing.assert_array_equal(np.asarray(train(images, _key_data(0), values, image_size=16, augmentation=off)),
                                  np.asarray(evaluate(images, 16)))


ALL_ON = dict(crop_area=0.5, crop_aspect=0.75, flip=True, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.2)


def test_train_inputs_augment_deterministically_per_key_and_stay_in_range():
    images = jnp.asarray(_images(16, 12, 9))
    augmentation = Augmentation.of(ALL_ON)
    assert augmentation == Augmentation(True, True, True, True, True, True)
    values = jnp.asarray(preprocess_device.magnitudes(ALL_ON))
    train = jax.jit(preprocess_device.train_inputs, static_argnames=("image_size", "augmentation"))
    first = np.asarray(train(images, _key_data(0), values, image_size=8, augmentation=augmentation))
    again = np.asarray(train(images, _key_data(0), values, image_size=8, augmentation=augmentation))
    other = np.asarray(train(images, _key_data(1), values, image_size=8, augmentation=augmentation))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert first.shape == (16, 8, 8, 3) and first.min() >= -1.0 and first.max() <= 1.0
    assert not np.allclose(first, np.asarray(preprocess_device.eval_inputs(images, 8)))


@pytest.mark.parametrize("name, value", [("crop_area", 0.4), ("flip", True), ("brightness", 0.3),
                                         ("contrast", 0.3), ("saturation", 0.5), ("hue", 0.3)])
def test_each_augmentation_alone_changes_the_inputs_and_its_magnitude_is_traced(name, value):
    images = jnp.asarray(_images(16, 10, 10, seed=4))
    augmentation = Augmentation.of({name: value})
    assert sum(dataclasses.astuple(augmentation)) == 1
    # A function of its own: jit caches are shared by every jit of one function.
    train = jax.jit(functools.partial(preprocess_device.train_inputs), static_argnames=("image_size", "augmentation"))
    out = train(images, _key_data(5), jnp.asarray(preprocess_device.magnitudes({name: value})),
                image_size=10, augmentation=augmentation)
    assert not np.allclose(np.asarray(out), np.asarray(preprocess_device.eval_inputs(images, 10)))
    if name != "flip":  # another magnitude: same program, other inputs
        smaller = {name: value / 2} if name != "crop_area" else {name: 0.9}
        again = train(images, _key_data(5), jnp.asarray(preprocess_device.magnitudes(smaller)),
                      image_size=10, augmentation=augmentation)
        assert not np.allclose(np.asarray(again), np.asarray(out))
    assert train._cache_size() == 1


def test_the_flip_mirrors_about_half_the_images():
    images = jnp.asarray(_images(400, 6, 6, seed=6))
    out = np.asarray(preprocess_device.train_inputs(images, _key_data(7), jnp.asarray(preprocess_device.magnitudes({})),
                                                    image_size=6, augmentation=Augmentation(flip=True)))
    plain = preprocess.preprocess_eval(np.asarray(images), 6)
    mirrored = np.all(np.isclose(out, plain[:, :, ::-1], atol=1e-5), axis=(1, 2, 3)) & ~np.all(np.isclose(out, plain, atol=1e-5), axis=(1, 2, 3))
    assert 150 < mirrored.sum() < 250
