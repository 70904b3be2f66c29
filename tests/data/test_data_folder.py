"""The image-folder source: class folders of PNG/JPEG files."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from evolve.data import load_task_data
from evolve.errors import InvalidArgumentError
from evolve.types import ImageFolderSource, TaskSpec

# Each class has its own colour, so a loaded image tells its true class.
COLOURS = {"bird": (250, 0, 0), "cat": (0, 250, 0), "dog": (0, 0, 250)}


def _write_folder(root, per_class: int = 10, sizes=((8, 6),), fmt: str = "png") -> str:
    """Writes per_class solid-colour images per class, cycling through sizes (w, h)."""
    for name, colour in COLOURS.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            width, height = sizes[i % len(sizes)]
            image = Image.new("RGB", (width, height), colour)
            image.save(os.path.join(root, name, f"{i:03d}.{fmt}"))
    return str(root)


def _load(path, **kwargs):
    fractions = {k: kwargs.pop(k) for k in ("validation_fraction", "test_fraction") if k in kwargs}
    return load_task_data(TaskSpec("folder", ImageFolderSource(str(path), **fractions)), **kwargs)


def _true_labels(images: np.ndarray) -> np.ndarray:
    """Class index from the dominant colour channel (bird=R, cat=G, dog=B)."""
    return np.argmax(images[:, 0, 0, :], axis=-1)


def test_classes_splits_and_labels(tmp_path):
    data = _load(_write_folder(tmp_path / "f", per_class=20), validation_fraction=0.1, test_fraction=0.2)
    assert data.class_names == ("bird", "cat", "dog") and data.num_classes == 3
    assert (len(data.train), len(data.validation), len(data.test)) == (42, 6, 12)
    for split in (data.train, data.validation, data.test):
        assert split.images.shape[1:] == (6, 8, 3) and split.images.dtype == np.uint8
        np.testing.assert_array_equal(split.labels, _true_labels(split.images))


def test_split_is_deterministic(tmp_path):
    root = _write_folder(tmp_path / "f", per_class=10, sizes=((8, 6), (5, 5)))
    first, second = _load(root), _load(root)
    for a, b in ((first.train, second.train), (first.test, second.test)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_mixed_sizes_are_resized_to_the_first_image(tmp_path):
    data = _load(_write_folder(tmp_path / "f", per_class=6, sizes=((8, 6), (13, 17), (3, 3))))
    assert data.train.images.shape[1:] == (6, 8, 3)
    np.testing.assert_array_equal(data.train.labels, _true_labels(data.train.images))


def test_jpeg_and_grayscale_and_other_files(tmp_path):
    root = _write_folder(tmp_path / "f", per_class=5, fmt="jpg")
    Image.new("L", (8, 6), 77).save(os.path.join(root, "cat", "gray.PNG"))
    Image.new("RGBA", (8, 6), (1, 2, 3, 4)).save(os.path.join(root, "cat", "alpha.png"))
    (tmp_path / "f" / "dog" / "notes.txt").write_text("ignored")
    (tmp_path / "f" / "README").write_text("ignored too")
    os.makedirs(os.path.join(root, ".hidden"))
    data = _load(root, validation_fraction=0.2, test_fraction=0.0)
    assert data.num_classes == 3 and data.test is data.validation
    everything = np.concatenate([data.train.images, data.validation.images])
    assert len(everything) == 17
    gray = everything[(everything == 77).all(axis=(1, 2, 3))]
    assert len(gray) == 1  # the grayscale PNG became 3 equal channels


def test_max_train_examples(tmp_path):
    data = _load(_write_folder(tmp_path / "f", per_class=10), max_train_examples=5)
    assert len(data.train) == 5 and len(data.validation) == 3


def _expect(path, field: str = "source.path", match: str | None = None, **kwargs) -> None:
    with pytest.raises(InvalidArgumentError, match=match) as info:
        _load(path, **kwargs)
    assert info.value.field == field


def test_not_a_directory(tmp_path):
    _expect(tmp_path / "missing", match="not a directory")
    (tmp_path / "file.png").write_bytes(b"x")
    _expect(tmp_path / "file.png", match="not a directory")


def test_single_class(tmp_path):
    os.makedirs(tmp_path / "f" / "only")
    Image.new("RGB", (4, 4)).save(tmp_path / "f" / "only" / "a.png")
    _expect(tmp_path / "f", match="at least 2 class")


def test_empty_class_folder(tmp_path):
    root = _write_folder(tmp_path / "f", per_class=3)
    os.makedirs(os.path.join(root, "empty"))
    _expect(root, match="'empty' has no")


def test_corrupt_image(tmp_path):
    root = _write_folder(tmp_path / "f", per_class=3)
    with open(os.path.join(root, "cat", "broken.png"), "wb") as f:
        f.write(b"\x89PNG not really")
    _expect(root, match="cannot decode")


@pytest.mark.parametrize(
    "fractions, field",
    [
        (dict(validation_fraction=0.0), "source.validation_fraction"),
        (dict(validation_fraction=1.0), "source.validation_fraction"),
        (dict(validation_fraction=float("nan")), "source.validation_fraction"),
        (dict(test_fraction=-0.1), "source.test_fraction"),
        (dict(validation_fraction=0.5, test_fraction=0.5), "source.test_fraction"),
    ],
)
def test_bad_fractions(tmp_path, fractions, field):
    _expect(_write_folder(tmp_path / "f", per_class=3), field=field, **fractions)


def test_too_few_images_for_the_fractions(tmp_path):
    root = tmp_path / "f"
    for name in ("a", "b"):
        os.makedirs(root / name)
        Image.new("RGB", (4, 4)).save(root / name / "x.png")
    _expect(root, match="too few", validation_fraction=0.4, test_fraction=0.5)
