"""The local image-folder task format: one sub-folder per class (PNG/JPEG).

Class names are the sub-folder names, sorted. Images are decoded with PIL to
RGB and resized to the size of the first image so that they stack. The
examples are split deterministically (a seeded shuffle) into train /
validation / test by the source's fractions.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Sequence

import numpy as np
from PIL import Image

from evolve.data import arrays
from evolve.data.dataset import ImageSet, TaskData
from evolve.data.paths import check_inside_roots, resolve_path
from evolve.errors import InvalidArgumentError
from evolve.types import ImageFolderSource

logger = logging.getLogger(__name__)

FIELD = "source.path"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _class_folders(root: str) -> list[str]:
    """Sorted names of the non-hidden sub-folders."""
    try:
        entries = sorted(os.listdir(root))
    except OSError as error:
        raise InvalidArgumentError(FIELD, f"cannot list {root!r}: {error}") from None
    return [e for e in entries if not e.startswith(".") and os.path.isdir(os.path.join(root, e))]


def _image_files(folder: str) -> list[str]:
    """Sorted PNG/JPEG file paths of one class folder (other files are ignored)."""
    try:
        entries = os.listdir(folder)
    except OSError as error:
        raise InvalidArgumentError(FIELD, f"cannot list {folder!r}: {error}") from None
    names = sorted(n for n in entries if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def _decode(path: str) -> np.ndarray:
    """Decodes one image file to uint8 H x W x 3."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidArgumentError(FIELD, f"cannot decode image {path!r}: {error}") from None


def _check_fractions(source: ImageFolderSource) -> None:
    """validation in (0, 1), test in [0, 1), and their sum below 1."""
    v, t = source.validation_fraction, source.test_fraction
    if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 < v < 1.0:
        raise InvalidArgumentError("source.validation_fraction", "must lie in (0, 1)")
    if not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 <= t < 1.0:
        raise InvalidArgumentError("source.test_fraction", "must lie in [0, 1)")
    if v + t >= 1.0:
        raise InvalidArgumentError("source.test_fraction", "validation_fraction + test_fraction must be < 1")


def _collect(root: str, data_roots: Sequence[str]) -> tuple[list[str], list[str], list[int]]:
    """(class names, file paths, labels) of the folder."""
    classes = _class_folders(root)
    if len(classes) < 2:
        raise InvalidArgumentError(FIELD, f"needs at least 2 class sub-folders, found {len(classes)}")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_files = _image_files(os.path.join(root, name))
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


def load_image_folder(
    source: ImageFolderSource, data_roots: Sequence[str], max_train_examples: int | None
) -> TaskData:
    """Loads an ImageFolderSource into TaskData (see the module docstring)."""
    _check_fractions(source)
    root = resolve_path(source.path, FIELD, data_roots)
    if not os.path.isdir(root):
        raise InvalidArgumentError(FIELD, f"not a directory: {root!r}")
    classes, files, labels = _collect(root, data_roots)
    images = arrays.stack_images([_decode(path) for path in files])
    everything = ImageSet(images, np.asarray(labels, dtype=np.int32))
    train, validation, test = _split(everything, source)
    train = arrays.subsample(train, max_train_examples)
    logger.info(
        "image folder %s: %d classes, %d train / %d validation / %d test, images %s",
        root, len(classes), len(train), len(validation), len(test), images.shape[1:],
    )
    return TaskData(train, validation, test, len(classes), tuple(classes))
