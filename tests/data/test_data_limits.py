"""DataLimits on npz sources: zip bombs and lying headers refused by their headers,
out of memory reported as RESOURCE_EXHAUSTED (issue 9, "bounded inputs")."""

from __future__ import annotations

import os
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from evolve.data import DataLimits, folder, load_task_data, npz, write_npz_task
from evolve.data.limits import GIB, check_image_header
from evolve.errors import InvalidArgumentError, ResourceExhaustedError
from evolve.types import ImageFolderSource, NpzSource, TaskSpec
from tests.data.bombs import write_lying_npz, write_zero_npz


def _load(path, **kwargs):
    return load_task_data(TaskSpec("bounded", NpzSource(str(path))), **kwargs)


def _refused(path, **kwargs) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as info:
        _load(path, **kwargs)
    assert info.value.field == "source.path"
    return info.value


def _bounded_call(call) -> tuple[float, int]:
    """(seconds, peak bytes Python and numpy allocated) of call()."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        call()
    finally:
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return elapsed, peak


def _traceback_files(error: BaseException) -> list[str]:
    files, tb = [], error.__traceback__
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return files


# ---- the bomb helper writes real archives -------------------------------------------


def test_the_bomb_helper_writes_a_real_npz(tmp_path):
    """What tests/data/bombs.py writes is an npz numpy and zipfile read in full (CRCs checked)."""
    path = write_zero_npz(tmp_path / "small.npz", {"train_images": ((40, 300, 300, 3), "uint8"),
                                                   "train_labels": ((40,), "int64")})
    assert os.path.getsize(path) < 100_000
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert archive.getinfo("train_images.npy").compress_type == zipfile.ZIP_DEFLATED
    with np.load(path) as arrays:
        assert arrays["train_images"].shape == (40, 300, 300, 3) and not arrays["train_images"].any()
        assert arrays["train_labels"].dtype == np.int64


# ---- zip bombs ---------------------------------------------------------------------------


def test_zip_bomb_is_refused_before_decompressing(tmp_path):
    """5 GiB of zeros in 5 MB: refused by the zip directory, fast and with bounded memory."""
    count = 5 * GIB // (32 * 32 * 3)
    path = write_zero_npz(tmp_path / "bomb.npz", {"train_images": ((count, 32, 32, 3), "uint8"),
                                                  "train_labels": ((count,), "uint8")})
    assert os.path.getsize(path) < 8 << 20
    errors = []
    elapsed, peak = _bounded_call(lambda: errors.append(_refused(path)))
    assert elapsed < 2.0 and peak < 32 << 20, (elapsed, peak)
    assert "decompresses to 5.0 GiB, over the limit of 4.0 GiB" in errors[0].description


def test_grayscale_bomb_is_refused_by_its_size_as_rgb(tmp_path):
    """The issue's 3 GB of zeros, as gray images: 9 GB once RGB, refused by the .npy headers."""
    path = write_zero_npz(tmp_path / "gray.npz", {"train_images": ((750_000, 64, 64), "uint8"),
                                                  "train_labels": ((750_000,), "uint8")})
    errors = []
    elapsed, peak = _bounded_call(lambda: errors.append(_refused(path)))
    assert elapsed < 2.0 and peak < 32 << 20, (elapsed, peak)
    assert "with its images as uint8 RGB, decompresses to 8.6 GiB" in errors[0].description


def test_small_limit_refuses_an_honest_archive_and_admits_it_when_raised(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)  # 180 KiB
    path = write_npz_task(tmp_path / "t.npz", images, np.arange(60) % 2)
    message = _refused(path, limits=DataLimits(max_decompressed_bytes=100_000)).description
    assert "over the limit of 100000 bytes" in message
    assert len(_load(path, limits=DataLimits(max_decompressed_bytes=200_000)).train) > 0


# ---- headers that lie -------------------------------------------------------------------------


def test_header_declaring_373_gib_is_invalid_not_memory_error(tmp_path):
    path = write_lying_npz(tmp_path / "huge.npz", "train_images", (373 * GIB,))
    message = _refused(path).description
    assert "373.0 GiB, over the limit of 4.0 GiB" in message


def test_header_disagreeing_with_the_zip_directory_is_damaged(tmp_path):
    path = write_lying_npz(tmp_path / "lie.npz", "train_images", (1000, 8, 8, 3))
    message = _refused(path).description
    assert "'train_images' is damaged" in message and "holds" in message


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((2, 2, 2, 3), np.complex64), "not numeric"),
        (np.zeros((2, 2, 2, 3), dtype=[("a", "u1")]), "not numeric"),
        (np.array(["2020-01-01"] * 4, dtype="datetime64[D]"), "not numeric"),
    ],
)
def test_non_numeric_dtypes_are_refused_by_their_header(tmp_path, array, match):
    path = tmp_path / "d.npz"
    np.savez(path, train_images=array, train_labels=np.arange(2))
    assert match in _refused(path).description


def test_members_that_are_not_task_arrays_are_never_read(tmp_path):
    """An extra member, even a bomb, costs nothing: only the task arrays are opened."""
    path = write_zero_npz(tmp_path / "extra.npz", {"notes": ((5 * GIB,), "uint8")})
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    with zipfile.ZipFile(path, "a") as archive:
        for name, array in (("train_images", images), ("train_labels", np.arange(10) % 2)):
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, array)
    assert len(_load(path).train) > 0


# ---- out of memory ---------------------------------------------------------------------------


def test_memory_error_while_reading_npz_is_resource_exhausted(tmp_path, monkeypatch):
    path = write_npz_task(tmp_path / "t.npz", np.zeros((10, 4, 4, 3), np.uint8), np.arange(10) % 2)

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(npz.np.lib.format, "read_array", out_of_memory)
    with pytest.raises(ResourceExhaustedError) as info:
        _load(path)
    assert f"npz archive {str(path)!r}" in str(info.value) and "'bounded'" in str(info.value)
    assert info.value.__context__ is None  # neither the MemoryError nor the loaders' frames are kept
    assert not any(name.endswith("npz.py") for name in _traceback_files(info.value))


def test_memory_error_while_stacking_a_folder_is_resource_exhausted(tmp_path, monkeypatch):
    from PIL import Image

    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        for i in range(3):
            Image.new("RGB", (4, 4)).save(tmp_path / name / f"{i}.png")

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(folder.arrays, "stack_images", out_of_memory)
    with pytest.raises(ResourceExhaustedError, match="image folder"):
        load_task_data(TaskSpec("bounded", ImageFolderSource(str(tmp_path))))


# ---- the limits themselves ---------------------------------------------------------------------


def test_defaults_match_predict():
    limits = DataLimits()
    assert (limits.max_decompressed_bytes, limits.max_image_side, limits.allow_download) == (4 * GIB, 4096, False)
    assert limits.max_image_pixels == 4096 * 4096
    from service import converters

    assert converters.MAX_IMAGE_SIDE == limits.max_image_side


@pytest.mark.parametrize("field", ["max_decompressed_bytes", "max_image_side", "max_image_pixels"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_bad_limits_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        DataLimits(**{field: value})


@pytest.mark.parametrize(
    "header, match",
    [
        (("GIF", "P", (8, 8)), "is a GIF image"),
        (("TIFF", "RGB", (8, 8)), "is a TIFF image"),
        ((None, "RGB", (8, 8)), "is not a PNG or JPEG image"),
        (("PNG", "I;16", (8, 8)), "mode 'I;16'"),
        (("PNG", "I", (8, 8)), "mode 'I'"),
        (("PNG", "F", (8, 8)), "mode 'F'"),
        (("JPEG", "RGB", (4097, 8)), "at most 4096"),
        (("PNG", "L", (0, 8)), "empty size"),
    ],
)
def test_image_header_rule(header, match):
    with pytest.raises(InvalidArgumentError, match=match):
        check_image_header(*header, DataLimits(), "f", "the image")


def test_image_header_rule_accepts_8_bit_png_and_jpeg():
    for image_format, mode in (("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "L"), ("JPEG", "CMYK")):
        check_image_header(image_format, mode, (4096, 4096), DataLimits(), "f", "the image")
