"""The local `.npz` task format (DESIGN.md §3, "Task sources").

Arrays: `train_images`, `train_labels`, and optionally `validation_images` /
`validation_labels` and `test_images` / `test_labels`. Images N x H x W [x C]
with C = 1 or 3, uint8 0..255 or float in [0, 1]; labels integers 0..K-1.
"""

from __future__ import annotations

import logging
import os
import zipfile
from typing import Sequence

import numpy as np

from evolve.data import arrays
from evolve.data.dataset import ImageSet, TaskData
from evolve.data.paths import resolve_path
from evolve.errors import InvalidArgumentError
from evolve.types import NpzSource

logger = logging.getLogger(__name__)

FIELD = "source.path"
SPLITS = ("train", "validation", "test")


def write_npz_task(
    path: str | os.PathLike,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    validation_images: np.ndarray | None = None,
    validation_labels: np.ndarray | None = None,
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    *,
    compress: bool = True,
) -> str:
    """Writes a task in the npz format and returns the path written.

    Optional splits are written only when both their images and labels are
    given. Parent folders are created. Arrays are written as given (no checks).
    """
    named = {"train_images": train_images, "train_labels": train_labels}
    for split, images, labels in (
        ("validation", validation_images, validation_labels),
        ("test", test_images, test_labels),
    ):
        if (images is None) != (labels is None):
            raise ValueError(f"{split}: give both images and labels, or neither")
        if images is not None:
            named[f"{split}_images"] = images
            named[f"{split}_labels"] = labels
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz"
        (np.savez_compressed if compress else np.savez)(f, **{k: np.asarray(v) for k, v in named.items()})
    return path


def _read_arrays(real_path: str) -> dict[str, np.ndarray]:
    """Reads every array of the archive (no pickles)."""
    if not os.path.isfile(real_path):
        raise InvalidArgumentError(FIELD, f"no such file: {real_path!r}")
    try:
        archive = np.load(real_path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InvalidArgumentError(FIELD, f"cannot read the .npz archive: {error}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InvalidArgumentError(FIELD, "not an .npz archive (a single .npy array?)")
    try:
        with archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError) as error:
        raise InvalidArgumentError(FIELD, f"cannot read the .npz archive: {error}") from None


def _split_from(named: dict[str, np.ndarray], split: str) -> ImageSet | None:
    """One split's ImageSet, or None when the archive lacks it."""
    images, labels = named.get(f"{split}_images"), named.get(f"{split}_labels")
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        missing = f"{split}_images" if images is None else f"{split}_labels"
        raise InvalidArgumentError(FIELD, f"array {missing!r} is missing")
    image_set = arrays.make_image_set(images, labels, FIELD, split)
    if not len(image_set):
        raise InvalidArgumentError(FIELD, f"the {split} set is empty")
    return image_set


def load_npz(
    source: NpzSource, data_roots: Sequence[str], max_train_examples: int | None,
    validation_split: arrays.ValidationSplit = arrays.ValidationSplit(),
) -> TaskData:
    """Loads an NpzSource into TaskData (see the module docstring)."""
    real_path = resolve_path(source.path, FIELD, data_roots)
    named = _read_arrays(real_path)
    for required in ("train_images", "train_labels"):
        if required not in named:
            raise InvalidArgumentError(FIELD, f"array {required!r} is missing")
    train = _split_from(named, "train")
    assert train is not None
    validation = _split_from(named, "validation")
    if validation is None:
        train, validation = arrays.split_off_validation(train, FIELD, validation_split)
    test = _split_from(named, "test")
    if test is None:
        test = validation
    num_classes = arrays.num_classes_of((train, validation, test), FIELD)
    train = arrays.subsample(train, max_train_examples)
    logger.info(
        "npz %s: %d train / %d validation / %d test, %d classes",
        real_path, len(train), len(validation), len(test), num_classes,
    )
    return TaskData(train, validation, test, num_classes)
