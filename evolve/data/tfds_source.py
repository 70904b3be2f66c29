"""TensorFlow Datasets task sources.

`tensorflow_datasets` is imported lazily, inside `load_tfds` only, so that the
rest of the data layer runs on machines without TensorFlow. Splits are read
with the random-access data source (array_record; needs no TensorFlow) when
the prepared files support it, else through `tfds.as_numpy(as_dataset(...))`.
A missing validation split is a slice of train (the last 2%, mu2Net style).

A dataset that is not prepared is downloaded and prepared only when
DataLimits.allow_download says so; otherwise the source fails at once
(FAILED_PRECONDITION). Decoded examples are held to DataLimits' image side
and pixel bounds and the source's decoded size to max_decompressed_bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from evolve.data import arrays
from evolve.data.dataset import ImageSet, TaskData
from evolve.data.limits import (
    DEFAULT_LIMITS,
    RGB_BYTES_PER_PIXEL,
    DataLimits,
    check_decoded_size,
    check_image_size,
)
from evolve.data.paths import resolve_path, unreadable_path
from evolve.errors import FailedPreconditionError, InvalidArgumentError
from evolve.types import TfdsSource

logger = logging.getLogger(__name__)

# Share of train that becomes validation when the source names no validation split.
# mu2Net's 2% of train, and at least 200 where the data allows (VTAB-1k: 800 / 200).
TFDS_VALIDATION_FRACTION = 0.02
TFDS_VALIDATION = arrays.ValidationSplit(fraction=TFDS_VALIDATION_FRACTION)
# Registered names, optionally with a config and a version; no community namespaces.
_NAME_RE = re.compile(r"^[A-Za-z0-9_]+(/[A-Za-z0-9_.\-=,]+)?(:[0-9.*]+)?$")
# A bare split name, i.e. one that can take a slice suffix.
_PLAIN_SPLIT_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_READ_CHUNK = 1024


def preload() -> bool:
    """Imports tensorflow_datasets now, while nothing else runs; False when it is not installed.

    A long-running process must call this before it starts threads that
    import anything (a gRPC server does, on every call): tfds's package import
    runs inside etils' `lazy_imports`, which replaces `builtins.__import__`
    for the whole process, so an `import` in another thread meanwhile gets a
    LazyModule instead of the module (grpc's server then fails the call
    without answering it, and the client waits until its deadline). Once
    imported, later imports of tfds return the module and patch nothing.
    """
    try:
        _import_tfds()
    except FailedPreconditionError:
        return False
    return True


def _import_tfds() -> Any:
    """Imports tensorflow_datasets, or says that this server cannot read tfds."""
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise FailedPreconditionError(
            "TFDS_UNAVAILABLE", f"tfds sources need tensorflow_datasets on the server: {error}"
        ) from None
    return tfds


def _check_source(source: TfdsSource) -> None:
    """Field-level checks that need no tfds."""
    if not isinstance(source.name, str) or not _NAME_RE.fullmatch(source.name):
        raise InvalidArgumentError("source.name", f"not a tfds dataset name: {source.name!r}")
    for field in ("train_split", "validation_split", "test_split", "image_key", "label_key"):
        value = getattr(source, field)
        optional = field in ("validation_split", "test_split")
        if value is None and optional:
            continue
        if not isinstance(value, str) or not value.strip():
            raise InvalidArgumentError(f"source.{field}", "must be a non-empty string")


def _data_dir(source: TfdsSource, data_roots: Sequence[str]) -> str | None:
    """The tfds data_dir: the given one (inside the roots), else the first root, else tfds' default.

    An empty data_dir counts as not given (proto3 strings default to "").
    """
    if source.data_dir is None or source.data_dir == "":
        return os.path.realpath(data_roots[0]) if data_roots else None
    real = resolve_path(source.data_dir, "source.data_dir", data_roots)
    if not os.path.isdir(real) or not os.access(real, os.R_OK | os.X_OK):
        reason = "not a directory" if not os.path.isdir(real) else "not readable"
        raise unreadable_path("source.data_dir", source.data_dir, "a tfds data_dir", reason, data_roots, "folder")
    return real


def check_tfds(source: TfdsSource, data_roots: Sequence[str]) -> None:
    """The checks that need neither tfds nor the dataset: fields and data_dir."""
    _check_source(source)
    _data_dir(source, data_roots)


def _not_prepared(source: TfdsSource, builder_dir: str) -> FailedPreconditionError:
    """The error for a dataset that is not prepared while downloads are off."""
    where = f"data_dir {source.data_dir!r}" if source.data_dir else "the server's tfds data_dir"
    logger.info("tfds dataset %s is not prepared in %s and downloads are off", source.name, builder_dir)
    return FailedPreconditionError(
        "DATASET_NOT_PREPARED",
        f"tfds dataset {source.name!r} is not prepared under {where}; prepare it with "
        "`tfds build` or start the server with --allow-download",
    )


def _builder(tfds: Any, source: TfdsSource, data_dir: str | None, limits: DataLimits) -> Any:
    """The dataset builder, prepared (downloaded) when it is not yet and downloads are allowed."""
    from tensorflow_datasets.core.registered import DatasetNotFoundError  # pylint: disable=import-outside-toplevel

    try:
        builder = tfds.builder(source.name, data_dir=data_dir)
    except DatasetNotFoundError:
        raise InvalidArgumentError("source.name", f"unknown tfds dataset {source.name!r}") from None
    except MemoryError:
        raise
    except Exception as error:  # tfds raises many types for bad configs / versions
        raise InvalidArgumentError("source.name", f"cannot open tfds dataset {source.name!r}: {error}") from None
    if not builder.is_prepared():
        if not limits.allow_download:
            raise _not_prepared(source, str(builder.data_dir))
        logger.info("preparing tfds dataset %s in %s", source.name, builder.data_dir)
        try:
            builder.download_and_prepare()
        except MemoryError:
            raise
        except Exception as error:
            field = "source.data_dir" if source.data_dir else "source.name"
            raise InvalidArgumentError(
                field, f"tfds dataset {source.name!r} is not prepared and could not be prepared: {error}"
            ) from None
    return builder


def _label_feature(builder: Any, source: TfdsSource) -> tuple[int, tuple[str, ...]]:
    """(num_classes, class names) of the label feature; checks the image key."""
    features = builder.info.features
    if source.image_key not in features:
        raise InvalidArgumentError("source.image_key", f"no feature {source.image_key!r} in {source.name!r}")
    if source.label_key not in features:
        raise InvalidArgumentError("source.label_key", f"no feature {source.label_key!r} in {source.name!r}")
    num_classes = getattr(features[source.label_key], "num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidArgumentError("source.label_key", f"{source.label_key!r} is not a class label with >= 2 classes")
    names = tuple(str(n) for n in (getattr(features[source.label_key], "names", None) or ()))
    return num_classes, names if len(names) == num_classes else ()


def _split_size(builder: Any, split: str) -> int | None:
    """Examples in a bare split when the prepared metadata knows it."""
    try:
        splits = builder.info.splits
        if split in splits:
            return int(splits[split].num_examples) or None
    except Exception:  # unknown metadata (e.g. mocked builders)
        logger.debug("split sizes of %s unknown", builder.name, exc_info=True)
    return None


def _split_plan(builder: Any, source: TfdsSource, max_train: int | None) -> dict[str, str | None]:
    """tfds split strings to read for train / validation / test.

    'validation' is None when it must be cut from the train examples after
    reading (a train split that is itself already sliced or combined).
    """
    train = source.train_split
    plain = bool(_PLAIN_SPLIT_RE.fullmatch(train))
    plan: dict[str, str | None] = {"train": train, "validation": source.validation_split, "test": source.test_split}
    total = _split_size(builder, train) if plain else None
    if source.validation_split is None and plain:
        if total is not None:
            n_val = TFDS_VALIDATION.size(total)
            if total - n_val < 1:
                raise InvalidArgumentError("source.train_split", f"{train!r} is too small to split off validation")
            n_train = total - n_val if max_train is None else min(max_train, total - n_val)
            plan["train"], plan["validation"] = f"{train}[:{n_train}]", f"{train}[{total - n_val}:]"
        else:
            keep = int(round(100 * (1 - TFDS_VALIDATION_FRACTION)))
            plan["train"], plan["validation"] = f"{train}[:{keep}%]", f"{train}[{keep}%:]"
    elif plain and max_train is not None and total is not None:
        plan["train"] = f"{train}[:{min(max_train, total)}]"
    return plan


def _random_access(builder: Any) -> bool:
    """Whether the prepared files can be read without TensorFlow."""
    from tensorflow_datasets.core import file_adapters  # pylint: disable=import-outside-toplevel

    try:
        formats = set(builder.info.available_file_formats())
    except Exception:
        logger.debug("file formats of %s unknown", builder.name, exc_info=True)
        return True
    return not formats or bool(formats & set(file_adapters.FileFormat.with_random_access()))


def _examples_random_access(builder: Any, split: str, limit: int | None) -> tuple[int, Iterator[dict]]:
    """(count, examples) of a split through the array_record data source."""
    data_source = builder.as_data_source(split=split)
    count = len(data_source) if limit is None else min(limit, len(data_source))
    return count, (data_source[index] for index in range(count))


def _examples_tf_data(tfds: Any, builder: Any, split: str, limit: int | None) -> tuple[None, Iterable[dict]]:
    """(None: count unknown, examples) of a split through tf.data (needs TensorFlow)."""
    try:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise FailedPreconditionError(
            "TENSORFLOW_UNAVAILABLE",
            f"{builder.name!r} is prepared as {builder.info.file_format}, readable only with TensorFlow: {error}",
        ) from None
    try:  # keep TensorFlow off the accelerators that JAX uses
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised
        pass
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    if limit is not None:
        dataset = dataset.take(limit)
    return None, tfds.as_numpy(dataset)


@dataclasses.dataclass
class _DecodedBudget:
    """Decoded bytes of one source so far, over all its splits, against the limit.

    Each example counts as the larger of its own decoded size and its size in
    the stack (resized to the split's first image): together they bound the
    memory the source holds while it is read.
    """

    limits: DataLimits
    name: str
    used: int = 0

    def check_ahead(self, count: int, first: np.ndarray, split: str, field: str) -> None:
        """Refuses a split whose stack alone would go over, before reading past its first example."""
        what = f"tfds dataset {self.name!r} ({count} examples of split {split!r} at the first one's size)"
        check_decoded_size(self.used + count * _rgb_bytes(first), self.limits, field, what, at_least=True)

    def charge(self, image: np.ndarray, first: np.ndarray, split: str, field: str) -> None:
        self.used += max(_rgb_bytes(image), _rgb_bytes(first))
        what = f"tfds dataset {self.name!r} (read up to split {split!r})"
        check_decoded_size(self.used, self.limits, field, what, at_least=True)


def _rgb_bytes(image: np.ndarray) -> int:
    """Bytes of an H x W [x C] image as uint8 RGB."""
    return math.prod(image.shape[:2]) * RGB_BYTES_PER_PIXEL


def _check_example(image: np.ndarray, index: int, split: str, limits: DataLimits) -> None:
    """One decoded example's image within the side and pixel bounds."""
    if image.ndim in (2, 3):
        height, width = image.shape[:2]
        check_image_size(width, height, limits, "source.image_key", f"example {index} of split {split!r}")


def _check_feature_shape(builder: Any, source: TfdsSource, limits: DataLimits) -> None:
    """The image feature's static shape (when the dataset declares one) within the bounds."""
    shape = getattr(builder.info.features[source.image_key], "shape", None)
    if isinstance(shape, tuple) and len(shape) in (2, 3) and all(isinstance(d, int) for d in shape[:2]):
        height, width = shape[:2]
        check_image_size(width, height, limits, "source.image_key", f"the images of {source.name!r}")


def _read_split(
    tfds: Any, builder: Any, source: TfdsSource, split: str, field: str, limit: int | None, budget: _DecodedBudget
) -> ImageSet:
    """Reads one split into an ImageSet; any failure names `field`."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    try:
        if _random_access(builder):
            count, examples = _examples_random_access(builder, split, limit)
        else:
            count, examples = _examples_tf_data(tfds, builder, split, limit)
        for index, example in enumerate(examples):
            image = np.asarray(example[source.image_key])
            _check_example(image, index, split, budget.limits)
            if index == 0 and count is not None:
                budget.check_ahead(count, image, split, field)
            budget.charge(image, images[0] if images else image, split, field)
            images.append(arrays.to_uint8_rgb(image[None], "source.image_key")[0])
            labels.append(int(example[source.label_key]))
    except (InvalidArgumentError, FailedPreconditionError, MemoryError):
        raise
    except Exception as error:
        logger.debug("reading %s[%s] failed", source.name, split, exc_info=True)
        raise InvalidArgumentError(field, f"cannot read split {split!r} of {source.name!r}: {error}") from None
    return _to_image_set(images, labels, field, split)


def _to_image_set(images: list[np.ndarray], labels: list[int], field: str, split: str) -> ImageSet:
    """Stacks decoded uint8 RGB examples (possibly of different sizes) into an ImageSet."""
    if not images:
        raise InvalidArgumentError(field, f"split {split!r} is empty")
    return ImageSet(arrays.stack_images(images), arrays.to_labels(np.asarray(labels), "source.label_key"))


def load_tfds(
    source: TfdsSource, data_roots: Sequence[str], max_train_examples: int | None,
    limits: DataLimits = DEFAULT_LIMITS,
) -> TaskData:
    """Loads a TfdsSource into TaskData (see the module docstring)."""
    _check_source(source)
    data_dir = _data_dir(source, data_roots)
    tfds = _import_tfds()
    builder = _builder(tfds, source, data_dir, limits)
    num_classes, class_names = _label_feature(builder, source)
    _check_feature_shape(builder, source, limits)
    plan = _split_plan(builder, source, max_train_examples)
    budget = _DecodedBudget(limits, source.name)

    def read(split: str, field: str, limit: int | None) -> ImageSet:
        return _read_split(tfds, builder, source, split, field, limit, budget)

    if plan["validation"] is None:  # cut validation from all of train, then cap train
        train = read(plan["train"], "source.train_split", None)
        train, validation = arrays.split_off_validation(train, "source.train_split", TFDS_VALIDATION)
        train = arrays.subsample(train, max_train_examples)
    else:
        train = read(plan["train"], "source.train_split", max_train_examples)
        field = "source.validation_split" if source.validation_split else "source.train_split"
        validation = read(plan["validation"], field, None)
    test = validation
    if plan["test"] is not None:
        test = read(plan["test"], "source.test_split", None)
    for split in (train, validation, test):
        if len(split) and int(split.labels.max()) >= num_classes:
            raise InvalidArgumentError("source.label_key", f"a label is >= num_classes {num_classes}")
    logger.info(
        "tfds %s: %d train / %d validation / %d test, %d classes",
        source.name, len(train), len(validation), len(test), num_classes,
    )
    return TaskData(train, validation, test, num_classes, class_names)
