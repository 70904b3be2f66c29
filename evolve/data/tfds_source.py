"""TensorFlow Datasets task sources.

`tensorflow_datasets` is imported lazily, inside `load_tfds` only, so that the
rest of the data layer runs on machines without TensorFlow. Splits are read
with the random-access data source (array_record; needs no TensorFlow) when
the prepared files support it, else through `tfds.as_numpy(as_dataset(...))`.
A missing validation split is a slice of train (the last 2%, mu2Net style).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np

from evolve.data import arrays
from evolve.data.dataset import ImageSet, TaskData
from evolve.data.paths import resolve_path
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
    if not os.path.isdir(real):
        raise InvalidArgumentError("source.data_dir", f"not a directory: {source.data_dir!r}")
    return real


def _builder(tfds: Any, source: TfdsSource, data_dir: str | None) -> Any:
    """The dataset builder, prepared (downloaded) when it is not yet."""
    from tensorflow_datasets.core.registered import DatasetNotFoundError  # pylint: disable=import-outside-toplevel

    try:
        builder = tfds.builder(source.name, data_dir=data_dir)
    except DatasetNotFoundError:
        raise InvalidArgumentError("source.name", f"unknown tfds dataset {source.name!r}") from None
    except Exception as error:  # tfds raises many types for bad configs / versions
        raise InvalidArgumentError("source.name", f"cannot open tfds dataset {source.name!r}: {error}") from None
    if not builder.is_prepared():
        logger.info("preparing tfds dataset %s in %s", source.name, builder.data_dir)
        try:
            builder.download_and_prepare()
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


def _examples_random_access(builder: Any, split: str, limit: int | None) -> Iterable[dict]:
    """Examples of a split through the array_record data source."""
    data_source = builder.as_data_source(split=split)
    count = len(data_source) if limit is None else min(limit, len(data_source))
    for index in range(count):
        yield data_source[index]


def _examples_tf_data(tfds: Any, builder: Any, split: str, limit: int | None) -> Iterable[dict]:
    """Examples of a split through tf.data (needs TensorFlow)."""
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
    return tfds.as_numpy(dataset)


def _read_split(tfds: Any, builder: Any, source: TfdsSource, split: str, field: str, limit: int | None) -> ImageSet:
    """Reads one split into an ImageSet; any failure names `field`."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    try:
        if _random_access(builder):
            examples = _examples_random_access(builder, split, limit)
        else:
            examples = _examples_tf_data(tfds, builder, split, limit)
        for example in examples:
            images.append(np.asarray(example[source.image_key]))
            labels.append(int(example[source.label_key]))
    except (InvalidArgumentError, FailedPreconditionError):
        raise
    except Exception as error:
        logger.debug("reading %s[%s] failed", source.name, split, exc_info=True)
        raise InvalidArgumentError(field, f"cannot read split {split!r} of {source.name!r}: {error}") from None
    return _to_image_set(images, labels, field, split)


def _to_image_set(images: list[np.ndarray], labels: list[int], field: str, split: str) -> ImageSet:
    """Converts decoded examples (images possibly of different sizes) to an ImageSet."""
    if not images:
        raise InvalidArgumentError(field, f"split {split!r} is empty")
    converted = [arrays.to_uint8_rgb(image[None], "source.image_key")[0] for image in images]
    stacked = arrays.stack_images(converted)
    return ImageSet(stacked, arrays.to_labels(np.asarray(labels), "source.label_key"))


def load_tfds(source: TfdsSource, data_roots: Sequence[str], max_train_examples: int | None) -> TaskData:
    """Loads a TfdsSource into TaskData (see the module docstring)."""
    _check_source(source)
    data_dir = _data_dir(source, data_roots)
    tfds = _import_tfds()
    builder = _builder(tfds, source, data_dir)
    num_classes, class_names = _label_feature(builder, source)
    plan = _split_plan(builder, source, max_train_examples)
    if plan["validation"] is None:  # cut validation from all of train, then cap train
        train = _read_split(tfds, builder, source, plan["train"], "source.train_split", None)
        train, validation = arrays.split_off_validation(train, "source.train_split", TFDS_VALIDATION)
        train = arrays.subsample(train, max_train_examples)
    else:
        train = _read_split(tfds, builder, source, plan["train"], "source.train_split", max_train_examples)
        field = "source.validation_split" if source.validation_split else "source.train_split"
        validation = _read_split(tfds, builder, source, plan["validation"], field, None)
    test = validation
    if plan["test"] is not None:
        test = _read_split(tfds, builder, source, plan["test"], "source.test_split", None)
    for split in (train, validation, test):
        if len(split) and int(split.labels.max()) >= num_classes:
            raise InvalidArgumentError("source.label_key", f"a label is >= num_classes {num_classes}")
    logger.info(
        "tfds %s: %d train / %d validation / %d test, %d classes",
        source.name, len(train), len(validation), len(test), num_classes,
    )
    return TaskData(train, validation, test, num_classes, class_names)
