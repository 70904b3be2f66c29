"""The image-folder source: class folders of PNG/JPEG files."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from evolve.data import DataLimits, load_task_data
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


def _error(path, **kwargs) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as info:
        _load(path, **kwargs)
    assert info.value.field == "source.path"
    return info.value


def test_without_data_roots_missing_unreadable_and_wrong_type_paths_read_alike(tmp_path):
    """Without --data-root any server path can be named: errors must not tell which exist."""
    (tmp_path / "file.png").write_bytes(b"x")
    os.makedirs(tmp_path / "empty")
    os.makedirs(tmp_path / "locked" / "sub")
    os.chmod(tmp_path / "locked", 0)
    try:
        cases = {"missing": tmp_path / "missing", "file": tmp_path / "file.png", "empty": tmp_path / "empty"}
        if not os.access(tmp_path / "locked", os.R_OK):  # root reads anything
            cases["locked"] = tmp_path / "locked"
        messages = {kind: _error(path).description.replace(str(path), "PATH") for kind, path in cases.items()}
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert len(set(messages.values())) == 1, messages
    assert messages["missing"] == "no such folder, or not readable as an image folder: 'PATH'"


def test_with_data_roots_the_reason_is_given(tmp_path):
    (tmp_path / "file.png").write_bytes(b"x")
    _expect("missing", match="not a directory", data_roots=[str(tmp_path)])
    _expect("file.png", match="not a directory", data_roots=[str(tmp_path)])
    message = _error("missing", data_roots=[str(tmp_path)]).description
    assert str(tmp_path) not in message  # the path as the client gave it, not resolved


def test_single_class(tmp_path):
    os.makedirs(tmp_path / "f" / "only")
    Image.new("RGB", (4, 4)).save(tmp_path / "f" / "only" / "a.png")
    _expect("f", match="at least 2 class", data_roots=[str(tmp_path)])


def test_empty_class_folder(tmp_path):
    root = _write_folder(tmp_path / "f", per_class=3)
    os.makedirs(os.path.join(root, "empty"))
    _expect(root, match="'empty' has no")


def test_corrupt_image(tmp_path):
    root = _write_folder(tmp_path / "f", per_class=3)
    with open(os.path.join(root, "cat", "broken.png"), "wb") as f:
        f.write(b"\x89PNG not really")
    message = _error(root).description
    assert "cannot decode image 'cat/broken.png'" in message and str(tmp_path) not in message
    assert "BytesIO" not in message


def test_truncated_image_is_named_by_its_path(tmp_path):
    root = _write_folder(tmp_path / "f", per_class=3)
    path = tmp_path / "f" / "dog" / "cut.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = _error(root).description
    assert "'dog/cut.png'" in message and "BytesIO" not in message and str(tmp_path) not in message


# ---- bounds (DataLimits), checked on the headers before anything is decoded ------------


@pytest.fixture
def forbid_decoding(monkeypatch):
    """Call it once the files are written: from then on decoding an image fails the test."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("an image was decoded")

    return lambda: monkeypatch.setattr(Image.Image, "load", refuse)


def test_huge_png_is_refused_by_its_header(tmp_path, forbid_decoding):
    """A 9000x9000 PNG is 78 KB on disk and 243 MB decoded: refused by its header."""
    root = tmp_path / "f"
    for name in ("a", "b"):
        os.makedirs(root / name)
        Image.new("L", (8, 8)).save(root / name / "small.png")
    Image.new("L", (9000, 9000)).save(root / "a" / "big.png")
    assert os.path.getsize(root / "a" / "big.png") < 200_000
    forbid_decoding()
    started = time.monotonic()
    message = _error(root).description
    assert time.monotonic() - started < 2.0
    assert "'a/big.png'" in message and "9000x9000" in message and "4096" in message, message
    assert str(tmp_path) not in message


def test_pixel_count_and_side_limits(tmp_path, forbid_decoding):
    root = _write_folder(tmp_path / "f", per_class=2, sizes=((40, 30),))
    forbid_decoding()
    message = _error(root, limits=DataLimits(max_image_pixels=1000)).description
    assert "'bird/000.png' is 40x30" in message and "1000 pixels" in message
    assert "sides must be at most 32" in _error(root, limits=DataLimits(max_image_side=32)).description


def test_total_decoded_size_of_a_folder_is_bounded(tmp_path, forbid_decoding):
    root = _write_folder(tmp_path / "f", per_class=10, sizes=((8, 6),))  # 30 images of 144 bytes as RGB
    forbid_decoding()
    message = _error(root, limits=DataLimits(max_decompressed_bytes=4000)).description
    assert "the folder (30 images) decompresses to 4320 bytes, over the limit of 4000 bytes" in message


def test_the_stack_at_the_first_image_size_is_bounded(tmp_path, forbid_decoding):
    """Small files resized to a large first image would stack to far more than they decode to."""
    root = tmp_path / "f"
    for name in ("a", "b"):
        os.makedirs(root / name)
        for i in range(20):
            Image.new("RGB", (2, 2)).save(root / name / f"{i:02d}.png")
    Image.new("RGB", (100, 100)).save(root / "a" / "00.png")  # the first file
    forbid_decoding()
    message = _error(root, limits=DataLimits(max_decompressed_bytes=100_000)).description
    assert "resized to the first one's 100x100" in message and "1.1 MiB" in message, message


@pytest.mark.parametrize(
    "image, fmt, match",
    [
        (Image.new("P", (8, 6)), "GIF", "is a GIF image"),
        (Image.new("RGB", (8, 6)), "TIFF", "is a TIFF image"),
        (Image.new("I;16", (8, 6)), "PNG", "mode 'I;16'"),
    ],
)
def test_only_8_bit_png_and_jpeg(tmp_path, forbid_decoding, image, fmt, match):
    root = _write_folder(tmp_path / "f", per_class=2)
    image.save(os.path.join(root, "cat", "odd.png"), format=fmt)
    forbid_decoding()
    message = _error(root).description
    assert "'cat/odd.png'" in message and match in message, message


def test_loads_within_the_limits(tmp_path):
    root = _write_folder(tmp_path / "f", per_class=10, sizes=((8, 6),))
    assert _load(root, limits=DataLimits(max_decompressed_bytes=4320)).num_classes == 3


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


def test_a_differently_shaped_image_keeps_its_aspect_ratio(tmp_path):
    """A 2:1 image of a disc stacked beside square ones is scaled to cover the
    square and cropped at the centre: the disc stays round (stretching it to
    the first image's size, as before, made it an ellipse twice as tall)."""
    from evolve.data.arrays import cover_and_crop, stack_images

    wide = np.zeros((20, 40, 3), np.uint8)
    yy, xx = np.mgrid[:20, :40]
    wide[(yy - 9.5) ** 2 + (xx - 19.5) ** 2 <= 8**2] = 255  # a disc of radius 8 at the centre
    stacked = stack_images([np.zeros((20, 20, 3), np.uint8), wide])
    disc = stacked[1, :, :, 0] > 127
    rows, cols = np.nonzero(disc)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(height - width) <= 1 and 15 <= width <= 18, (height, width)
    assert cover_and_crop(wide, 20, 40) is not wide and cover_and_crop(wide, 20, 40).shape == (20, 40, 3)
    np.testing.assert_array_equal(cover_and_crop(wide, 20, 40), wide)  # same size: unchanged
    tall = cover_and_crop(wide, 30, 10)  # scaled by 1.5 to 30 x 60, the middle 10 columns kept
    assert tall.shape == (30, 10, 3) and tall[15, :, 0].min() == 255
