"""Predict's encoded images (service/converters.images_from_encoded): 8-bit PNG and
JPEG only, headers checked against the data layer's limits before decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from evolve.errors import InvalidArgumentError
from service import converters
from service.gen.evolve.v1 import evolve_pb2


def _encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _decode(*blobs: bytes) -> np.ndarray:
    return converters.images_from_encoded(evolve_pb2.EncodedImages(images=list(blobs)))


def _refused(*blobs: bytes) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as info:
        _decode(*blobs)
    return info.value


GOOD = _encoded(Image.new("RGB", (8, 6), (10, 20, 30)), "PNG")


@pytest.mark.parametrize(
    "blob",
    [
        _encoded(Image.new("RGB", (8, 6)), "JPEG"),
        _encoded(Image.new("L", (8, 6)), "PNG"),
        _encoded(Image.new("RGBA", (8, 6)), "PNG"),
        _encoded(Image.new("P", (8, 6)), "PNG"),
        _encoded(Image.new("1", (8, 6)), "PNG"),
    ],
)
def test_8_bit_png_and_jpeg_are_decoded(blob):
    batch = _decode(GOOD, blob)
    assert batch.shape == (2, 6, 8, 3) and batch.dtype == np.uint8
    assert tuple(batch[0, 0, 0]) == (10, 20, 30)


@pytest.mark.parametrize(
    "blob, match",
    [
        (_encoded(Image.new("P", (8, 6)), "GIF"), "is a GIF image: only PNG and JPEG"),
        (_encoded(Image.new("RGB", (8, 6)), "TIFF"), "is a TIFF image: only PNG and JPEG"),
        (_encoded(Image.new("I;16", (8, 6)), "PNG"), "pixel mode 'I;16'"),
        (_encoded(Image.new("RGB", (8, 6)), "BMP"), "is a BMP image"),
        (b"not an image at all", "not a PNG or JPEG image"),
    ],
)
def test_other_formats_and_16_bit_png_are_refused_by_index(blob, match):
    error = _refused(GOOD, GOOD, blob)
    assert error.field == "encoded.images[2]"
    assert match in error.description and "BytesIO" not in error.description, error.description


def test_side_limit_is_checked_on_the_header(monkeypatch):
    blob = _encoded(Image.new("1", (5000, 8)), "PNG")

    def refuse(self, *args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(Image.Image, "load", refuse)
    error = _refused(blob)
    assert error.field == "encoded.images[0]" and "5000x8" in error.description and "4096" in error.description


def test_truncated_png_names_its_index_not_the_buffer():
    whole = _encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG", compress_level=0)
    error = _refused(GOOD, whole[: len(whole) // 2])
    assert error.field == "encoded.images[1]" and "BytesIO" not in error.description
