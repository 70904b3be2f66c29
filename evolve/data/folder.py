"""The local image-folder task format: one sub-folder per class (PNG/JPEG).

Class names are the sub-folder names, sorted. Images are decoded with PIL to
RGB and brought to the size of the first image so that they stack (scaled
with the aspect ratio kept to cover it, then centre-cropped). Before
anything is decoded, every file's header is read: files must be 8-bit PNG or
JPEG within DataLimits' side and pixel bounds, and the folder's decoded size
within DataLimits.max_decompressed_bytes. The
examples are split deterministically (a seeded shuffle) into train /
validation / test by the source's fractions.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import warnings
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from evolve.data import arrays
from evolve.data.dataset import ImageSet, TaskData
from evolve.data.limits import (
    DEFAULT_LIMITS,
    RGB_BYTES_PER_PIXEL,
    DataLimits,
    check_decoded_size,
    check_image_header,
)
from evolve.data.paths import check_inside_roots, resolve_path, unreadable_path
from evolve.errors import InvalidArgumentError
from evolve.types import ImageFolderSource

logger = logging.getLogger(__name__)

FIELD = "source.path"
WHAT = "an image folder"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# What PIL raises on damaged or refused files.
_PIL_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error,
    Image.DecompressionBombError, Image.DecompressionBombWarning,
)


def _class_folders(shown: str, root: str, data_roots: Sequence[str]) -> list[str]:
    """Sorted names of the non-hidden sub-folders (at least two).

    Without data roots, a missing, unreadable or non-directory path and one
    with fewer than 2 class folders get one message (paths.unreadable_path).
    """
    if not os.path.isdir(root):
        raise unreadable_path(FIELD, shown, WHAT, "not a directory", data_roots, "folder")
    try:
        entries = sorted(os.listdir(root))
    except OSError as error:
        raise unreadable_path(FIELD, shown, WHAT, f"cannot list it: {error.strerror}", data_roots, "folder") from None
    classes = [e for e in entries if not e.startswith(".") and os.path.isdir(os.path.join(root, e))]
    if len(classes) < 2:
        reason = f"needs at least 2 class sub-folders, found {len(classes)}"
        raise unreadable_path(FIELD, shown, WHAT, reason, data_roots, "folder")
    return classes


def _image_files(root: str, name: str) -> list[str]:
    """Sorted PNG/JPEG file paths of one class folder (other files are ignored)."""
    folder = os.path.join(root, name)
    try:
        entries = os.listdir(folder)
    except OSError as error:
        raise InvalidArgumentError(FIELD, f"cannot list class folder {name!r}: {error.strerror}") from None
    names = sorted(n for n in entries if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def _open_error(shown: str, error: Exception, limits: DataLimits) -> InvalidArgumentError:
    """The error for an image file PIL refuses; it names the file, not PIL's view of it."""
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return InvalidArgumentError(
            FIELD, f"image {shown!r} declares too many pixels (at most {limits.max_image_pixels} per image)"
        )
    if isinstance(error, UnidentifiedImageError):  # its message holds the server path
        return InvalidArgumentError(FIELD, f"cannot decode image {shown!r}: not a PNG or JPEG image")
    if isinstance(error, OSError) and error.filename:  # e.g. permission denied: not the server path
        return InvalidArgumentError(FIELD, f"cannot read image {shown!r}: {error.strerror}")
    return InvalidArgumentError(FIELD, f"cannot decode image {shown!r}: {type(error).__name__}: {error}")


def _image_size(root: str, path: str, limits: DataLimits) -> tuple[int, int]:
    """(width, height) of one file from its header, checked against the limits; decodes nothing."""
    shown = os.path.relpath(path, root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                check_image_header(image.format, image.mode, image.size, limits, FIELD, f"image {shown!r}")
                return int(image.size[0]), int(image.size[1])
    except InvalidArgumentError:
        raise
    except _PIL_ERRORS as error:
        raise _open_error(shown, error, limits) from None


def _check_total(sizes: Sequence[tuple[int, int]], limits: DataLimits) -> None:
    """The folder's decoded images, and their stack at the first image's size, within the limit."""
    decoded = sum(w * h for w, h in sizes) * RGB_BYTES_PER_PIXEL
    check_decoded_size(decoded, limits, FIELD, f"the folder ({len(sizes)} images)")
    first_w, first_h = sizes[0]
    stacked = len(sizes) * first_w * first_h * RGB_BYTES_PER_PIXEL
    what = f"the folder ({len(sizes)} images, each resized to the first one's {first_w}x{first_h})"
    check_decoded_size(stacked, limits, FIELD, what)


def _decode(root: str, path: str, size: tuple[int, int], limits: DataLimits) -> np.ndarray:
    """Decodes one image file, whose header declared `size`, to uint8 H x W x 3."""
    shown = os.path.relpath(path, root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.size != size:  # replaced since its header was checked
                    raise InvalidArgumentError(FIELD, f"image {shown!r} changed while the folder was loaded")
                return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except InvalidArgumentError:
        raise
    except _PIL_ERRORS as error:
        raise _open_error(shown, error, limits) from None


def _check_fractions(source: ImageFolderSource) -> None:
    """validation in (0, 1), test in [0, 1), and their sum below 1."""
    v, t = source.validation_fraction, source.test_fraction
    if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 < v < 1.0:
        raise InvalidArgumentError("source.validation_fraction", "must lie in (0, 1)")
    if not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 <= t < 1.0:
        raise InvalidArgumentError("source.test_fraction", "must lie in [0, 1)")
    if v + t >= 1.0:
        raise InvalidArgumentError("source.test_fraction", "validation_fraction + test_fraction must be < 1")


def _collect(shown: str, root: str, data_roots: Sequence[str]) -> tuple[list[str], list[str], list[int]]:
    """(class names, file paths, labels) of the folder."""
    classes = _class_folders(shown, root, data_roots)
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_files = _image_files(root, name)
        if not class_files:
            raise InvalidArgumentError(FIELD, f"class folder {name!r} has no PNG/JPEG images")
        for path in class_files:
            check_inside_roots(path, FIELD, data_roots)
        files += class_files
        labels += [label] * len(class_files)
    return classes, files, labels


def _split(everything: ImageSet, source: ImageFolderSource) -> tuple[ImageSet, ImageSet, ImageSet]:
    """Seeded shuffle, then test / validation / train by the fractions."""
    n = len(everything)
    n_test = int(round(n * source.test_fraction))
    n_val = max(1, int(round(n * source.validation_fraction)))
    if n - n_test - n_val < 1:
        raise InvalidArgumentError(FIELD, f"{n} images are too few for the requested validation/test fractions")
    order = np.random.default_rng(arrays.SPLIT_SEED).permutation(n)
    test_idx, val_idx, train_idx = np.split(order, [n_test, n_test + n_val])
    validation = everything.take(np.sort(val_idx))
    test = everything.take(np.sort(test_idx)) if n_test else validation
    return everything.take(np.sort(train_idx)), validation, test


def check_image_folder(source: ImageFolderSource, data_roots: Sequence[str]) -> None:
    """The cheap part of loading: the fractions and the class folders (no image is opened)."""
    _check_fractions(source)
    root = resolve_path(source.path, FIELD, data_roots)
    _class_folders(source.path, root, data_roots)


def load_image_folder(
    source: ImageFolderSource, data_roots: Sequence[str], max_train_examples: int | None,
    limits: DataLimits = DEFAULT_LIMITS,
) -> TaskData:
    """Loads an ImageFolderSource into TaskData (see the module docstring)."""
    _check_fractions(source)
    root = resolve_path(source.path, FIELD, data_roots)
    classes, files, labels = _collect(source.path, root, data_roots)
    sizes = [_image_size(root, path, limits) for path in files]
    _check_total(sizes, limits)
    decoded = (_decode(root, path, size, limits) for path, size in zip(files, sizes))
    images = arrays.stack_images(decoded, count=len(files))
    everything = ImageSet(images, np.asarray(labels, dtype=np.int32))
    train, validation, test = _split(everything, source)
    train = arrays.subsample(train, max_train_examples)
    logger.info(
        "image folder %s: %d classes, %d train / %d validation / %d test, images %s",
        root, len(classes), len(train), len(validation), len(test), images.shape[1:],
    )
    return TaskData(train, validation, test, len(classes), tuple(classes))
