"""Bounds on what loading a task's data may cost (issue 9, "bounded inputs").

Every rule about how large a source may decode, how large one image may be
and which image files are accepted lives here, so that the npz, image-folder
and tfds loaders and Predict's encoded images apply the same numbers. All
checks run on sizes declared by headers, before anything is decoded.
"""

from __future__ import annotations

import dataclasses

from evolve.errors import InvalidArgumentError

GIB = 1 << 30
MIB = 1 << 20

# Decoded images are held as uint8 RGB.
RGB_BYTES_PER_PIXEL = 3

# Encoded image files the server decodes: 8-bit PNG and JPEG only (PIL names).
ACCEPTED_IMAGE_FORMATS = ("PNG", "JPEG")
# PIL modes of 8-bit images (16-bit PNGs open as "I;16*" or "I", which
# convert("RGB") clips instead of scaling; they are refused).
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})


@dataclasses.dataclass(frozen=True)
class DataLimits:
    """What one task source may cost to load.

    `max_decompressed_bytes` bounds a source's decoded size: a npz archive's
    arrays as their headers declare them (and its images as uint8 RGB), an
    image folder's and a tfds source's decoded images. `max_image_side` and
    `max_image_pixels` bound one image (the same side bound Predict applies).
    `allow_download` lets a tfds source download and prepare a dataset that is
    not prepared yet; without it such a source fails at once.
    """

    max_decompressed_bytes: int = 4 * GIB
    max_image_side: int = 4096
    max_image_pixels: int = 4096 * 4096
    allow_download: bool = False

    def __post_init__(self) -> None:
        for name in ("max_decompressed_bytes", "max_image_side", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DataLimits.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.allow_download, bool):
            raise TypeError(f"DataLimits.allow_download must be a bool, got {self.allow_download!r}")


# The limits a caller gets when it gives none.
DEFAULT_LIMITS = DataLimits()


def format_bytes(count: int) -> str:
    """A byte count for messages: GiB from 1 GiB up, else MiB, else bytes."""
    if count >= GIB:
        return f"{count / GIB:.1f} GiB"
    if count >= MIB:
        return f"{count / MIB:.1f} MiB"
    return f"{count} bytes"


def check_decoded_size(
    total_bytes: int, limits: DataLimits, field: str, what: str, *, at_least: bool = False
) -> None:
    """Refuses `what` when it decodes to more than the limit.

    `what` reads as the subject of a sentence, e.g. "the archive";
    `at_least` when `total_bytes` counts only what was read so far.
    """
    if total_bytes > limits.max_decompressed_bytes:
        amount = ("at least " if at_least else "") + format_bytes(total_bytes)
        raise InvalidArgumentError(
            field,
            f"{what} decompresses to {amount}, over the limit of "
            f"{format_bytes(limits.max_decompressed_bytes)} of decoded data per task source",
        )


def check_image_size(width: int, height: int, limits: DataLimits, field: str, what: str) -> None:
    """Refuses an image whose header declares sides or a pixel count over the limits.

    `what` names the image in the message (a file, an index, an example).
    """
    if min(width, height) < 1:
        raise InvalidArgumentError(field, f"{what} has an empty size {width}x{height}")
    if max(width, height) > limits.max_image_side:
        raise InvalidArgumentError(
            field, f"{what} is {width}x{height}: sides must be at most {limits.max_image_side} pixels"
        )
    if width * height > limits.max_image_pixels:
        raise InvalidArgumentError(
            field, f"{what} is {width}x{height}: at most {limits.max_image_pixels} pixels per image"
        )


def check_image_header(
    image_format: str | None, mode: str, size: tuple[int, int], limits: DataLimits, field: str, what: str
) -> None:
    """Refuses an encoded image that is not an 8-bit PNG / JPEG within the size limits.

    The arguments are what PIL's Image.open reads from the header
    (image.format, image.mode, image.size), before any decoding.
    """
    if image_format not in ACCEPTED_IMAGE_FORMATS:
        kind = f"a {image_format} image" if image_format else "not a PNG or JPEG image"
        raise InvalidArgumentError(field, f"{what} is {kind}: only PNG and JPEG images are accepted")
    if mode not in EIGHT_BIT_MODES:
        raise InvalidArgumentError(
            field, f"{what} has pixel mode {mode!r}: only 8-bit images are accepted (no 16-bit or float images)"
        )
    check_image_size(int(size[0]), int(size[1]), limits, field, what)
