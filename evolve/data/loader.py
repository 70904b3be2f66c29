"""`load_task_data`: one entry point from a TaskSpec to in-memory TaskData."""

from __future__ import annotations

import logging
import os
import re
from typing import Sequence

from evolve.data.arrays import ValidationSplit
from evolve.data.bundled import load_bundled
from evolve.data.dataset import TaskData
from evolve.data.folder import load_image_folder
from evolve.data.npz import load_npz
from evolve.errors import InvalidArgumentError
from evolve.types import BundledSource, ImageFolderSource, NpzSource, TaskSpec, TfdsSource

logger = logging.getLogger(__name__)

# Task names double as model names of the inference API: keep them URL-safe.
TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def validate_task_name(name: object) -> str:
    """Returns the name, or raises InvalidArgumentError('name', ...)."""
    if not isinstance(name, str) or not TASK_NAME_RE.fullmatch(name):  # fullmatch: "$" admits a final newline
        raise InvalidArgumentError(
            "name",
            f"task name {name!r} must be 1-128 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit",
        )
    return name


def _check_max_train(max_train_examples: object) -> int | None:
    if max_train_examples is None:
        return None
    if isinstance(max_train_examples, bool) or not isinstance(max_train_examples, int) or max_train_examples < 1:
        raise InvalidArgumentError("max_train_examples", f"must be a positive integer, got {max_train_examples!r}")
    return max_train_examples


def _roots(data_roots: Sequence[str] | str) -> tuple[str, ...]:
    """Data roots as a tuple of strings (a single string is one root)."""
    if isinstance(data_roots, (str, os.PathLike)):
        data_roots = (data_roots,)  # type: ignore[assignment]
    return tuple(os.fspath(root) for root in data_roots if os.fspath(root))


def load_task_data(
    spec: TaskSpec,
    *,
    data_roots: Sequence[str] = (),
    max_train_examples: int | None = None,
    validation_split: ValidationSplit = ValidationSplit(),
) -> TaskData:
    """Loads the data of a task from its source.

    With `data_roots`, local paths and tfds data_dir must resolve inside one of
    the roots (relative paths against the first root). `max_train_examples`
    caps the train split (validation and test are never capped);
    `validation_split` sizes the validation taken off train when a local
    source has none. Every bad
    input raises InvalidArgumentError naming the field.
    """
    if not isinstance(spec, TaskSpec):
        raise InvalidArgumentError("spec", f"expected a TaskSpec, got {type(spec).__name__}")
    validate_task_name(spec.name)
    max_train = _check_max_train(max_train_examples)
    roots = _roots(data_roots)
    source = spec.source
    if isinstance(source, NpzSource):
        data = load_npz(source, roots, max_train, validation_split)
    elif isinstance(source, ImageFolderSource):
        data = load_image_folder(source, roots, max_train)
    elif isinstance(source, TfdsSource):
        from evolve.data.tfds_source import load_tfds  # pylint: disable=import-outside-toplevel

        data = load_tfds(source, roots, max_train)
    elif isinstance(source, BundledSource):
        data = load_bundled(source, max_train)
    else:
        raise InvalidArgumentError("source", f"unsupported task source {type(source).__name__}")
    logger.info("task %s loaded: %d classes, train images %s", spec.name, data.num_classes, data.train.images.shape)
    return data
