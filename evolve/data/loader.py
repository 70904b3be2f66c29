"""`load_task_data`: one entry point from a TaskSpec to in-memory TaskData."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from evolve.data.arrays import ValidationSplit
from evolve.data.bundled import check_bundled, load_bundled
from evolve.data.dataset import TaskData
from evolve.data.folder import check_image_folder, load_image_folder
from evolve.data.limits import DEFAULT_LIMITS, DataLimits
from evolve.data.npz import check_npz, load_npz
from evolve.errors import EvolveError, InvalidArgumentError, ResourceExhaustedError
from evolve.types import (
    BundledSource,
    ImageFolderSource,
    NpzSource,
    TaskSource,
    TaskSpec,
    TfdsSource,
    validate_task_name,
)

logger = logging.getLogger(__name__)


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


def describe_source(source: object) -> str:
    """A source in a message, as the client gave it ("npz archive 'a.npz'")."""
    if isinstance(source, NpzSource):
        return f"npz archive {source.path!r}"
    if isinstance(source, ImageFolderSource):
        return f"image folder {source.path!r}"
    if isinstance(source, TfdsSource):
        return f"tfds dataset {source.name!r}"
    if isinstance(source, BundledSource):
        return f"bundled task {source.name!r}"
    return type(source).__name__


def _load_source(
    source: TaskSource, roots: tuple[str, ...], max_train: int | None,
    validation_split: ValidationSplit, limits: DataLimits,
) -> TaskData:
    """Dispatches to the loader of the source's kind."""
    if isinstance(source, NpzSource):
        return load_npz(source, roots, max_train, validation_split, limits)
    if isinstance(source, ImageFolderSource):
        return load_image_folder(source, roots, max_train, limits)
    if isinstance(source, TfdsSource):
        from evolve.data.tfds_source import load_tfds  # pylint: disable=import-outside-toplevel

        return load_tfds(source, roots, max_train, limits)
    if isinstance(source, BundledSource):
        return load_bundled(source, max_train)
    raise InvalidArgumentError("source", f"unsupported task source {type(source).__name__}")


def check_task_source(spec: TaskSpec, *, data_roots: Sequence[str] = (), limits: DataLimits = DEFAULT_LIMITS) -> None:
    """Refuses a bad spec cheaply, without loading any data: the name, the
    fields, path confinement and existence, a npz archive's headers (a zip
    bomb is refused here). Loading itself (load_task_data) runs later, in the
    task's operation, and may still find bad contents."""
    if not isinstance(spec, TaskSpec):
        raise InvalidArgumentError("spec", f"expected a TaskSpec, got {type(spec).__name__}")
    validate_task_name(spec.name, "name")
    roots, source = _roots(data_roots), spec.source
    if isinstance(source, NpzSource):
        check_npz(source, roots, limits)
    elif isinstance(source, ImageFolderSource):
        check_image_folder(source, roots)
    elif isinstance(source, TfdsSource):
        from evolve.data import tfds_source  # pylint: disable=import-outside-toplevel

        tfds_source.check_tfds(source, roots)
    elif isinstance(source, BundledSource):
        check_bundled(source)
    else:
        raise InvalidArgumentError("source", f"unsupported task source {type(source).__name__}")


def load_task_data(
    spec: TaskSpec,
    *,
    data_roots: Sequence[str] = (),
    max_train_examples: int | None = None,
    validation_split: ValidationSplit = ValidationSplit(),
    limits: DataLimits = DEFAULT_LIMITS,
) -> TaskData:
    """Loads the data of a task from its source.

    With `data_roots`, local paths and tfds data_dir must resolve inside one of
    the roots (relative paths against the first root). `max_train_examples`
    caps the train split (validation and test are never capped);
    `validation_split` sizes the validation taken off train when a local
    source has none; `limits` bounds what loading may decode (DataLimits).
    Every bad input raises InvalidArgumentError naming the field (relative to
    the spec: "name", "source.path"); running out of memory while loading
    raises ResourceExhaustedError naming the source.
    """
    if not isinstance(spec, TaskSpec):
        raise InvalidArgumentError("spec", f"expected a TaskSpec, got {type(spec).__name__}")
    if not isinstance(limits, DataLimits):
        raise TypeError(f"limits must be a DataLimits, got {type(limits).__name__}")
    validate_task_name(spec.name, "name")
    max_train = _check_max_train(max_train_examples)
    roots = _roots(data_roots)
    failure: EvolveError
    try:
        data = _load_source(spec.source, roots, max_train, validation_split, limits)
    except EvolveError as error:
        failure = error
    except MemoryError:
        logger.warning("out of memory while loading task %s from %s", spec.name, describe_source(spec.source))
        failure = ResourceExhaustedError(
            f"out of memory while loading the {describe_source(spec.source)} of task {spec.name!r}: "
            "the server cannot hold this data now; use a smaller source or retry later"
        )
    else:
        logger.info(
            "task %s loaded: %d classes, train images %s", spec.name, data.num_classes, data.train.images.shape
        )
        return data
    raise _without_frames(failure)


def _without_frames(error: EvolveError) -> EvolveError:
    """The error without the loaders' frames and the exception it replaced.

    Their locals hold what was decoded before the failure; an error kept by
    a caller (an operation's record) must not keep that data alive. A domain
    error's message says everything; its traceback is not needed.
    """
    error.__context__ = None
    error.__cause__ = None
    return error.with_traceback(None)
