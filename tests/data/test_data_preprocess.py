"""Numpy preprocessing, augmentation and the batch iterator."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from evolve.config import get_config
from evolve.data import ImageSet, batch_iterator, preprocess_eval, preprocess_train

ALL_ON = dict(
    crop_area=0.5, crop_aspect=0.75, flip=True, brightness=0.2, contrast=0.2,
    saturation=0.2, hue=0.2, jpeg_quality=0.2,
)
OFF = get_config("tiny").default_hparams()


def _images(n: int = 16, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ---- evaluation ----------------------------------------------------------------


@pytest.mark.parametrize("size, source", [(16, (8, 8)), (8, (32, 20)), (13, (13, 13)), (16, (16, 16))])
def test_eval_shape_dtype_range(size, source):
    out = preprocess_eval(_images(5, *source), size)
    assert out.shape == (5, size, size, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_eval_at_the_stored_size_only_scales():
    images = _images(4, 8, 8)
    np.testing.assert_array_equal(preprocess_eval(images, 8), images.astype(np.float32) / 127.5 - 1.0)
    extremes = preprocess_eval(np.array([[[[0, 255, 0]]]], np.uint8), 1)
    np.testing.assert_array_equal(extremes.ravel(), [-1.0, 1.0, -1.0])


def test_eval_resize_is_bilinear_like_pil():
    images = _images(3, 32, 24)
    for size in (16, 48):
        mine = (preprocess_eval(images, size) + 1.0) * 127.5
        for image, out in zip(images, mine):
            reference = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.float32)
            assert np.abs(out - reference).max() <= 1.01  # PIL rounds to uint8


def test_eval_keeps_constant_images_constant():
    images = np.full((2, 10, 7, 3), 200, np.uint8)
    np.testing.assert_allclose(preprocess_eval(images, 16), 200 / 127.5 - 1.0, atol=1e-6)


def test_large_images_to_224():
    out = preprocess_train(_images(3, 250, 190), 224, ALL_ON, np.random.default_rng(0))
    assert out.shape == (3, 224, 224, 3) and out.min() >= -1 and out.max() <= 1


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        preprocess_eval(np.zeros((2, 4, 4), np.uint8), 4)
    with pytest.raises(ValueError):
        preprocess_eval(np.zeros((2, 4, 4, 3), np.float32), 4)
    with pytest.raises(ValueError):
        preprocess_eval(_images(), 0)


# ---- training ------------------------------------------------------------------


@pytest.mark.parametrize("hparams", [OFF, {}, dict(crop_area=1.0, crop_aspect=0.5, flip=False, hue=0.0)])
@pytest.mark.parametrize("size", [8, 16, 12])
def test_augmentation_off_equals_eval(hparams, size):
    images = _images(10, 8, 8)
    train = preprocess_train(images, size, hparams, np.random.default_rng(3))
    np.testing.assert_array_equal(train, preprocess_eval(images, size))


def test_deterministic_given_the_rng():
    images = _images(32)
    first = preprocess_train(images, 16, ALL_ON, np.random.default_rng(7))
    second = preprocess_train(images, 16, ALL_ON, np.random.default_rng(7))
    other = preprocess_train(images, 16, ALL_ON, np.random.default_rng(8))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_all_augmentations_stay_in_range():
    for seed in range(3):
        hp = dict(ALL_ON, crop_area=0.05, crop_aspect=0.5, brightness=0.2, contrast=0.2)
        out = preprocess_train(_images(32, 9, 13, seed=seed), 16, hp, np.random.default_rng(seed))
        assert out.shape == (32, 16, 16, 3) and out.dtype == np.float32
        assert out.min() >= -1.0 and out.max() <= 1.0 and np.isfinite(out).all()


def test_flip_really_flips():
    images = _images(64, 8, 8)
    evaluated = preprocess_eval(images, 8)
    flipped = preprocess_train(images, 8, dict(flip=True), np.random.default_rng(0))
    same = [np.array_equal(f, e) for f, e in zip(flipped, evaluated)]
    mirrored = [np.array_equal(f, e[:, ::-1]) for f, e in zip(flipped, evaluated)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54  # about half


@pytest.mark.parametrize("name", ["crop_area", "jpeg_quality", "brightness", "contrast", "saturation", "hue"])
def test_each_augmentation_changes_the_batch(name):
    images = _images(16, 12, 12)
    value = 0.5 if name == "crop_area" else 0.2
    out = preprocess_train(images, 12, {name: value}, np.random.default_rng(0))
    assert not np.allclose(out, preprocess_eval(images, 12))


def test_colour_jitter_keeps_gray_images_gray():
    gray = np.repeat(_images(8, 6, 6)[..., :1], 3, axis=-1)
    out = preprocess_train(gray, 6, dict(saturation=0.2, hue=0.2), np.random.default_rng(0))
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-4)
    np.testing.assert_allclose(out[..., 0], preprocess_eval(gray, 6)[..., 0], atol=1e-4)


def test_brightness_shifts_whole_images():
    images = np.full((16, 4, 4, 3), 128, np.uint8)
    out = preprocess_train(images, 4, dict(brightness=0.1), np.random.default_rng(0))
    shifts = out.reshape(16, -1)
    assert np.allclose(shifts, shifts[:, :1])  # one shift per image
    assert np.ptp(shifts[:, 0]) > 0.01 and np.abs(shifts[:, 0] - (128 / 127.5 - 1)).max() <= 0.2 * 2 + 1e-5


def test_crop_zooms_in():
    """A crop of a left-dark / right-bright image changes where the edge lies."""
    images = np.zeros((32, 16, 16, 3), np.uint8)
    images[:, :, 8:] = 255
    out = preprocess_train(images, 16, dict(crop_area=0.3, crop_aspect=0.75), np.random.default_rng(0))
    bright_fraction = (out[..., 0] > 0).mean(axis=(1, 2))
    assert bright_fraction.std() > 0.05


# ---- batch iterator ------------------------------------------------------------


def _set(n: int) -> ImageSet:
    images = np.zeros((n, 2, 2, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return ImageSet(images, np.arange(n, dtype=np.int32))


def test_batches_cover_each_epoch_exactly_once():
    iterator = batch_iterator(_set(12), 4, seed=0)
    for _ in range(3):  # three epochs
        epoch = np.concatenate([next(iterator)[1] for _ in range(3)])
        assert sorted(epoch.tolist()) == list(range(12))


def test_batches_are_full_and_wrap_around():
    iterator = batch_iterator(_set(10), 4, seed=1)
    batches = [next(iterator) for _ in range(10)]
    assert all(images.shape == (4, 2, 2, 3) and labels.shape == (4,) for images, labels in batches)
    assert all(images.dtype == np.uint8 and labels.dtype == np.int32 for images, labels in batches)
    stream = np.concatenate([labels for _, labels in batches])
    for epoch in range(4):
        assert sorted(stream[10 * epoch : 10 * epoch + 10].tolist()) == list(range(10))
    for images, labels in batches:  # images and labels stay paired
        np.testing.assert_array_equal(images[:, 0, 0, 0], labels)


def test_set_smaller_than_a_batch():
    images, labels = next(batch_iterator(_set(3), 8, seed=0))
    assert labels.shape == (8,) and set(labels.tolist()) == {0, 1, 2}


def test_batch_iterator_deterministic_by_seed():
    def stream(seed):
        it = batch_iterator(_set(20), 6, seed)
        return np.concatenate([next(it)[1] for _ in range(8)])

    np.testing.assert_array_equal(stream(5), stream(5))
    assert not np.array_equal(stream(5), stream(6))


def test_batch_iterator_reshuffles_each_epoch():
    it = batch_iterator(_set(50), 50, seed=0)
    assert not np.array_equal(next(it)[1], next(it)[1])


def test_batch_iterator_bad_arguments():
    with pytest.raises(ValueError):
        batch_iterator(_set(4), 0, seed=0)
    with pytest.raises(ValueError):
        batch_iterator(ImageSet(np.zeros((0, 2, 2, 3), np.uint8), np.zeros(0, np.int32)), 4, seed=0)
